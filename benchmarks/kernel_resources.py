"""Registers, spills and shared memory of every generated kernel, compiled ahead of time for
sm_80 and sm_90 without a GPU (Triton's bundled ptxas and cuobjdump); writes benchmarks/KERNELS.md.

    .venv/bin/python benchmarks/kernel_resources.py [--out benchmarks/KERNELS.md]

Spills are the binary's local-memory bytes per thread (Triton kernels keep no local arrays, so
local memory is spill space); shared memory is Triton's dynamic allocation plus any static part.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import triton

from attnrewrite.kernels import KernelConfig, compile_aot

WINDOW = (("AFTER", 0), ("BEFORE", 255), ("SINKS", 4))


def configs():
    for d in (64, 128):
        for mask in ("none", "key", "additive", "boolean"):
            yield KernelConfig("exact", d, d, "bfloat16", causal=True, mask=mask, group=2)
        yield KernelConfig("exact", d, d, "float32", causal=True, mask="none", group=2)
    for d in (64, 128):
        yield KernelConfig("window", d, d, "bfloat16", causal=True, params=WINDOW)
        yield KernelConfig("block_sparse", d, d, "bfloat16", params=(("SPARSE_M", 128), ("SPARSE_N", 128)))
        yield KernelConfig("block_sparse", d, d, "bfloat16", causal=True, mask="key", group=2,
                           params=(("SPARSE_M", 64), ("SPARSE_N", 64)))
        yield KernelConfig("topk", d, d, "bfloat16", causal=True, mask="boolean")
        for eq in (False, True):
            yield KernelConfig("preconditioned", d, d, "bfloat16", mask="key", params=(("EQUILIBRATE", eq),))
        for work64 in (False, True):                       # conv-basis: float32 (FFT path) or float64 work
            yield KernelConfig("conv_basis", d, d, "bfloat16", causal=True, mask="key", group=2,
                               params=(("WORK_F64", work64),))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).with_name("KERNELS.md")))
    args = p.parse_args(argv)
    lines = ["# Generated kernels: registers, spills, shared memory (ahead-of-time compile, no GPU)", "",
             f"`.venv/bin/python benchmarks/kernel_resources.py` — triton {triton.__version__} "
             f"(bundled ptxas), {platform.machine()} host, no GPU. Tiles: forward BLOCK_M×BLOCK_N, "
             "backward likewise; limits: 163 KiB (sm_80) and 227 KiB (sm_90) of shared memory per block.", "",
             "| kernel | template | dtype | d | mask | tiles | warps | stages | arch | registers | spill bytes | shared bytes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    bad = 0
    for cfg in configs():
        s = cfg.settings()
        for arch in (80, 90):
            for r in compile_aot(cfg, arch):
                fwd = r["kernel"] == "attn_fwd" or r["kernel"] == "attn_bwd_delta"
                tiles = f"{s['FWD_BLOCK_M']}×{s['FWD_BLOCK_N']}" if fwd else f"{s['BWD_BLOCK_M']}×{s['BWD_BLOCK_N']}"
                if r["kernel"] == "attn_bwd_delta":
                    tiles = "64 rows"
                if cfg.template == "topk":                      # one query row per program
                    tiles = f"1×{s['FWD_BLOCK_N']}"
                if cfg.template == "conv_basis":                # rows of a head against a tile, no tl.dot
                    tiles = f"{s['FWD_BLOCK_M']} rows"
                template = cfg.template + "".join(f" {k}={v}" for k, v in cfg.params if k in ("EQUILIBRATE", "WORK_F64"))
                bad += r["spill_bytes"] > 0 or r["shared"] > r["shared_limit"]
                line = (f"| {r['kernel']} | {template} | {cfg.dtype} | {cfg.head_dim} | {cfg.mask} | {tiles} | "
                        f"{r['warps']} | {r['stages']} | {r['arch']} | {r['registers']} | {r['spill_bytes']} | {r['shared']} |")
                lines.append(line)
                print(line, flush=True)
    lines += ["", f"{bad} kernel(s) spill or exceed the shared-memory limit."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
