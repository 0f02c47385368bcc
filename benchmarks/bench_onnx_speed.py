"""Rewritten ONNX models against the original in onnxruntime: speed and peak memory.

The model: one causal self-attention layer (4 heads, d = 64, hidden 256, batch 1), exported
with torch.onnx.export(dynamo=True) at opset 20 (static shapes, one export per length; the
exporter folds the causal mask into an (n, n) constant), and the same layer exported at
opset 23, where the exporter emits the standard `Attention` op. Each variant's rewrite of
the opset-20 export (attnrewrite.rewrite, check off) is timed against both.

Timing: one subprocess per rewrite holds the original, the opset-23 export and the rewrite
(onnxruntime CPU, 2 intra-op threads, default graph optimisations, memory arena off) and runs
them in turn, one warm-up each then 3 rounds; each model's time is its median, so load from
other processes falls on all three alike. Memory: each model alone in a fresh subprocess, one
run with the default arena; its peak RSS (ru_maxrss: loading, session and run together).
Ratios are original time / rewritten time (> 1: faster), all from one run of this script.

    .venv/bin/python benchmarks/bench_onnx_speed.py [--lengths 512,4096,16384] [--max-n 16384]
        [--original-max-n 8192] [--conv-max-n 16384] [--variants "exact,window 256,..."]

conv-basis is lowered densely (float64 H̃) up to 512 and through the `DFT` op above (float32
overlap-save, O(k·n·d) memory), as its reference; `--variants "conv-basis k=16"` runs it alone.

Rewrites go through the pipeline's steps without the example-input run (detect, `prepare`
with the options given, lower), so lengths where the original cannot run still get their
rewritten models; above --original-max-n the original's time is extrapolated (marked ≈).
"""
from __future__ import annotations

import argparse
import json
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

H, D = 4, 64
E = H * D
VARIANTS = {  # name: (variant, options)
    "exact": ("exact", {}),
    "exact contrib": ("exact", {"onnx_attention": "contrib"}),
    "exact standard": ("exact", {"onnx_attention": "standard"}),
    "window 256": ("sparse", {"mode": "window", "window": 256, "sinks": 4, "band": "backward"}),
    "block 10%": ("sparse", {"mode": "block", "block": 64, "density": 0.1, "select": "pooled"}),
    "conv-basis k=16": ("conv_basis", {"k": 16}),
}


def export(n: int, opset: int, path: Path) -> None:
    import torch
    import torch.nn.functional as F

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.o = torch.nn.Linear(E, 3 * E), torch.nn.Linear(E, E)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, H, D).permute(2, 0, 3, 1, 4)
            return self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, E))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Layer().eval(), (torch.randn(1, n, E),), str(path), input_names=["x"], dynamo=True,
                          opset_version=opset, verbose=False)


def feeds(n: int) -> dict:
    import numpy as np
    return {"x": np.random.default_rng(n).standard_normal((1, n, E)).astype(np.float32)}


def rewrite(src: Path, variant: str, options: dict, out: Path) -> str:
    """The rewritten model written to `out`; '' or the reasons sites were kept.

    The pipeline's steps without running the model (the original at 16k needs ~20 GB):
    detect, each site's options through the variant's `prepare` (the options here fix
    everything it would read from captured values, e.g. band=backward), lower.
    """
    import onnx
    from attnrewrite.passes import onnx_detect, onnx_graph, onnx_rewrite
    from attnrewrite.pipeline import validate_options, variant_module
    model = onnx.load(str(src))
    inferred = onnx_graph.infer(model)
    sites, _, _ = onnx_detect.find_sites(model, inferred)
    mod = variant_module(variant)
    opts = {k: v for k, v in validate_options(variant, options).items() if k != "auto"}
    prepare = getattr(mod, "prepare", None)
    choice, kept = {}, []
    for site in sites:
        o = prepare(site, [], dict(opts)) if prepare else dict(opts)
        if isinstance(o, str):
            kept.append(o)
        else:
            choice[site.id] = o
    new, why = onnx_rewrite.rewrite_model(model, sites, mod, choice, inferred)
    onnx.save_model(new, str(out))
    return "; ".join(kept + list(why.values()))


def _length(path: Path) -> int:
    return int(path.stem.split("-")[1])


