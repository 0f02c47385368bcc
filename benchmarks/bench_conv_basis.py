"""conv-basis vs torch SDPA on CPU: time per call for n = 1k … 32k (d = 64, one head).

    python benchmarks/bench_conv_basis.py [--sizes 1024,2048,...] [--k 16] [--threads 2]

Inputs are random q, k, v ~ N(0, 1) (scores of unit spread, so no row falls back to the
exact path; the fallback count is printed). For each n: median wall time of the
conv-basis reference (float64, start search included) and of
torch.nn.functional.scaled_dot_product_attention (float32), causal and bidirectional,
the ratio SDPA / conv-basis, and conv-basis' output error against SDPA.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from attnrewrite.variants import conv_basis as cb


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
    ap.add_argument("--sizes", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, d={args.d}, k={args.k}")
    print("| n | mask | SDPA s | conv-basis s | SDPA / conv-basis | rel err vs SDPA | fallback rows |")
    print("|---|---|---|---|---|---|---|")
    for n in [int(s) for s in args.sizes.split(",")]:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, 1, n, args.d, generator=g) for _ in range(3))
        repeat = 3 if n <= 8192 else 1
        for causal in (True, False):
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
            conv = lambda: cb.reference(q, k, v, None, args.d ** -0.5, 0.0, causal, 0.0, args.k, None, 0.0)  # noqa: E731
            t_sdpa, t_conv = timed(sdpa, repeat), timed(conv, repeat)
            stats: dict = {}
            out = cb._attend(q, k, v, None, args.d ** -0.5, 0.0, causal, 0.0, args.k, None, 0.0, stats)
            ref = sdpa()
            err = ((out - ref).norm() / ref.norm()).item()
            print(f"| {n} | {'causal' if causal else 'bidirectional'} | {t_sdpa:.3f} | {t_conv:.3f} | "
                  f"{t_sdpa / t_conv:.2f}x | {err:.3f} | {stats['fallback_rows']} |", flush=True)


if __name__ == "__main__":
    main()
