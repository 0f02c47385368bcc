"""An ONNX site's normal form: the values a variant's lowering reads, and its output mapped back.

`normal_form` builds, from the site's record (`onnx_walk.OnnxSite`), q (B, H, Lq, D), k/v
(B, Hkv, Lk, D) and one mask (boolean: True = attend, or additive) — a few
Transpose/Reshape/Unsqueeze/Where nodes, often none:

* a decomposed chain or an ONNX `Attention`: the operands as the products saw them,
  transposed by their perms, unsqueezed from rank 3, split by heads when the chain had
  them merged (`split_heads`), the masks brought to (B, H, Lq, Lk) and combined
  (`_combine_mask`), or replayed in order when a fill was finite (`_replay_mask`), and
  per-head scales put on q;
* a `com.microsoft` op: q, k, v projected and split by heads from (B, L, H·D), the key
  padding, GQA's valid lengths and the attention bias as one mask.

`finish` maps the variant's (B, H, Lq, Dv) output back to the site's own layout;
`unfinish` reads the site's output in that layout (for the probes). `Unsupported` is
what a site that cannot be lowered raises, here or in a variant's lowering.
"""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from ..site import AttentionSite
from .onnx_graph import Builder, Graph
from .onnx_walk import OnnxSite

MIN_OPSET = 13           # Unsqueeze/Squeeze/Slice with axes as inputs


class Unsupported(Exception):
    """The site cannot be lowered; it is kept as it is with this reason."""


# ---------------------------------------------------------------- normal form

def _heads_split(b: Builder, x: str, heads: int, bias=None) -> str:
    """(B, L, H·D) [+ bias] → (B, H, L, D)."""
    if bias is not None:
        x = b.op("Add", x, bias)
    return b.op("Transpose", b.op("Reshape", x, b.ints(0, 0, heads, -1)), perm=[0, 2, 1, 3])


def _slices(b: Builder, x: str, sizes: list[int], axis: int) -> list[str]:
    """Consecutive slices of `sizes` along `axis` (packed q|k|v biases or projections)."""
    out, start = [], 0
    for n in sizes:
        out.append(b.op("Slice", x, b.ints(start), b.ints(start + n), b.ints(axis)))
        start += n
    return out


def _hidden(g: Graph, name: str):
    s = g.shape(name)
    return s[-1] if s and isinstance(s[-1], int) else None


def _combine_mask(b: Builder, keeps: list, biases: list, like: str, convert=None):
    """One mask for the normal form: boolean when only boolean masks, else additive.

    `convert(value)` brings a mask value to the (B, H, Lq, Lk) layout (identity if None).
    """
    convert = convert or (lambda x: x)
    keeps = [convert(k) if keep else b.op("Not", convert(k)) for k, keep in keeps]
    keep = None
    for k in keeps:
        k = b.cast(k, TensorProto.BOOL)
        keep = k if keep is None else b.op("And", keep, k)
    if not biases:
        return keep
    dt = b.dtype(like)
    total = None
    for v, coef in biases:
        v = b.cast(convert(v), dt)
        if coef != 1.0:
            v = b.op("Mul", v, b.scalar_like(coef, v))
        total = v if total is None else b.op("Add", total, v)
    if keep is not None:
        total = b.op("Add", total, b.op("Where", keep, b.scalar_like(0.0, like), b.scalar_like(-math.inf, like)))
    return total


def _replay_mask(b: Builder, steps: list, like: str, convert) -> str:
    """The additive mask of a chain with finite fills, its steps replayed in order on a zero bias.

        where(keep, s, min) + pad      →  s + (where(keep, 0, min) + pad)

    exact wherever s + min rounds to min (|s| < 2^103 in float32): a row whose keys are all
    masked keeps the original's spread over min + 0 versus min + min = -inf.
    """
    dt = b.dtype(like)
    m = None
    for st in steps:
        if st[0] == "add":
            v = b.cast(convert(st[1]), dt)
            if st[2] != 1.0:
                v = b.op("Mul", v, b.scalar_like(st[2], like))
            m = v if m is None else b.op("Add", m, v)
        elif st[0] == "fill":
            cond, val = b.cast(convert(st[1]), TensorProto.BOOL), b.scalar_like(st[2], like)
            base = m if m is not None else b.scalar_like(0.0, like)
            m = b.op("Where", cond, val, base) if st[3] else b.op("Where", cond, base, val)
        elif m is not None:                                   # a scale after the first mask
            m = b.op("Mul", m, b.scalar_like(st[1], like))
    return m


def split_heads(b: Builder, x: str, heads: int) -> str:
    """(B·H, L, D) → (B, H, L, D), n = b·H + h (the inverse of a row-major merge)."""
    return b.op("Reshape", x, b.op("Concat", b.ints(-1, heads), b.shape_of(x, 1, 3), axis=0,
                                   dtype=TensorProto.INT64))


