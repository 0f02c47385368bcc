"""Speed against quality at long context, per variant and setting, on the shipped byte-level LM.

For every setting (exact, and each variant across its parameters) and each length L, the
model (benchmarks/longctx/charlm.pt, trained here at 4096 tokens with RoPE) is compiled with
the attnrewrite backend and, as the baseline, with Inductor (`torch.compile(model)`), both at
batch 1 and length L, and the benchmark measures

* bits/char on validation text the model never saw (windows of exactly L bytes);
* the long-range recall probe (benchmarks/longctx/data.py): a 6-character value assigned
  `--probe-distance` (1000) bytes before it must be recalled at the end of a sequence of
  exactly L bytes, so the recall query sees all L keys and has to find one line among them
  (the value is teacher-forced, scored greedily per character). 1000 bytes because that is as
  far as the shipped model recalls well (benchmarks/RESULTS.md: 0.34 per character at 1000
  bytes, 0.08 at 3000, chance 0.028);
* forward time as a ratio to Inductor on the same machine, in the same process: medians
  of interleaved rounds (> 1: the rewrite is faster).

    .venv/bin/python benchmarks/long_context.py                      # the table in RESULTS.md
    .venv/bin/python benchmarks/long_context.py --lengths 256 --settings exact "window 64" --probes 2 --windows 1

Writes the table as markdown to stdout and, with --json, the rows; with --plot, a PNG of
bits/char against speed per length.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "longctx"))
sys.path.insert(0, str(HERE.parent))

import data as D  # noqa: E402
import model as M  # noqa: E402

from attnrewrite.backend import compile_backend  # noqa: E402

# name: (variant, options); "auto" settings also take the tolerance in their options
SETTINGS = {
    "exact": ("exact", {}),
    "window 256": ("sparse", {"mode": "window", "window": 256}),
    "window 1024": ("sparse", {"mode": "window", "window": 1024}),
    "window 64": ("sparse", {"mode": "window", "window": 64}),
    "block 10% pooled": ("sparse", {"mode": "block", "density": 0.1, "select": "pooled"}),
    "block 25% pooled": ("sparse", {"mode": "block", "density": 0.25, "select": "pooled"}),
    "block 10% exact": ("sparse", {"mode": "block", "density": 0.1, "select": "exact"}),
    "block 10% global budget": ("sparse", {"mode": "block", "density": 0.1, "select": "pooled",
                                           "budget": "global"}),
    "top-k 64": ("sparse", {"mode": "topk", "k": 64}),
    "conv-basis 16": ("conv-basis", {"k": 16}),
    "conv-basis 64": ("conv-basis", {"k": 64}),
    "window auto, tol 0.05": ("sparse", {"mode": "window", "auto": True, "tolerance": 0.05}),
    "heads 10%": ("sparse", {"mode": "heads", "density": 0.1}),
    "heads 25%": ("sparse", {"mode": "heads", "density": 0.25}),
    "heads 10% mass 0.95": ("sparse", {"mode": "heads", "density": 0.1, "mass": 0.95}),
}
DEFAULT_SETTINGS = ["exact", "window 256", "window 1024", "block 10% pooled", "block 25% pooled",
                    "block 10% exact", "block 10% global budget", "top-k 64", "conv-basis 16",
                    "conv-basis 64", "window auto, tol 0.05", "heads 10%", "heads 25%", "heads 10% mass 0.95"]


def windows(val: torch.Tensor, length: int, count: int) -> list[torch.Tensor]:
    """`count` consecutive validation windows of length + 1 bytes (inputs and targets)."""
    return [val[i * length: i * length + length + 1].long() for i in range(count)]


def probes(val: torch.Tensor, length: int, count: int, distance: int) -> list[tuple[torch.Tensor, int, str]]:
    """Recall probes cut to exactly `length` bytes ending at the value, which was assigned about
    `distance` bytes before it: (ids, value start, value)."""
    out = []
    for ids, start, value, _ in D.probe_set(val, max(64, min(distance, length - 600)), count):
        end = start + D.VALUE_LEN
        if end < length:                       # pad in front with earlier validation text
            ids = torch.cat([val[: length - end].long(), ids[:end]])
            start += length - end
        else:
            cut = end - length
            ids, start = ids[cut:end], start - cut
        out.append((ids, start, value))
    return out


@torch.no_grad()
def quality(fn, wins, prbs) -> dict:
    total = count = 0
    for w in wins:
        logits = fn(w[None, :-1])[0]
        total += F.cross_entropy(logits.float(), w[1:], reduction="sum").item()
        count += len(w) - 1
    chars = 0
    for ids, start, value in prbs:
        logits = fn(ids[None])[0]
        pred = logits[start - 1: start - 1 + D.VALUE_LEN].argmax(-1)
        chars += (pred == ids[start: start + D.VALUE_LEN]).sum().item()
    return {"bits_per_char": total / count / 0.6931471805599453,
            "probe_char_acc": chars / max(1, len(prbs) * D.VALUE_LEN)}


@torch.no_grad()
def ratio(fast, base, x, rounds: int) -> tuple[float, float, float]:
    """(median base time / median fast time, base ms, fast ms) over interleaved rounds."""
    tf, tb = [], []
    for _ in range(rounds):
        for fn, acc in ((base, tb), (fast, tf)):
            t = time.perf_counter()
            fn(x)
            acc.append(time.perf_counter() - t)
    mb, mf = statistics.median(tb), statistics.median(tf)
    return mb / mf, mb * 1e3, mf * 1e3


def run(args) -> list[dict]:
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 256           # every setting's backend is one more entry
    torch._dynamo.config.accumulated_recompile_limit = 4096
    model = M.load(args.path) if args.path != "random" else M.ByteLM().eval()
    _, val = D.corpus()
    rows = []
    for length in args.lengths:
        wins, prbs = windows(val, length, args.windows), probes(val, length, args.probes, args.probe_distance)
        x = wins[0][None, :-1].contiguous()
        torch._dynamo.reset()
        inductor = torch.compile(model)
        with torch.no_grad():
            inductor(x)                                  # compile outside the timing
        base_quality = None
        for name in args.settings:
            variant, opts = SETTINGS[name]
            opts = dict(opts)
            tol = opts.pop("tolerance", None)
            backend = compile_backend(variant, tolerance=tol, **opts)    # (Dynamo keeps a cache entry per backend)
            fn = torch.compile(model, backend=backend)
            t = time.perf_counter()
            with torch.no_grad():
                fn(x)
            compile_s = time.perf_counter() - t
            q = quality(fn, wins, prbs)
            speed, base_ms, ms = ratio(fn, inductor, x, args.rounds)
            impls = sorted({s.get("impl", "?") for r in backend.reports for s in r["sites"]})
            if any(v.startswith("kept: Inductor could not compile") for r in backend.reports
                   for v in r.get("lowered", {}).values()):
                impls.append("ran as ops: Inductor refused the FlexAttention form")
            statuses = [s["status"] for s in backend.reports[0]["sites"]]      # the first graph's sites
            row = {"length": length, "setting": name, "variant": variant, "options": opts, **q,
                   "x_inductor": speed, "inductor_ms": base_ms, "ms": ms, "compile_s": compile_s,
                   "impl": impls, "rewritten": statuses.count("rewritten"), "sites": len(statuses)}
            if name == "exact":
                base_quality = q
            if base_quality is not None:
                row["d_bits"] = q["bits_per_char"] - base_quality["bits_per_char"]
                row["d_probe"] = q["probe_char_acc"] - base_quality["probe_char_acc"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| L | setting | bits/char | Δ vs exact | probe char acc | Δ (points) | × Inductor | ms (Inductor ms) | "
           "sites rewritten | implementation |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d_bits = f"{r['d_bits']:+.3f}" if "d_bits" in r else ""
        d_probe = f"{100 * r['d_probe']:+.1f}" if "d_probe" in r else ""
        out.append(f"| {r['length']} | {r['setting']} | {r['bits_per_char']:.3f} | {d_bits} | "
                   f"{r['probe_char_acc']:.3f} | {d_probe} | {r['x_inductor']:.2f} | {r['ms']:.0f} ({r['inductor_ms']:.0f}) | "
                   f"{r['rewritten']}/{r['sites']} | {', '.join(r['impl'])} |")
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.5), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for r in (r for r in rows if r["length"] == length):
            ax.scatter(r["x_inductor"], r["bits_per_char"])
            ax.annotate(r["setting"], (r["x_inductor"], r["bits_per_char"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.axvline(1.0, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("speed, × Inductor (higher is faster)")
        ax.set_ylabel("validation bits/char (lower is better)")
        ax.set_title(f"L = {length}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default=str(M.DEFAULT), help="checkpoint, or 'random' for an untrained model")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    ap.add_argument("--windows", type=int, default=4, help="validation windows per length")
    ap.add_argument("--probes", type=int, default=48)
    ap.add_argument("--probe-distance", type=int, default=1000,
                    help="bytes from the assigned value to the recalled one (at most L - 600, at least 64)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--plot", help="write the quality-against-speed plot here (PNG)")
    args = ap.parse_args(argv)
    rows = run(args)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
