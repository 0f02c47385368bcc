"""The generated Triton kernels against PyTorch's attention on one CUDA GPU, as ratios from one run.

    .venv/bin/python benchmarks/gpu_attention.py [--n 1024 4096 16384 65536] [--d 64 128] [--out FILE.md]

Per sequence length n and head dim d (bf16, batch 1, 16 heads, median of do_bench's repetitions):
  exact            our forward / fwd+bwd vs SDPA's flash backend (causal and not)
  block-sparse     10% of 128×128 key blocks per query block, all passed as full blocks, vs dense
                   SDPA-flash and vs FlexAttention (compiled) given the very same block lists
  window           causal band of 256 keys + 4 sink keys, forward, vs causal SDPA-flash and vs
                   FlexAttention with the same mask_mod
  top-k            64 keys per row (the PyTorch selection included), forward, vs causal SDPA-flash
  preconditioned   row-equilibrate forward vs SDPA-flash
  conv-basis       k = 16 start columns, forward through its op (causal and not): the start search and the
                   FFT apply in PyTorch (torch.fft), the start columns, the normalisation and the exact
                   rows in the generated kernels; vs SDPA-flash, and (n ≤ 16k) vs the same op's PyTorch
                   reference
A ratio is baseline time / our time (> 1: ours is faster). Goals (issue 9): exact ≥ 0.9× SDPA-flash
forward; block-sparse at 10% ≥ 5× dense SDPA at 16k and ≥ 1.0× FlexAttention; conv-basis (k ≤ 16)
≥ 3× SDPA at 64k. Without a CUDA device it prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from triton.testing import do_bench

from attnrewrite import kernels
from attnrewrite.variants import conv_basis, exact, preconditioned, sparse

HEADS, WINDOW, SINKS, BLOCK, DENSITY = 16, 256, 4, 128, 0.10


def bench(fn) -> float:
    """Median milliseconds of fn (triton.testing.do_bench)."""
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def sdpa_flash(q, k, v, causal):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def random_blocks(n: int, device) -> torch.Tensor:
    """(1, HEADS, n/BLOCK, n/BLOCK) bool: DENSITY of the key blocks per query block, the diagonal always kept."""
    nb = n // BLOCK
    g = torch.Generator(device="cpu").manual_seed(0)
    keep = torch.rand(1, HEADS, nb, nb, generator=g) < DENSITY
    keep |= torch.eye(nb, dtype=torch.bool)
    return keep.to(device)


def rows_for(n: int, d: int, fwd_bwd: bool = True):
    dev = "cuda"
    q, k, v = (torch.randn(1, HEADS, n, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    scale = d ** -0.5
    rows = []

    def add(name, ours, base, base_name):
        t_ours, t_base = bench(ours), bench(base)
        rows.append((name, n, d, base_name, t_base, t_ours, t_base / t_ours))

    for causal in (False, True):
        args = (q, k, v, None, scale, 0.0, causal, 0.0)
        add(f"exact fwd{' causal' if causal else ''}", lambda: kernels.forward(exact.VARIANT.kernel, args),
            lambda: sdpa_flash(q, k, v, causal), "sdpa-flash")
        if fwd_bwd:
            g = torch.randn_like(q)
            qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))

            def base_fb():
                sdpa_flash(qr, kr, vr, causal).backward(g)

            def ours_fb():
                kernels.forward(exact.VARIANT.kernel, args)
                kernels.backward(exact.VARIANT.kernel, g, args)
            add(f"exact fwd+bwd{' causal' if causal else ''}", ours_fb, base_fb, "sdpa-flash")

    flex = torch.compile(flex_attention)
    keep = random_blocks(n, q.device)
    layout = kernels.block_lists(keep, keep)                   # every kept block full
    empty = torch.zeros_like(layout[0])
    mask = BlockMask.from_kv_blocks(empty, layout[1], layout[2], layout[3], BLOCK_SIZE=BLOCK)
    add("block-sparse 10% fwd", lambda: kernels.block_sparse_attention(q, k, v, layout, BLOCK, BLOCK),
        lambda: sdpa_flash(q, k, v, False), "sdpa-flash dense")
    add("block-sparse 10% fwd", lambda: kernels.block_sparse_attention(q, k, v, layout, BLOCK, BLOCK),
        lambda: flex(q, k, v, block_mask=mask), "flex (same blocks)")

    def window_mod(b, h, qi, ki):
        return (ki <= qi) & ((qi - ki < WINDOW) | (ki < SINKS))
    wmask = create_block_mask(window_mod, 1, 1, n, n, device="cuda")
    wargs = (q, k, v, None, scale, 0.0, True, 0.0, "window", 64, WINDOW, SINKS, "backward", 64, 0.25, 1.0)
    add("window 256+4 fwd", lambda: kernels.forward(sparse.VARIANT.kernel, wargs),
        lambda: sdpa_flash(q, k, v, True), "sdpa-flash causal")
    add("window 256+4 fwd", lambda: kernels.forward(sparse.VARIANT.kernel, wargs),
        lambda: flex(q, k, v, block_mask=wmask), "flex (same mask)")

    targs = (q, k, v, None, scale, 0.0, True, 0.0, "topk", 64, WINDOW, SINKS, "auto", 64, 0.25, 1.0)
    if n <= 16384:                                             # the PyTorch selection scores every key
        add("sparse top-k 64 fwd (incl. PyTorch selection)", lambda: kernels.forward(sparse.VARIANT.kernel, targs),
            lambda: sdpa_flash(q, k, v, True), "sdpa-flash causal")
    pargs = (q, k, v, None, scale, 0.0, False, 0.0, "row-equilibrate", [1.0])
    add("preconditioned fwd", lambda: kernels.forward(preconditioned.VARIANT.kernel, pargs),
        lambda: sdpa_flash(q, k, v, False), "sdpa-flash")
    for causal in (True, False):
        cargs = (q, k, v, None, scale, 0.0, causal, 0.0, 16, None, 0.0)
        name = f"conv-basis k=16 fwd{' causal' if causal else ''} (kernels + torch.fft)"
        add(name, lambda: torch.ops.attnrewrite.conv_basis_attention(*cargs),
            lambda: sdpa_flash(q, k, v, causal), f"sdpa-flash{' causal' if causal else ''}")
        if n <= 16384:                                         # the PyTorch reference grows fast
            add(name, lambda: torch.ops.attnrewrite.conv_basis_attention(*cargs),
                lambda: conv_basis.reference(*cargs), "its PyTorch reference")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--d", type=int, nargs="+", default=[64, 128])
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--out", help="also write the table (markdown) here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_attention: no CUDA device here; nothing measured")
        return 0
    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, batch 1, {HEADS} heads",
             "", "| kernel | n | d | baseline | baseline ms | ours ms | ratio (baseline/ours) |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for n in args.n:
        for d in args.d:
            for row in rows_for(n, d, fwd_bwd=not args.no_backward):
                line = "| {} | {} | {} | {} | {:.3f} | {:.3f} | {:.2f}× |".format(*row)
                lines.append(line)
                print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
