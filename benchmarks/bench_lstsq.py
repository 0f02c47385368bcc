"""Sketch-and-precondition least squares vs torch.linalg.lstsq on tall float64 problems.

    .venv/bin/python benchmarks/bench_lstsq.py [--sizes 100000,400000,1000000] [--n 64] [--k 4]
        [--cond 1e6] [--threads 2] [--repeat 3]

A = U diag(σ) Vᵀ (m × n, σ log-spaced from 1 to 1/cond, U, V random orthonormal),
B = A X + noise (k columns, ‖noise‖ ≈ 0.1‖A X‖). All methods run in this one process, each
the median of --repeat calls. Methods: torch.linalg.lstsq with its CPU default driver (gelsy,
QR with column pivoting) and with gels (plain Householder QR), then the solver
(tol 1e-10 unless said): the default (CountSketch s = 4n, LSQR started from the Cholesky
solve of the preconditioned normal equations), the same with SRHT, and LSQR from the
sketch-and-solve start at s = 4n, 16n, and 16n with tol 1e-6.
Columns: median seconds, lstsq(gelsy) time / this time (> 1: faster than lstsq), LSQR
iterations (max over columns), ‖AX − B‖_F/‖B‖_F, the largest relative difference of a
column's ‖Ax − b‖ from gelsy's, and ‖Aᵀr‖/(‖A‖_F‖r‖) (max over columns).
A second table splits the solver's cost: one pass A·Z plus one Aᵀ·U (what each LSQR
iteration costs, k = --k columns), the CountSketch and SRHT sketches, and the sketch QR.
"""
import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch

from attnrewrite.lstsq import _countsketch, _srht, sketch_precondition_lstsq

F64 = torch.float64


def problem(m, n, k, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    A = (U * torch.logspace(0, -math.log10(cond), n, dtype=F64)) @ V.T
    del U
    B = A @ torch.randn(n, k, generator=g, dtype=F64)
    B += torch.randn(m, k, generator=g, dtype=F64) * (0.1 * B.norm() / math.sqrt(m * k))
    return A, B


def median_time(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


METHODS = {
    "lstsq gelsy (default)": lambda A, B: (torch.linalg.lstsq(A, B).solution, None),
    "lstsq gels": lambda A, B: (torch.linalg.lstsq(A, B, driver="gels").solution, None),
    "countsketch s=4n (default: Cholesky start)": lambda A, B: sketch_precondition_lstsq(A, B),
    "srht s=4n, Cholesky start": lambda A, B: sketch_precondition_lstsq(A, B, sketch="srht"),
    "countsketch s=4n, sketch start": lambda A, B: sketch_precondition_lstsq(A, B, start="sketch"),
    "countsketch s=16n, sketch start": lambda A, B: sketch_precondition_lstsq(A, B, oversample=16, start="sketch"),
    "countsketch s=16n tol=1e-6, sketch start": lambda A, B: sketch_precondition_lstsq(
        A, B, oversample=16, tol=1e-6, start="sketch"),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,400000,1000000")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--cond", type=float, default=1e6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.sizes.split(",")]

    print(f"command: {' '.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    print(f"machine: 2-core CPU, shared ({platform.processor() or platform.machine()}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; n = {args.n}, k = {args.k}, cond = {args.cond:g}, float64, "
          f"median of {args.repeat}; load average at start {os.getloadavg()[0]:.2f}\n")
    print("| m | method | time (s) | speed vs lstsq | iterations | ‖AX−B‖/‖B‖ | Δ‖r‖ vs gelsy | ‖Aᵀr‖/(‖A‖‖r‖) |")
    print("|---|---|---|---|---|---|---|---|")
    split = []
    for m in sizes:
        A, B = problem(m, args.n, args.k, args.cond)
        anorm, bnorm = A.norm(), B.norm()
        base = res_ref = None
        for name, fn in METHODS.items():
            t, (X, info) = median_time(lambda: fn(A, B), args.repeat)
            r = A @ X - B
            rn = r.norm(dim=0)
            normal = float(((A.mT @ r).norm(dim=0) / (anorm * rn)).max())
            if base is None:
                base, res_ref = t, rn
            its = "–" if info is None else str(max(info["iterations"]))
            print(f"| {m:,} | {name} | {t:.3f} | {base / t:.2f}× | {its} | {float(rn.norm() / bnorm):.6e} | "
                  f"{float(((rn - res_ref).abs() / res_ref).max()):.1e} | {normal:.1e} |", flush=True)
        Z, U = torch.randn(args.n, args.k, dtype=F64), torch.randn(m, args.k, dtype=F64)
        t_pass, _ = median_time(lambda: (A @ Z, A.mT @ U), max(args.repeat, 5))
        t_cs, (SA, _) = median_time(lambda: _countsketch(A, B, 4 * args.n, torch.Generator().manual_seed(0)), args.repeat)
        t_srht, _ = median_time(lambda: _srht(A, B, 4 * args.n, torch.Generator().manual_seed(0)), args.repeat)
        t_qr, _ = median_time(lambda: torch.linalg.qr(SA), max(args.repeat, 5))
        split.append((m, t_pass, t_cs, t_srht, t_qr))
        del A, B, X, r, U

    print("\n| m | A·Z + Aᵀ·U (one LSQR iteration) | CountSketch s=4n | SRHT s=4n | QR of S·A (4n × n) |")
    print("|---|---|---|---|---|")
    for m, t_pass, t_cs, t_srht, t_qr in split:
        print(f"| {m:,} | {t_pass * 1e3:.1f} ms | {t_cs * 1e3:.1f} ms | {t_srht * 1e3:.1f} ms | {t_qr * 1e3:.2f} ms |")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