def _session(path: Path, arena: bool = True):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    so.log_severity_level = 4
    so.enable_cpu_mem_arena = arena
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def peak_memory(path: Path) -> dict:
    """One run in this (fresh) process; its peak RSS in MB (loading, session and run together)."""
    _session(path).run(None, feeds(_length(path)))
    return {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def time_models(paths: list[Path]) -> dict:
    """Median of 3 runs per model after one warm-up each, the models taking turns (so load
    from other processes falls on all of them alike); the arena is off, so a model's memory
    is returned after its run."""
    sessions = [_session(p, arena=False) for p in paths]
    f = feeds(_length(paths[0]))
    times = [[] for _ in paths]
    for rnd in range(4):
        for sess, ts in zip(sessions, times):
            t = time.perf_counter()
            sess.run(None, f)
            if rnd:
                ts.append(time.perf_counter() - t)
    return {"s": [statistics.median(ts) for ts in times]}


def _sub(*args) -> dict:
    """Run this script's worker mode in a fresh process; its JSON answer (or the error)."""
    p = subprocess.run([sys.executable, __file__, "--worker", *map(str, args)], capture_output=True, text=True)
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:120]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def worker(args) -> None:
    what = args[0]
    if what == "export":
        export(int(args[1]), int(args[2]), Path(args[3]))
        print(json.dumps({}))
    elif what == "rewrite":
        print(json.dumps({"kept": rewrite(Path(args[1]), args[2], json.loads(args[3]), Path(args[4]))}))
    elif what == "memory":
        print(json.dumps(peak_memory(Path(args[1]))))
    else:
        print(json.dumps(time_models([Path(a) for a in args[1:]])))


def run(lengths, names, conv_max_n: int, original_max_n: int, tmp: Path) -> list[dict]:
    rows = []
    for n in lengths:
        src, att = tmp / f"orig-{n}-20.onnx", tmp / f"att23-{n}-23.onnx"
        dense = n <= original_max_n
        for path, opset in ((src, 20), (att, 23))[:2 if dense else 1]:
            _sub("export", n, opset, path)
        base = _sub("memory", src) if dense else {}
        a23 = _sub("memory", att) if dense else {}     # (its CPU kernel holds the (n, n) scores too)
        if not dense:            # estimated from the largest measured length: dense attention is O(n²)
            meas = [r for r in rows if r["orig_s"] and not r["orig_est"]]
            top = max((r["n"] for r in meas), default=None)
            est = statistics.median(r["orig_s"] for r in meas if r["n"] == top) * (n / top) ** 2 if meas else None
        print(f"n={n}: original {base}, opset-23 Attention {a23}", file=sys.stderr)
        for name in names:
            variant, opts = VARIANTS[name]
            row = {"n": n, "variant": name, "orig_s": None, "orig_mb": base.get("rss_mb"), "orig_est": not dense,
                   "att23_s": None, "att23_mb": a23.get("rss_mb")}
            if variant == "conv_basis" and n > conv_max_n:
                row["note"] = f"not run: n > --conv-max-n {conv_max_n}"
                rows.append(row)
                continue
            if variant == "exact" and not dense:
                row["note"] = "not run: dense like the original"
                rows.append(row)
                continue
            out = tmp / f"{name.replace(' ', '_').replace('%', '').replace('-', '_')}-{n}-r.onnx"
            rw = _sub("rewrite", src, variant, json.dumps(opts), out)
            if "error" in rw or rw.get("kept"):
                row["note"] = rw.get("error") or f"kept: {rw['kept']}"
                rows.append(row)
                continue
            row["mb"] = _sub("memory", out).get("rss_mb")
            t = _sub("time", src, att, out) if dense else _sub("time", out)
            if "error" in t:
                row["note"] = t["error"]
            elif dense:
                row["orig_s"], row["att23_s"], row["s"] = t["s"]
            else:
                row["orig_s"], row["s"] = est, t["s"][0]
            rows.append(row)
            print(row, file=sys.stderr)
            out.unlink(missing_ok=True)
        src.unlink(missing_ok=True)
        att.unlink(missing_ok=True)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| n | rewrite | original ms | rewritten ms | speed vs original | speed vs opset-23 Attention "
           "| peak RSS MB: original / opset-23 / rewritten | note |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.get("s")
        est = "≈" if r.get("orig_est") else ""
        fmt = lambda x: "–" if x is None else f"{x * 1e3:.0f}"   # noqa: E731
        ratio = lambda a: "–" if a is None or not s else f"{a / s:.2f}×"   # noqa: E731
        mb = lambda x: "–" if x is None else f"{x:.0f}"   # noqa: E731
        out.append(f"| {r['n']} | {r['variant']} | {est}{fmt(r['orig_s'])} | {fmt(s)} | {est}{ratio(r['orig_s'])} | "
                   f"{ratio(r['att23_s'])} | {mb(r['orig_mb'])} / {mb(r.get('att23_mb'))} / {mb(r.get('mb'))} "
                   f"| {r.get('note', '')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--max-n", type=int, default=16384, help="skip lengths above this")
    ap.add_argument("--conv-max-n", type=int, default=16384,
                    help="skip conv-basis above this length (its DFT lowering runs at 16k in ~0.5 GB)")
    ap.add_argument("--original-max-n", type=int, default=8192,
                    help="run the opset-20 original only up to this length (its dense scores: ~20 GB at "
                         "16k); above it its time is extrapolated as O(n²) from the largest measured one")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--worker", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker)
        return 0
    lengths = [n for n in map(int, a.lengths.split(",")) if n <= a.max_n]
    names = [v.strip() for v in a.variants.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_onnx_speed_") as tmp:
        rows = run(lengths, names, a.conv_max_n, a.original_max_n, Path(tmp))
    print(f"onnxruntime CPU, 2 threads, median of 3; {os.cpu_count()}-core CPU, shared\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
