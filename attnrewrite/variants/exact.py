"""exact — the same attention, on the op every kernel will back.

Math: O = softmax(scale·QKᵀ [soft-capped] + bias) V, softmax in fp32 for half inputs.
Error: float round-off only. This file is the PyTorch reference; the flash-style Triton
kernel (online softmax, O(n) memory) plugs in as this op's CUDA implementation.
"""
from __future__ import annotations

import torch

from ..passes import onnx_rewrite as R
from .base import BACKWARD_OPS, define_attention_op, expand_kv, masked_scores, safe_softmax

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
backward_op = BACKWARD_OPS[OP_NAME]


def op_args(site, options: dict) -> tuple:
    """Variant parameters appended after the normal form (none for exact)."""
    return ()


def diagnostics(q, k, v, mask, scale, softcap, causal, options: dict) -> dict:
    return {}


def onnx_lower(b, site, q, k, v, mask, options: dict) -> str:
    """ONNX lowering: the standard `Attention` op from opset 23, else the decomposed form.

    `b` is an `onnx_rewrite.Builder`; q (B, H, Lq, D), k/v (B, Hkv, Lk, D) and the mask
    (boolean: True = attend, or additive, or None) are value names in the normal form.
    Returns the (B, H, Lq, Dv) output. Other variants follow the same shape, reusing
    the helpers in `attnrewrite.passes.onnx_rewrite`.
    """
    causal = bool(site.causal)
    if b.opset >= 23:
        attrs = {"scale": R.resolve_scale(b, site)}
        if site.softcap:
            attrs["softcap"] = float(site.softcap)
        if causal and mask is None and site.q_len is not None and site.q_len == site.kv_len:
            attrs["is_causal"] = 1               # same diagonal in every opset when Lq == Lk
        elif causal:
            mask = R.with_causal(b, q, k, mask)  # bottom-right, stated explicitly
        if mask is not None and b.dtype(mask) != R.TensorProto.BOOL:
            mask = b.cast(mask, b.dtype(q))
        if mask is not None:
            mask = R.full_query_rows(b, mask, q)
        return b.op("Attention", q, k, v, *([mask] if mask is not None else []), **attrs)
    heads, kv_heads = site.heads, site.kv_heads
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads != kv_heads:
        k, v = R.repeat_kv(b, k, heads, kv_heads), R.repeat_kv(b, v, heads, kv_heads)
    p = R.safe_softmax(b, R.decomposed_scores(b, site, q, k, mask, causal))
    return b.op("MatMul", p, b.cast(v, b.dtype(p)))
