"""conv-basis vs torch SDPA on CPU, op level: time per call and peak memory, in one run.

    python benchmarks/bench_conv_basis.py [--sizes 4096,16384,65536] [--bidir-max 16384]
                                          [--k 16] [--heads 4] [--threads 2] [--repeat 3]

Inputs: random q, k, v ~ N(0, 1), B = 1, H = --heads, d = 64, float32 (scores of unit spread,
so rows rarely fall back to the exact path; the fallback count is printed). For each n,
causal (and bidirectional up to --bidir-max): the median of --repeat timed calls (after one
warm-up) of torch.nn.functional.scaled_dot_product_attention and of the conv-basis op's
reference with k = --k — `starts=norm` (the default) and `starts=search` (δ = 1e-9, T = 1),
precision auto (float32 transforms here) — the ratios SDPA / conv-basis, and each call's
peak resident memory above the process's level before it (Linux VmHWM, reset through
/proc/self/clear_refs). All numbers come from the same process, so the ratios compare like
with like even on a shared machine whose absolute times move with its load.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from attnrewrite.variants import conv_basis as cb


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_mib(fn) -> float:
    """Peak resident memory of one call above the level before it (MiB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                        # reset VmHWM to the current RSS
    base = rss_kib("VmRSS")
    out = fn()
    peak = rss_kib("VmHWM")
    del out
    return (peak - base) / 1024


def timed(fn, repeat: int) -> float:
    fn()                                                     # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,16384,65536")
    ap.add_argument("--bidir-max", type=int, default=16384, help="largest n also run bidirectional")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scale = args.d ** -0.5
    print(f"torch {torch.__version__}, {args.threads} threads, B=1, H={args.heads}, d={args.d}, k={args.k}, "
          f"median of {args.repeat}")
    print("| n | mask | SDPA s | conv-basis s (norm) | SDPA / conv-basis | conv-basis s (search) | "
          "SDPA / search | fallback rows | peak MiB SDPA / norm / search |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in [int(s) for s in args.sizes.split(",")]:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, args.heads, n, args.d, generator=g) for _ in range(3))
        for causal in (True, False):
            if not causal and n > args.bidir_max:
                continue
            fns = {
                "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal),
                "norm": lambda: cb.reference(q, k, v, None, scale, 0.0, causal, 0.0, args.k, None, 0.0, "norm"),
                "search": lambda: cb.reference(q, k, v, None, scale, 0.0, causal, 0.0, args.k, None, 0.0, "search"),
            }
            t = {name: timed(fn, args.repeat) for name, fn in fns.items()}
            peak = {name: peak_mib(fn) for name, fn in fns.items()}
            stats: dict = {}
            cb._attend(q, k, v, None, scale, 0.0, causal, 0.0, args.k, "norm", 0.0, stats)
            print(f"| {n} | {'causal' if causal else 'bidirectional'} | {t['sdpa']:.3f} | {t['norm']:.3f} | "
                  f"{t['sdpa'] / t['norm']:.2f}x | {t['search']:.3f} | {t['sdpa'] / t['search']:.2f}x | "
                  f"{stats['fallback_rows']} / {stats['rows']} | "
                  f"{peak['sdpa']:.0f} / {peak['norm']:.0f} / {peak['search']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
