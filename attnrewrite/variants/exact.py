"""exact — the same attention, on the op every kernel will back.

Math: O = softmax(scale·QKᵀ [soft-capped] + bias) V, softmax in fp32 for half inputs.
Error: float round-off only. This file is the PyTorch reference; the flash-style Triton
kernel (online softmax, O(n) memory) plugs in as this op's CUDA implementation.
"""
from __future__ import annotations

import torch

from .base import define_attention_op, expand_kv, masked_scores, safe_softmax

NAME = "exact"
OP_NAME = "exact_attention"
PARAMS: dict = {}          # no tunable parameters


def reference(q, k, v, mask, scale: float, softcap: float, causal: bool, dropout_p: float):
    p = safe_softmax(masked_scores(q, k, scale, softcap, mask, causal))
    if dropout_p:
        p = torch.nn.functional.dropout(p, dropout_p, training=True)
    out = torch.matmul(p, expand_kv(q, v).to(p.dtype))
    return out.to(q.dtype)


op = define_attention_op(OP_NAME, reference)


def op_args(site, options: dict) -> tuple:
    """Variant parameters appended after the normal form (none for exact)."""
    return ()


def diagnostics(q, k, v, mask, scale, softcap, causal, options: dict) -> dict:
    return {}
