"""Op-level time and peak memory of the sparse variant vs torch SDPA on CPU (causal, B = H = 1, d = 64).

    .venv/bin/python benchmarks/bench_sparse.py [--sizes 1024,2048,...,32768] [--methods sdpa,topk,window,block]

Each (method, n) runs in a fresh subprocess (no grad). Peak memory: one call with glibc's mmap
threshold fixed at 64 KiB (freed large blocks return to the OS), RSS high-water mark minus
the RSS before the call (inputs and warm-up resident): what the call itself holds at its peak.
Time: then the best of --repeat calls (1 above n = 4096) with the usual heap reuse.
topk (k=64) and block (b=64, density 0.25) score each query chunk against every key:
O(n²d) work, O(chunk·n) memory. window (256 + 4 sinks) gathers only its keys: O(n·w·d).
block-pooled ranks key blocks by block means of q and k (O(n²d/b²)) and scores only the kept
blocks; topk-pooled takes its k keys among 10% of the key blocks chosen that way.
(bench_cpu_variants.py runs every variant with 4 heads against SDPA and FlexAttention in one process.)
"""
import argparse
import json
import resource
import subprocess
import sys
import time

METHODS = {"sdpa": None, "topk": {"mode": "topk", "k": 64},
           "window": {"mode": "window", "window": 256, "sinks": 4},
           "block": {"mode": "block", "block": 64, "density": 0.25},
           "topk-pooled": {"mode": "topk", "k": 64, "block": 64, "density": 0.1, "select": "pooled"},
           "block-pooled": {"mode": "block", "block": 64, "density": 0.25, "select": "pooled"}}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(method: str, n: int, repeat: int) -> dict:
    import ctypes

    import torch

    from attnrewrite.variants import sparse
    torch.manual_seed(0)
    mallopt = ctypes.CDLL("libc.so.6").mallopt                   # glibc: M_MMAP_THRESHOLD = -3

    def call(q, k, v):
        if method == "sdpa":
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return sparse.op(q, k, v, None, q.shape[-1] ** -0.5, 0.0, True, 0.0, *sparse.op_args(None, METHODS[method]))

    with torch.no_grad():
        call(*(torch.randn(1, 1, 256, 64) for _ in range(3)))          # warm-up
        q, k, v = (torch.randn(1, 1, n, 64) for _ in range(3))
        # memory: with a fixed 64 KiB mmap threshold every freed large block goes back to the OS,
        # so the RSS high-water mark over one call is the call's live peak
        mallopt(-3, 1 << 16)
        base = rss_mb()
        call(q, k, v)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
        mallopt(-3, 1 << 25)                                            # time: heap reuse as usual
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            call(q, k, v)
            best = min(best, time.perf_counter() - t)
    return {"method": method, "n": n, "time_s": best, "peak_mb": max(peak, 0.0)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--methods", default="sdpa,topk,window,block,topk-pooled,block-pooled")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.repeat)))
        return
    print(f"{'n':>6} " + " ".join(f"{m + ' s':>10} {m + ' MB':>10}" for m in a.methods.split(",")), flush=True)
    for n in map(int, a.sizes.split(",")):
        cells = []
        for m in a.methods.split(","):
            repeat = a.repeat if n <= 4096 else 1
            out = subprocess.run([sys.executable, __file__, "--child", m, str(n), "--repeat", str(repeat)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            cells.append(f"{r['time_s']:>10.3f} {r['peak_mb']:>10.1f}")
        print(f"{n:>6} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
