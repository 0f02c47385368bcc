"""Every variant's op against torch SDPA and FlexAttention on CPU, in one process run.

    .venv/bin/python benchmarks/bench_cpu_variants.py [--max-n 16384] [--threads 2] [--repeat 3] [--methods …]

Causal self-attention, B = 1, H = 4, d = 64, float32, no grad; n = 1024, 2048, … up to --max-n
(65536 for the long run). Columns, each a time ratio t(SDPA) / t(method) (> 1: faster than SDPA)
and the call's peak memory:
  sdpa               F.scaled_dot_product_attention(is_causal=True) (its absolute time is printed)
  exact              attnrewrite::exact_attention
  window             sparse mode=window, 256 keys + 4 sinks
  flex window        torch.compile(flex_attention) on the same window as a BlockMask (128-blocks)
  block              sparse mode=block, block 64, density 0.1, select=pooled
  flex block         flex_attention on the *same* key blocks the op chose (BlockMask.from_kv_blocks,
                     64-blocks, causal mask_mod); the BlockMask is built before timing, so flex
                     is timed without any block selection
  block exact-select sparse mode=block, block 64, density 0.1, select=exact (dense scores to rank)
  topk               sparse mode=topk, k 64, select=pooled (candidates: 10% of the key blocks)
  conv-basis         conv_basis k = 16 (its defaults otherwise)
  preconditioned     preconditioned mode=output-norm, gain 1
Time: the median of --repeat calls after one warm-up (flex: after compiling). A method whose call
takes longer than --max-seconds is not run at larger n. Peak memory: glibc's mmap threshold is
set to 64 KiB for one extra call (freed large blocks go back to the OS) after malloc_trim, the RSS
high-water mark is reset through /proc/self/clear_refs, and the peak minus the RSS before the
call is reported.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnrewrite.variants import conv_basis, exact, preconditioned, sparse  # noqa: E402

H, D = 4, 64
WINDOW, SINKS, FLEX_BLOCK = 256, 4, 128
BLOCK = {"mode": "block", "block": 64, "density": 0.1, "select": "pooled"}
OPS = {
    "exact": (exact, {}),
    "window": (sparse, {"mode": "window", "window": WINDOW, "sinks": SINKS}),
    "block": (sparse, BLOCK),
    "block exact-select": (sparse, {**BLOCK, "select": "exact"}),
    "topk": (sparse, {"mode": "topk", "k": 64, "block": 64, "density": 0.1, "select": "pooled"}),
    "conv-basis": (conv_basis, {"k": 16}),
    "preconditioned": (preconditioned, {"mode": "output-norm", "gain": 1.0}),
}
COLUMNS = ["exact", "window", "flex window", "block", "flex block", "block exact-select", "topk",
           "conv-basis", "preconditioned"]
_libc = ctypes.CDLL("libc.so.6")                                # glibc: M_MMAP_THRESHOLD = -3


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def measure(call, repeat: int) -> tuple[float, float]:
    """(median seconds, peak MB) of call()."""
    call()                                                       # warm-up (and compile)
    _libc.mallopt(-3, 1 << 16)
    _libc.malloc_trim(0)                                         # free heap pages leave the RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                             # reset the RSS high-water mark
    base = rss_kb("VmRSS:")
    call()
    peak = (rss_kb("VmHWM:") - base) / 1024
    _libc.mallopt(-3, 1 << 25)
    _libc.mallopt(-1, 1 << 30)          # M_TRIM_THRESHOLD: keep freed heap pages (else every chunk page-faults)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times), max(peak, 0.0)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window_mask(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & ((q_idx - kv_idx < WINDOW) | (kv_idx < SINKS))


def blockmask(kv_num, kv_idx, n: int, size: int, mask_mod) -> BlockMask:
    return BlockMask.from_kv_blocks(kv_num.to(torch.int32), kv_idx.to(torch.int32), BLOCK_SIZE=size,
                                    mask_mod=mask_mod, seq_lengths=(n, n))


def window_blocks(n: int) -> BlockMask:
    """The window's key blocks per query block: the sink block and the band's blocks."""
    nb = -(-n // FLEX_BLOCK)
    num = torch.zeros(1, 1, nb, dtype=torch.int64)
    idx = torch.zeros(1, 1, nb, nb, dtype=torch.int64)
    for i in range(nb):
        lo = max(0, (i * FLEX_BLOCK - WINDOW + 1) // FLEX_BLOCK)
        keep = sorted({0, *range(lo, i + 1)})
        num[..., i] = len(keep)
        idx[..., i, :len(keep)] = torch.tensor(keep)
    return blockmask(num, idx, n, FLEX_BLOCK, window_mask)


def chosen_blocks(q, k, n: int) -> BlockMask:
    """The key blocks sparse mode=block (select=pooled) keeps for q, k, as a BlockMask."""
    o = sparse._options(BLOCK)
    plan = sparse._block_plan(q, k, None, True, o, D ** -0.5, 0.0)
    idx, valid = sparse._select(plan, o, 0, n)
    nk = -(-n // o["block"])
    order = (~valid).to(torch.int8).argsort(dim=-1, stable=True)     # valid entries first
    kv = torch.zeros(*idx.shape[:-1], nk, dtype=torch.int64)
    kv[..., :idx.shape[-1]] = idx.gather(-1, order)
    return blockmask(valid.sum(-1), kv, n, o["block"], causal)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-n", type=int, default=16384)
    ap.add_argument("--min-n", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=30.0)
    ap.add_argument("--methods", default=",".join(COLUMNS), help="a comma-separated subset of the columns")
    a = ap.parse_args()
    columns = [c for c in a.methods.split(",") if c in COLUMNS]
    warnings.simplefilter("ignore")
    torch.set_num_threads(a.threads)
    torch._dynamo.config.recompile_limit = 64                    # one compile per n and mask (else eager past 8)
    flex = torch.compile(flex_attention, dynamic=False)
    print(f"causal, B = 1, H = {H}, d = {D}, float32, {a.threads} threads; each cell: t(SDPA) / t(method) "
          f"and peak MB (median of {a.repeat})\n")
    print("| n | sdpa s | sdpa MB | " + " | ".join(columns) + " |")
    print("|" + "---|" * (3 + len(columns)))
    slow = set()
    n = a.min_n
    while n <= a.max_n:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, H, n, D) for _ in range(3))
        calls = {name: (lambda mod=mod, opts=opts: mod.op(q, k, v, None, D ** -0.5, 0.0, True, 0.0,
                                                         *mod.op_args(None, opts)))
                 for name, (mod, opts) in OPS.items()}
        with torch.no_grad():
            wmask, bmask = window_blocks(n), chosen_blocks(q, k, n)
            calls["flex window"] = lambda: flex(q, k, v, block_mask=wmask)
            calls["flex block"] = lambda: flex(q, k, v, block_mask=bmask)
            t_sdpa, m_sdpa = measure(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), a.repeat)
            cells = []
            for name in columns:
                if name in slow:
                    cells.append("—")
                    continue
                try:
                    t, m = measure(calls[name], a.repeat)
                except Exception as e:  # noqa: BLE001 - report the failure in the table, keep going
                    print(f"  {name} at n={n}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
                    slow.add(name)
                    cells.append("fails")
                    continue
                cells.append(f"{t_sdpa / t:.2f}× / {m:.0f}")
                if t > a.max_seconds:
                    slow.add(name)
        print(f"| {n} | {t_sdpa:.3f} | {m_sdpa:.0f} | " + " | ".join(cells) + " |", flush=True)
        n *= 2


if __name__ == "__main__":
    main()
