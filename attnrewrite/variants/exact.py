"""exact — the same attention, on the op every kernel will back.

Math: O = softmax(scale·QKᵀ [soft-capped] + bias) V, softmax in fp32 for half inputs.
Error: float round-off only. This file is the PyTorch reference; the flash-style Triton
kernel (online softmax, O(n) memory) plugs in as this op's CUDA implementation.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..kernels.dispatch import EXACT as EXACT_KERNEL
from ..passes import onnx_graph
from ..passes import onnx_rewrite as R
from . import costing
from .impl import Implementation, differentiable
from .base import (BACKWARD_OPS, IMPLEMENTATIONS, Param, define_attention_op, op_args_from, expand_kv, kv_mismatch, masked_scores,
                   safe_softmax, Variant)

NAME = "exact"
OP_NAME = "exact_attention"
ONNX_ATTENTION = ("auto", "standard", "contrib", "decomposed")
PARAMS = {                 # no numerical parameters: only how the ONNX lowering spells the op
    "onnx_attention": Param(
        "auto", str, "ONNX lowering: auto (the Attention op from opset 23, else decomposed) | standard (the "
        "opset-23 Attention op; a model at opset 18-22 is raised to 23) | contrib (com.microsoft "
        "GroupQueryAttention / MultiHeadAttention, onnxruntime only; decomposed where they cannot "
        "express the site) | decomposed (MatMul, Softmax, MatMul)", choices=ONNX_ATTENTION),
}


def reference(q, k, v, mask, scale: float, softcap: float, causal: bool, dropout_p: float):
    p = safe_softmax(masked_scores(q, k, scale, softcap, mask, causal))
    if dropout_p:
        p = torch.nn.functional.dropout(p, dropout_p, training=True)
    out = torch.matmul(p, expand_kv(q, v).to(p.dtype))
    return out.to(q.dtype)


SDPA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def sdpa_covers(q, k, v, mask, scale: float, softcap: float, causal: bool, dropout_p: float):
    """None when scaled_dot_product_attention computes this call, else why it cannot."""
    if softcap:
        return "soft-cap: scaled_dot_product_attention has no soft-cap"
    if q.dtype not in SDPA_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}: scaled_dot_product_attention needs one float dtype"
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        return f"a {mask.dtype} mask is neither boolean nor additive"
    return kv_mismatch(q, k)


def sdpa(q, k, v, mask, scale: float, softcap: float, causal: bool, dropout_p: float):
    """The normal form on torch's fused attention (flash / efficient / math, as torch picks):
    causal bottom-right as is_causal when Lq == Lk and there is no mask, else folded into the
    mask; GQA through enable_gqa; a batch-1 K/V expanded; rows with no visible key are zeros,
    as SDPA gives them."""
    lq, lk = q.shape[-2], k.shape[-2]
    k, v = k.expand(q.shape[0], *k.shape[1:]), v.expand(q.shape[0], *v.shape[1:])     # (a batch-1 K/V)
    # symbolic lengths (a dynamic graph): is_causal only where Lq == Lk is known without a guard
    is_causal = bool(causal) and mask is None and statically_known_true(lq == lk)
    if causal and not is_causal:
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        if mask is None:
            mask = keep
        elif mask.dtype == torch.bool:
            mask = mask & keep
        else:
            mask = mask.to(q.dtype).masked_fill(~keep, -math.inf)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=float(dropout_p), is_causal=is_causal, scale=float(scale),
        enable_gqa=q.shape[1] != k.shape[1])


SDPA = Implementation("sdpa", sdpa_covers, sdpa, lower=sdpa)

OP_ARGS = ()                 # no parameters after the normal form
op_args = op_args_from(OP_ARGS, PARAMS)
op = define_attention_op(OP_NAME, reference, OP_ARGS, fast=(SDPA,), kernel=EXACT_KERNEL)


def attention(q, k, v, mask, scale: float, softcap: float, causal: bool, dropout_p: float):
    """Exact attention as this op computes it here — its implementation table, differentiable
    (for a variant that falls back to exact: the same numbers and dropout draws as the exact op)."""
    args = (q, k, v, mask, scale, softcap, causal, dropout_p)
    run, _ = differentiable(IMPLEMENTATIONS[OP_NAME], args)
    return run(*args)


backward_op = BACKWARD_OPS[OP_NAME]


def diagnostics(q, k, v, mask, scale, softcap, causal, options: dict) -> dict:
    return {}


def onnx_lower(b, site, q, k, v, mask, options: dict) -> str:
    """ONNX lowering, as the `onnx_attention` option says (see PARAMS and docs/onnx.md).

    `b` is an `onnx_graph.Builder`; q (B, H, Lq, D), k/v (B, Hkv, Lk, D) and the mask
    (boolean: True = attend, or additive, or None) are value names in the normal form.
    Returns the (B, H, Lq, Dv) output. A constant mask that is exactly the causal pattern
    becomes the causal flag. Other variants follow the same shape, reusing the helpers in
    `attnrewrite.passes.onnx_rewrite`.
    """
    causal = bool(site.causal)
    if not causal and R.constant_causal(b, mask):
        mask, causal = None, True
    how = options.get("onnx_attention", "auto")
    if how == "auto":
        how = "standard" if b.opset >= 23 else "decomposed"
    if how == "contrib":
        y = _onnx_contrib(b, site, q, k, v, mask, causal)
        if y is not None:
            return y
    elif how == "standard":
        return _onnx_standard(b, site, q, k, v, mask, causal)
    return _onnx_decomposed(b, site, q, k, v, mask, causal)


def _onnx_kv(b, site, k, v):
    """k/v repeated to the query head count (GQA/MQA) when the counts are known and differ."""
    if isinstance(site.heads, int) and isinstance(site.kv_heads, int) and site.heads != site.kv_heads:
        return R.repeat_kv(b, k, site.heads, site.kv_heads), R.repeat_kv(b, v, site.heads, site.kv_heads)
    return k, v


def _onnx_decomposed(b, site, q, k, v, mask, causal: bool) -> str:
    """softmax(scale·q·kᵀ [soft-capped] + mask)·v: the scale on q, one mask, and a NaN guard
    on the output only where a row can lose every key; a long causal site without another
    mask in row blocks (`_onnx_causal_blocks`)."""
    k, v = _onnx_kv(b, site, k, v)
    if causal and mask is None:
        y = _onnx_causal_blocks(b, site, q, k, v)
        if y is not None:
            return y
    p = b.op("Softmax", R.decomposed_scores(b, site, q, k, mask, causal), axis=-1)
    y = b.op("MatMul", p, b.cast(v, b.dtype(p)))
    return R.zero_nan_rows(b, y) if R.rows_can_die(b, site, mask, causal) else y


CAUSAL_BLOCKS = 4          # query blocks of a long causal site (the decomposed form)
CAUSAL_MIN_LEN = 256       # ... from this static length on


def _onnx_causal_blocks(b, site, q, k, v) -> str | None:
    """Causal attention with static lengths and no other mask, its queries in CAUSAL_BLOCKS
    row blocks: block [r0, r1) scores only the keys up to its last row's diagonal (r1 + Lk − Lq),
    the keys after it being removed for every row of the block. The same numbers as the single
    product — a removed key weighs exactly 0 either way — for about (B + 1) / (2B) of its work
    and 1 / B of its largest score tensor. None where it does not apply."""
    lq, lk = site.q_len, site.kv_len
    if not (isinstance(lq, int) and isinstance(lk, int) and CAUSAL_MIN_LEN <= lq <= lk):
        return None
    i64 = lambda x: b.const(np.array(x, np.int64))                 # noqa: E731 - a 0-d int64
    scale = R.resolve_scale(b, site)
    if scale != 1.0:                          # (T5 scales nothing)
        q = b.op("Mul", q, b.scalar_like(scale, q))
    kt = b.op("Transpose", k, perm=[0, 1, 3, 2])
    bounds = sorted({round(i * lq / CAUSAL_BLOCKS) for i in range(CAUSAL_BLOCKS + 1)})
    outs = []
    for r0, r1 in zip(bounds, bounds[1:]):
        end = r1 + lk - lq                                         # keys 0 … end − 1 reach some row
        s = b.op("MatMul", b.op("Slice", q, b.ints(r0), b.ints(r1), b.ints(2)),
                 b.op("Slice", kt, b.ints(0), b.ints(end), b.ints(3)))
        if site.softcap:
            cap = b.scalar_like(float(site.softcap), s)
            s = b.op("Mul", b.op("Tanh", b.op("Div", s, cap)), cap)
        rows = b.op("Unsqueeze", b.op("Range", i64(r0 + lk - lq), i64(end), i64(1)), b.ints(1))
        keep = b.op("LessOrEqual", b.op("Range", i64(0), i64(end), i64(1)), rows, dtype=R.TensorProto.BOOL)
        s = b.op("Add", s, b.op("Where", keep, b.scalar_like(0.0, s), b.scalar_like(-math.inf, s)))
        p = b.op("Softmax", s, axis=-1)
        outs.append(b.op("MatMul", p, b.cast(b.op("Slice", v, b.ints(0), b.ints(end), b.ints(2)), b.dtype(p))))
    return b.op("Concat", *outs, axis=2)


def _onnx_standard(b, site, q, k, v, mask, causal: bool) -> str:
    """The standard `Attention` op (opset 23; a model at 18-22 is raised to it).

    onnxruntime's Attention reads an additive entry equal to the dtype's lowest value as
    "removed" (a row of them gives zeros where the reference spreads the row evenly), so such
    entries are moved one step up; -inf stays -inf.
    """
    if b.opset < 18:
        raise R.Unsupported(f"onnx_attention=standard: opset {b.opset} < 18 cannot be raised to 23 safely")
    b.require_opset(23)
    attrs = {"scale": R.resolve_scale(b, site)}
    if site.softcap:
        attrs["softcap"] = float(site.softcap)
    if causal and mask is None and site.q_len is not None and site.q_len == site.kv_len:
        attrs["is_causal"] = 1               # same diagonal in every opset when Lq == Lk
    elif causal:
        mask = R.with_causal(b, q, k, mask)  # bottom-right, stated explicitly
    if mask is not None and b.dtype(mask) != R.TensorProto.BOOL:
        mask = _lowest_moved_up(b, b.cast(mask, b.dtype(q)))
    if mask is not None:
        mask = R.full_query_rows(b, mask, q)
    return b.op("Attention", q, k, v, *([mask] if mask is not None else []), **attrs)


def _lowest_moved_up(b, mask: str) -> str:
    """An additive mask with its dtype's lowest value replaced by the next one up (a constant: folded)."""
    np_dt = R.helper.tensor_dtype_to_np_dtype(b.dtype(mask))
    lowest = np.finfo(np_dt).min
    up = np.nextafter(lowest, np_dt.type(0))
    a = onnx_graph.constant(b, mask)
    if a is not None:
        return b.const(np.where(a == lowest, up, a).astype(np_dt)) if (a == lowest).any() else mask
    hit = b.op("Equal", mask, b.scalar_like(float(lowest), mask), dtype=R.TensorProto.BOOL)
    return b.op("Where", hit, b.const(np.array(up, np_dt)), mask)