def merge_lead(b: Builder, x: str, lead: list, like: str) -> str:
    """A mask added while the scores were regrouped to (*lead, H, Lq, Lk), as (prod(lead), ·, ·, ·).

    Swin's window mask (nW, 1, N, N) is added to scores viewed as (B, nW, H, N, N): it is
    broadcast over `lead` = [B, nW] (its own last three axes stay as they are, size 1 or not)
    and the leading axes merged, which is what the view back to (B·nW, H, N, N) does to the
    scores. One unknown dim of `lead` is the first axis of `like` (q, (B·nW, H, Lq, D))
    divided by the known ones.
    """
    unknown = [i for i, d in enumerate(lead) if not isinstance(d, int)]
    if len(unknown) > 1:
        raise Unsupported(f"a mask added to scores regrouped over {lead}: more than one unknown axis")
    dims = [b.ints(d) if isinstance(d, int) else None for d in lead]
    if unknown:
        known = math.prod(d for d in lead if isinstance(d, int))
        dims[unknown[0]] = b.op("Div", b.shape_of(like, 0, 1), b.ints(known), dtype=TensorProto.INT64)
    full = b.op("Expand", x, b.op("Concat", *dims, b.ints(1, 1, 1), axis=0, dtype=TensorProto.INT64))
    n = len(lead)
    return b.op("Reshape", full, b.op("Concat", b.ints(-1), b.shape_of(full, n, n + 3), axis=0,
                                      dtype=TensorProto.INT64))


def merge_heads(b: Builder, y: str) -> str:
    """(B, H, L, D) → (B·H, L, D)."""
    return b.op("Reshape", y, b.op("Concat", b.ints(-1), b.shape_of(y, 2, 4), axis=0, dtype=TensorProto.INT64))


def normal_form(b: Builder, site: AttentionSite):
    """(q, k, v, mask) values for `site` in the normal form; emits the nodes it needs."""
    s: OnnxSite = site.graph
    g = b.g
    if g.opset < MIN_OPSET:
        raise Unsupported(f"opset {g.opset} < {MIN_OPSET}")
    if s.kind in ("decomposed", "attention"):
        return _chain_normal_form(b, s)
    q, k, v = _contrib_qkv(b, s)
    return q, k, v, _contrib_mask(b, s, q, k)


def _chain_normal_form(b: Builder, s: OnnxSite):
    """A decomposed chain's or an ONNX Attention's (q, k, v, mask); per-head scales go to q."""
    q, k, v = _chain_qkv(b, s)
    convert = _mask_layout(b, s, q)
    if s.kind == "decomposed" and s.mask_steps:
        mask = _replay_mask(b, s.mask_steps, q, convert or (lambda x: x))
    else:
        mask = _combine_mask(b, s.keeps, s.biases, q, convert)
    for t, how in s.head_scales:                     # softmax(t·q·kᵀ): t (H, 1, 1) on q per head
        q = b.op("Mul" if how == "mul" else "Div", q, b.cast(t, b.dtype(q)))
    return q, k, v, mask


def _chain_qkv(b: Builder, s: OnnxSite):
    """q, k, v as (B, H, L, D): perms applied, rank 3 unsqueezed or split by the op's head
    counts, a learned query expanded over the batch, merged heads split."""
    g = b.g
    q, k, v = s.q, s.k, s.v
    if s.kind == "attention" and s.rank == 3:
        hq, hkv = s.attrs.get("q_num_heads"), s.attrs.get("kv_num_heads")
        q, k, v = _heads_split(b, q, hq), _heads_split(b, k, hkv), _heads_split(b, v, hkv)
    else:
        q, k, v = b.transpose(q, s.q_perm), b.transpose(k, s.k_perm), b.transpose(v, s.v_perm)
        if _lead_one(g, s.q, s.q_perm) and not _lead_one(g, s.k, s.k_perm):
            # a learned query (1, ·, Lq, D) broadcast over the batch of k: expand it
            q = b.op("Expand", q, b.op("Concat", b.shape_of(k, 0, 1), b.ints(*[1] * (s.rank - 1)),
                                       axis=0, dtype=TensorProto.INT64))
        if s.rank == 3:
            q, k, v = (b.op("Unsqueeze", x, b.ints(0)) for x in (q, k, v))
    if s.kind == "decomposed" and s.flat_heads is not None:
        q, k, v = (split_heads(b, x, s.flat_heads) if r in s.flat else x for r, x in (("q", q), ("k", k), ("v", v)))
    return q, k, v


def _mask_layout(b: Builder, s: OnnxSite, q: str):
    """How a mask value of the chain reaches the (B, H, Lq, Lk) layout; None: as it is."""
    convert = None
    if s.kind == "decomposed" and s.flat_heads is not None and s.flat_masks:
        bh = b.op("Mul", b.shape_of(q, 0, 1), b.ints(s.flat_heads), dtype=TensorProto.INT64)
        rows = b.op("Concat", bh, b.ints(1, 1), axis=0, dtype=TensorProto.INT64)

        def convert(x, rows=rows):               # (B·H | 1, Lq | 1, Lk | 1) → (B, H, ·, ·)
            return split_heads(b, b.op("Expand", x, rows), s.flat_heads) if x in s.flat_masks else x
    if s.kind == "decomposed" and s.regrouped:

        def convert(x, q=q):                         # (B, nW, h|1, ·, ·) → (B·nW, h|1, ·, ·)
            return merge_lead(b, x, s.regrouped[x], q) if x in s.regrouped else x
    return convert


