"""What planning costs in the compile backend: the report's `rewrite_s` (capture + plan + rewrite,
check off) per variant, on a GPT-2-style model from a transformers config at one length.

    .venv/bin/python benchmarks/bench_planning.py [--length 8192] [--threads 2] [--profile block]

GPT-2 config: hidden 256, 4 heads, 2 layers, vocab 1000, random weights, eval, no_grad, batch 1.
Each variant compiles the model once through `attnrewrite.compile_backend(variant, inner="eager",
check=False, ...)` (the inner compiler does not count in `rewrite_s`) and prints, per compiled
graph, `timings.rewrite_s` and the sites rewritten. `--profile NAME` runs that variant under
cProfile and prints attnrewrite's 30 most expensive functions by cumulative time.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnrewrite  # noqa: E402

VARIANTS = {"exact": ("exact", {}), "window": ("sparse", {"mode": "window", "window": 256}),
            "block": ("sparse", {"mode": "block", "density": 0.1, "select": "pooled"}),
            "conv-basis": ("conv-basis", {"k": 16})}


def build(length: int):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=256, n_head=4, n_layer=2, n_positions=length, vocab_size=1000))
    model.config._attn_implementation = "sdpa"
    return model.eval(), torch.randint(0, 1000, (1, length))


def run(name: str, model, ids) -> list[dict]:
    variant, options = VARIANTS[name]
    torch._dynamo.reset()
    backend = attnrewrite.compile_backend(variant, inner="eager", check=False, **options)
    with torch.no_grad():
        torch.compile(model, backend=backend)(ids)
    return backend.reports


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile", default=None, help="a variant to run under cProfile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    model, ids = build(args.length)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(run, args.profile, model, ids)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats("attnrewrite", 30)
        return
    print("| variant | L | rewrite_s per graph | sites rewritten | wall s (compile + first call) |")
    print("|---|---|---|---|---|")
    for name in args.variants.split(","):
        t = time.perf_counter()
        reports = run(name, model, ids)
        wall = time.perf_counter() - t
        rewrite_s = ", ".join(f"{r['timings'].get('rewrite_s', 0):.3f}" for r in reports if r["sites"])
        done = sum(s["status"] == "rewritten" for r in reports for s in r["sites"])
        print(f"| {name} | {args.length} | {rewrite_s} | {done} | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