def _onnx_contrib(b, site, q, k, v, mask, causal: bool) -> str | None:
    """onnxruntime's com.microsoft ops, or None where they cannot express the site.

    GroupQueryAttention: causal self-attention (Lq == Lk) with no other mask; kv heads read
    as they are, soft-cap supported. MultiHeadAttention: everything else without soft-cap,
    the mask as an additive (B|1, H|1, Lq, Lk) bias, causal as `unidirectional` when Lq == Lk.
    Both take (B, L, heads·D); the output comes back to (B, H, Lq, Dv).
    """
    TP = R.TensorProto
    heads, kv_heads = site.heads, site.kv_heads
    if not (isinstance(heads, int) and isinstance(kv_heads, int)):
        return None
    dq, dv = b.g.shape(q), b.g.shape(v)
    if not (dq and dv and isinstance(dq[-1], int) and dq[-1] == dv[-1]):
        return None                            # Dv ≠ D, or unknown
    same_len = site.q_len is not None and site.q_len == site.kv_len
    flat = lambda x: b.op("Reshape", b.op("Transpose", x, perm=[0, 2, 1, 3]), b.ints(0, 0, -1))  # noqa: E731
    attrs = {"num_heads": heads, "scale": R.resolve_scale(b, site)}
    if causal and mask is None and same_len:
        lk = b.shape_of(k, 2, 3)
        total = b.cast(b.op("Squeeze", lk, b.ints(0)), TP.INT32)
        seqlens = b.op("Expand", b.cast(b.op("Sub", lk, b.ints(1)), TP.INT32), b.shape_of(q, 0, 1))
        if site.softcap:
            attrs["softcap"] = float(site.softcap)
        y = b.op("GroupQueryAttention", flat(q), flat(k), flat(v), "", "", seqlens, total,
                 domain="com.microsoft", kv_num_heads=kv_heads, **attrs)
    elif site.softcap:
        return None
    else:
        k, v = _onnx_kv(b, site, k, v)
        if causal and same_len:
            attrs["unidirectional"] = 1
        rank = None if mask is None else b.g.rank(mask)
        if causal and not same_len:
            mask, rank = R.with_causal(b, q, k, mask), max(rank or 2, 2)
        bias = None
        if mask is not None:
            if rank is None:
                return None
            if b.dtype(mask) == TP.BOOL:
                bias = b.op("Where", mask, b.scalar_like(0.0, q), b.scalar_like(-math.inf, q))
            else:
                bias = _lowest_moved_up(b, b.cast(mask, b.dtype(q)))
            if rank < 4:
                bias = b.op("Unsqueeze", bias, b.ints(*range(4 - rank)))
            bias = R.full_query_rows(b, bias, q)
        y = b.op("MultiHeadAttention", flat(q), flat(k), flat(v), "", "", *([bias] if bias else []),
                 domain="com.microsoft", **attrs)
        if R.rows_can_die(b, site, mask, causal):
            y = R.zero_nan_rows(b, y)
    return b.op("Transpose", b.op("Reshape", y, b.ints(0, 0, heads, -1)), perm=[0, 2, 1, 3])


VARIANT = Variant("exact", OP_NAME, PARAMS, reference, op, op_args, diagnostics,
                  onnx_lower=onnx_lower, cost_model=costing.exact_model,
                  exact_check=True)
