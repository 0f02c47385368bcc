"""The `exact` rewrite against the original in onnxruntime, for every transformers family the
ONNX tests export (tests/test_onnx_models.py's ONNX_FAMILIES), at realistic lengths.

Models: each family's config from tests/test_hf_models.py's FAMILIES (2 layers, 4 heads, GQA
with 2 kv heads where the tests use it, vocab 100, sdpa attention, random weights, seed 0),
widened so attention carries the weight it has in real models: hidden 256 (head dim 64), FFN
1024, and position tables long enough for n (max_position_embeddings / n_positions n + 8).
Inputs, batch 1: ids of length n and an all-ones attention mask (encoders and causal LMs, no
KV cache); t5/bart: encoder and decoder both of length n; vit: patch 16 and a square image of
round(sqrt(n))² patches (+1 class token: 530 tokens for 512, 4097 for 4096); whisper: the
encoder length is the config's max_source_positions, set to n (2n mel frames in, 8 mel bins),
decoder length n.

Each (family, n) is exported once with torch.onnx.export(dynamo=True), static shapes, the
opset the exporter picks; where dynamo fails (T5 in torch 2.13) the TorchScript exporter
(opset 17, static shapes) is used instead and the note says so; where that exporter writes
each tensor to a file of its own (T5 at 4096: ~1 GB of position biases folded into (n, n)
constants), the model is re-saved with one data file (`_one_data_file`). The export is
rewritten with
attnrewrite.rewrite(path, "exact", example_inputs=feeds, check=False), default options.

Timing: one subprocess per (family, n) holds the original and the rewrite (onnxruntime CPU,
2 intra-op threads, default graph optimisations, memory arena off) and runs them in turn,
one warm-up each then 3 rounds; each model's time is its median. Peak RSS (optional,
--memory): each model alone in a fresh subprocess, one run (ru_maxrss: loading, session and
run together). Speed is original time / rewritten time (> 1: the rewrite is faster).

    .venv/bin/python benchmarks/bench_onnx_families.py [--lengths 512,4096] [--families bert,gpt2]
        [--out FILE] [--memory] [--timeout 900]

A family that fails to export, rewrite or run gets a row with the one-line reason.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path[:0] = [str(ROOT / "tests" / d) for d in ("", "models", "passes")]  # test_hf_models
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_onnx_speed import _session  # noqa: E402 - one onnxruntime session setup for both benchmarks

FAMILIES = ["bert", "roberta", "distilbert", "gpt2", "gpt_neox", "opt", "falcon", "llama", "mistral",
            "qwen2", "phi", "gemma", "t5", "bart", "vit", "whisper"]
HIDDEN, FFN, HEAD_DIM, PATCH = 256, 1024, 64, 16
WIDEN = {**dict.fromkeys(("hidden_size", "n_embd", "dim", "d_model", "word_embed_proj_dim"), HIDDEN),
         **dict.fromkeys(("intermediate_size", "hidden_dim", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim",
                          "d_ff"), FFN),
         **dict.fromkeys(("d_kv", "head_dim"), HEAD_DIM)}


def config_kwargs(family: str, n: int) -> dict:
    """The test config, widened (WIDEN) and with position tables for length n."""
    import test_hf_models as HF
    kw = {k: WIDEN.get(k, v) for k, v in HF.FAMILIES[family][2].items()}
    if family == "vit":
        side = round(math.sqrt(n))
        kw.update(image_size=side * PATCH, patch_size=PATCH)
    elif family == "whisper":
        kw.update(max_source_positions=n, max_target_positions=n + 8)
    elif family != "t5":                      # T5's relative position bias has no table to grow
        kw["n_positions" if family == "gpt2" else "max_position_embeddings"] = n + 8
    return kw


def inputs(family: str, n: int, kw: dict) -> dict:
    """Batch-1 keyword inputs of length n (see the module docstring)."""
    import torch
    g = torch.Generator().manual_seed(n)
    ids = lambda: torch.randint(3, 100, (1, n), generator=g)            # noqa: E731
    if family == "vit":
        return {"pixel_values": torch.randn(1, 3, kw["image_size"], kw["image_size"], generator=g)}
    if family == "whisper":
        return {"input_features": torch.randn(1, kw["num_mel_bins"], 2 * n, generator=g),
                "decoder_input_ids": ids(), "use_cache": False}
    out = {"input_ids": ids(), "attention_mask": torch.ones(1, n, dtype=torch.long)}
    if family in ("t5", "bart"):
        out["decoder_input_ids"] = ids()
    if family not in ("bert", "roberta", "distilbert"):
        out["use_cache"] = False
    return out


def export(family: str, n: int, path: Path, exporter: str) -> dict:
    """Export one family at length n to `path`; the feeds as numpy arrays."""
    import torch
    import transformers as T
    import test_hf_models as HF

    class Named(torch.nn.Module):
        """Tensor inputs by position (named in the graph), the other keywords fixed."""

        def __init__(self, model, names, extra):
            super().__init__()
            self.model, self.names, self.extra = model, names, extra

        def forward(self, *xs):
            return self.model(**dict(zip(self.names, xs)), **self.extra)[0]

    model_cls, config_cls = HF.FAMILIES[family][:2]
    kw = config_kwargs(family, n)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(T, model_cls)(getattr(T, config_cls)(**kw, attn_implementation="sdpa")).eval()
        feeds = inputs(family, n, kw)
        names = [k for k, v in feeds.items() if isinstance(v, torch.Tensor)]
        extra = {k: v for k, v in feeds.items() if not isinstance(v, torch.Tensor)}
        args = tuple(feeds[k] for k in names)
        if exporter == "dynamo":
            torch.onnx.export(Named(model, names, extra), args, str(path), input_names=names, dynamo=True,
                              verbose=False)
        else:
            torch.onnx.export(Named(model, names, extra), args, str(path), input_names=names, dynamo=False,
                              opset_version=17)
            if len(list(path.parent.iterdir())) > 1:
                _one_data_file(path)
    return {k: feeds[k].numpy() for k in names}


def _one_data_file(path: Path) -> None:
    """Re-save a TorchScript export written as one file per tensor (T5 at n = 4096: its
    position biases folded into (n, n) `Constant` attributes) as the model plus one
    `<name>.data` file of initializers, the `Constant` attributes inline: the exporter writes
    every tensor to a file of its own, attributes included, and attnrewrite's loader does not
    take externally stored `Constant` attributes (onnx.checker looks for their files)."""
    import onnx
    model = onnx.load(str(path))
    for f in path.parent.iterdir():
        if f != path:
            f.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", convert_attribute=False)


def prepare(family: str, n: int, tmp: Path) -> dict:
    """Export (dynamo, else legacy), save the feeds, rewrite with `exact`; what happened."""
    import numpy as np
    import onnx
    import attnrewrite
    from attnrewrite.frontends.onnx import save_model
    src, out, npz = tmp / f"{family}-{n}.onnx", tmp / f"{family}-{n}.exact.onnx", tmp / f"{family}-{n}.npz"
    notes = []
    t = time.perf_counter()
    try:
        feeds = export(family, n, src, "dynamo")
    except Exception as e:                                          # noqa: BLE001 - reported in the row
        notes.append(f"dynamo export failed ({type(e).__name__}), legacy exporter (opset 17)")
        feeds = export(family, n, src, "legacy")
        if Path(str(src) + ".data").exists():
            notes.append("re-saved with its Constant attributes inline (see _one_data_file)")
    export_s = time.perf_counter() - t
    np.savez(npz, **feeds)
    t = time.perf_counter()
    r = attnrewrite.rewrite(str(src), "exact", example_inputs=feeds, check=False)
    rewrite_s = time.perf_counter() - t
    save_model(r.program, out, external=True)
    kept = sorted({s.reason for s in r.sites if s.status != "rewritten"})
    if kept:
        notes.append("kept: " + "; ".join(kept))
    orig = onnx.load(str(src), load_external_data=False)
    return {"sites": sum(s.status == "rewritten" for s in r.sites), "found": len(r.sites),
            "opset": next(o.version for o in orig.opset_import if o.domain in ("", "ai.onnx")),
            "nodes": [len(orig.graph.node), len(r.program.graph.node)],
            "export_s": export_s, "rewrite_s": rewrite_s, "note": "; ".join(notes)}


def _feeds(npz: Path) -> dict:
    import numpy as np
    with np.load(npz) as f:
        return dict(f)


def time_models(npz: Path, paths: list[Path]) -> dict:
    """Median of 3 runs per model after one warm-up each, the models taking turns."""
    sessions = [_session(p, arena=False) for p in paths]
    feeds = _feeds(npz)
    times = [[] for _ in paths]
    for rnd in range(4):
        for sess, ts in zip(sessions, times):
            t = time.perf_counter()
            sess.run(None, feeds)
            if rnd:
                ts.append(time.perf_counter() - t)
    return {"s": [statistics.median(ts) for ts in times]}


def peak_memory(npz: Path, path: Path) -> dict:
    """One run in this (fresh) process with the default arena; peak RSS in MB."""
    _session(path, arena=True).run(None, _feeds(npz))
    return {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def worker(args) -> None:
    what, rest = args[0], args[1:]
    if what == "prepare":
        res = prepare(rest[0], int(rest[1]), Path(rest[2]))
    elif what == "memory":
        res = peak_memory(Path(rest[0]), Path(rest[1]))
    else:
        res = time_models(Path(rest[0]), [Path(p) for p in rest[1:]])
    print(json.dumps(res))


def _sub(timeout: float, *args) -> dict:
    """This script's worker mode in a fresh process: its JSON answer, or {"error": one line}."""
    try:
        p = subprocess.run([sys.executable, __file__, "--worker", *map(str, args)], capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"{args[0]} timed out after {timeout:.0f} s"}
    if p.returncode:
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        return {"error": f"{args[0]}: " + (lines[-1].strip() if lines else f"exit {p.returncode}")[:160]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench(family: str, n: int, tmp: Path, memory: bool, timeout: float) -> dict:
    row = {"family": family, "n": n}
    for f in tmp.iterdir():                      # what an earlier failed row left
        f.unlink()
    info = _sub(timeout, "prepare", family, n, tmp)
    if "error" in info:
        return {**row, "note": info["error"]}
    row.update(info)
    src, out, npz = tmp / f"{family}-{n}.onnx", tmp / f"{family}-{n}.exact.onnx", tmp / f"{family}-{n}.npz"
    t = _sub(timeout, "time", npz, src, out)
    if "error" in t:
        row["note"] = "; ".join(filter(None, [row["note"], t["error"]]))
    else:
        row["orig_s"], row["s"] = t["s"]
    if memory and "s" in row:
        row["mb"] = [_sub(timeout, "memory", npz, p).get("rss_mb") for p in (src, out)]
    return row


def table(rows: list[dict], memory: bool) -> str:
    mem = " peak RSS MB original / rewritten |" if memory else ""
    out = [f"| family | n | sites rewritten | original ms | rewritten ms | speed (original/rewritten) |{mem} note |",
           "|---|---|---|---|---|---|" + ("---|" if memory else "") + "---|"]
    ms = lambda x: "–" if x is None else f"{x * 1e3:.0f}"             # noqa: E731
    for r in rows:
        sites = f"{r['sites']}/{r['found']}" if "sites" in r else "–"
        speed = f"{r['orig_s'] / r['s']:.2f}×" if r.get("s") else "–"
        m = ""
        if memory:
            a, b = r.get("mb") or (None, None)
            m = f" {'–' if a is None else f'{a:.0f}'} / {'–' if b is None else f'{b:.0f}'} |"
        out.append(f"| {r['family']} | {r['n']} | {sites} | {ms(r.get('orig_s'))} | {ms(r.get('s'))} | {speed} |"
                   f"{m} {r.get('note', '')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="512,4096")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--out", help="also write the table (with its header lines) to this file")
    ap.add_argument("--memory", action="store_true", help="also each model's peak RSS alone (2 more runs)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per subprocess before its row gives up")
    ap.add_argument("--worker", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker)
        return 0
    import onnxruntime
    lengths = [int(x) for x in a.lengths.split(",")]
    families = [f.strip() for f in a.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        ap.error(f"unknown families {unknown}; choose from {','.join(FAMILIES)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_onnx_families_") as tmp:
        for n in lengths:
            for family in families:
                t = time.perf_counter()
                rows.append(bench(family, n, Path(tmp), a.memory, a.timeout))
                print(f"{family} n={n}: {time.perf_counter() - t:.0f} s {rows[-1]}", file=sys.stderr, flush=True)
    text = (f"`exact` vs original, onnxruntime {onnxruntime.__version__} CPU, 2 intra-op threads, arena off, "
            f"median of 3 after a warm-up; {os.cpu_count()}-core CPU, shared\n\n{table(rows, a.memory)}\n")
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