def _contrib_qkv(b: Builder, s: OnnxSite):
    """A com.microsoft op's q, k, v as (B, H, L, D): projected (Attention) or as given, with
    their biases, split by heads."""
    g, n = b.g, s.inputs
    h, hkv = s.heads, s.kv_heads
    if s.kind == "msattention":
        w = g.shape(n[1])
        sizes = s.attrs.get("qkv_hidden_sizes") or ([w[1] // 3] * 3 if w and isinstance(w[1], int) else None)
        if not sizes:
            raise Unsupported("cannot read the q/k/v hidden sizes")
        qkv = b.op("MatMul", n[0], n[1])
        if _present_in(n, 2):
            qkv = b.op("Add", qkv, n[2])
        q, k, v = (_heads_split(b, x, h) for x in _slices(b, qkv, sizes, -1))
        return q, k, v
    qb = kb = vb = None
    if s.kind == "mha" and _present_in(n, 3):
        hq, hk = _hidden(g, n[0]), _hidden(g, n[1]) if g.rank(n[1]) == 3 else None
        hv = _hidden(g, n[2]) if g.rank(n[2]) == 3 else None
        if hq is None or (g.rank(n[1]) == 3 and (hk is None or hv is None)):
            raise Unsupported("bias with unknown hidden sizes")
        if g.rank(n[1]) == 4:
            raise Unsupported("bias with (B, H, L, D) key/value")
        qb, kb, vb = _slices(b, n[3], [hq, hk, hv], 0)
    q = _heads_split(b, n[0], h, qb)
    if g.rank(n[1]) == 4:
        return q, n[1], n[2]
    return q, _heads_split(b, n[1], hkv, kb), _heads_split(b, n[2], hkv, vb)


def _contrib_mask(b: Builder, s: OnnxSite, q: str, k: str):
    """A com.microsoft op's masks as one: the (B, Lk) key padding, GQA's valid lengths
    (keys j ≤ seqlens_k[b]) and the additive attention bias."""
    n = s.inputs
    keeps, biases = [], []
    pad = {"msattention": 3, "mha": 4}.get(s.kind)
    if pad is not None and _present_in(n, pad):          # (B, Lk) 0/1 key padding
        keep = b.op("Unsqueeze", b.cast(n[pad], TensorProto.BOOL), b.ints(1, 2))
        keeps.append((keep, True))
    if s.kind == "gqa":                                   # keys j <= seqlens_k[b] are valid
        lk = b.shape_of(k, 2, 3)
        j = b.op("Range", b.const(np.array(0, np.int64)), b.op("Squeeze", lk, b.ints(0)),
                 b.const(np.array(1, np.int64)), dtype=TensorProto.INT64)
        total = b.op("Unsqueeze", b.cast(n[5], TensorProto.INT64), b.ints(1, 2, 3))
        keeps.append((b.op("LessOrEqual", j, total, dtype=TensorProto.BOOL), True))
    bias_i = {"msattention": 5, "mha": 5, "gqa": 10}[s.kind]
    if _present_in(n, bias_i):
        biases.append((n[bias_i], 1.0))
    return _combine_mask(b, keeps, biases, q)


def _lead_one(g: Graph, x: str, perm) -> bool:
    """The first axis of `x` (after `perm`) is statically 1."""
    sh = g.shape(x)
    if not sh:
        return False
    return (sh[perm[0]] if perm else sh[0]) == 1


def _present_in(inputs: list, i: int) -> bool:
    return len(inputs) > i and bool(inputs[i])


# ---------------------------------------------------------------- back from the normal form

def finish(b: Builder, site: AttentionSite, y: str) -> str:
    """Map the (B, H, Lq, Dv) output back to the site's own layout."""
    s: OnnxSite = site.graph
    if s.kind == "decomposed":
        y = b.transpose(y, s.out_perm)
        if "out" in s.flat:
            return merge_heads(b, y)
        return b.op("Squeeze", y, b.ints(0)) if s.rank == 3 else y
    if s.kind == "attention" and s.rank == 4:
        return y
    return b.op("Reshape", b.op("Transpose", y, perm=[0, 2, 1, 3]), b.ints(0, 0, -1))


def unfinish(b: Builder, site: AttentionSite, out: str) -> str:
    """The site's output value seen in the normal form's (B, H, Lq, Dv) layout."""
    s: OnnxSite = site.graph
    if s.kind == "decomposed":
        if "out" in s.flat:
            return split_heads(b, out, s.flat_heads)
        y = b.op("Unsqueeze", out, b.ints(0)) if s.rank == 3 else out
        return b.transpose(y, None if s.out_perm is None else list(np.argsort(s.out_perm)))
    if s.kind == "attention" and s.rank == 4:
        return out
    return _heads_split(b, out, s.heads if s.kind != "attention" else s.attrs.get("q_num_heads"))

