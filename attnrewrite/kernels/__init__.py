"""Generated Triton kernels behind the variant ops.

Each template (exact.py, window.py, topk.py, block_sparse.py, preconditioned.py, conv_basis.py) is a
module of `@triton.jit` kernels importing its helpers from common.py, specialised through `tl.constexpr`
arguments that generate.py's KernelConfig fills in at launch; dispatch.py decides, per op call, which
configuration runs or why the PyTorch reference does. See docs/kernels.md.
"""
from .dispatch import (backward, block_lists, block_sparse_attention, counting, describe, forward, interpreting,
                       reason, select, target_for)
from .generate import KernelConfig, compile_aot, emit, load, specialise, write

__all__ = ["KernelConfig", "backward", "block_lists", "block_sparse_attention", "compile_aot", "counting", "describe",
           "emit", "forward", "interpreting", "load", "reason", "select", "specialise", "target_for", "write"]
