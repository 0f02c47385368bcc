"""sparse in standard ONNX ops."""
from __future__ import annotations

import math

import numpy as np

from ...passes import onnx_rewrite as R
from .onnx_blocks import heads_block, pooled_block, topk
from .options import MODE_KEYS, _options


def onnx_lower(b, site, q, k, v, mask, options: dict) -> str:
    """Standard ONNX ops (onnxruntime CPU).

    window, and block with select=pooled, score only the keys they keep (`_onnx_window`,
    `onnx_blocks.pooled_block`: no (Lq, Lk) tensor; mode=heads too); a short window (c + band + sinks ≥ a static Lk)
    and the other modes build the full score matrix and mask it:
      topk    TopK over keys with k' = Min(k, Lk) at run time; the threshold is the k'-th value,
              and every score ≥ it is kept. Ties at the threshold therefore keep *all* tied keys
              (torch.topk keeps exactly k, breaking ties by index); with no ties the two agree.
      window  (short) the band ∪ sinks keep mask from Range over the run-time Lq/Lk (bottom-right
              i' = i + Lk − Lq).
      block   (select=exact) Pad to whole blocks, block masses by ReduceSum over a (B, H, nq, b, nk, b) view,
              TopK ranks them; kept blocks are those ≥ the n-th mass, n = the density (and mass)
              budget — ties at that mass keep every tied block.
    Every mode ends in a masked softmax whose rows with no kept visible key give zeros.
    Half inputs are computed in fp32 and cast back, as in the reference. A constant mask that
    is exactly the causal pattern (the dynamo exporter's) is taken as the causal flag.
    """

    TP = R.TensorProto
    o = _options(options)
    if o["mode"] not in MODE_KEYS:
        raise R.Unsupported(f"sparse: unknown mode {o['mode']!r}")
    causal = bool(site.causal)
    out_dt = b.dtype(q)
    if out_dt in (TP.FLOAT16, TP.BFLOAT16):                      # computed in fp32
        q, k, v = (b.cast(x, TP.FLOAT) for x in (q, k, v))
    if isinstance(site.heads, int) and isinstance(site.kv_heads, int) and site.heads != site.kv_heads:
        k, v = R.repeat_kv(b, k, site.heads, site.kv_heads), R.repeat_kv(b, v, site.heads, site.kv_heads)
    if o["mode"] != "block" and not causal and R.constant_causal(b, mask):
        mask, causal = None, True                                 # a constant causal mask: the flag
    if o["mode"] == "window" and not _onnx_window_dense(site, o, causal):
        return b.cast(_onnx_window(b, site, q, k, v, mask, o, causal), out_dt)
    if o["mode"] == "block" and o["select"] == "pooled":
        return b.cast(pooled_block(b, site, q, k, v, mask, o, causal), out_dt)
    if o["mode"] == "heads":
        return b.cast(heads_block(b, site, q, k, v, mask, o, causal), out_dt)
    if o["select"] == "pooled" or o["head_density"]:
        raise R.Unsupported(f"sparse {o['mode']}: select=pooled / per-head densities have no ONNX lowering here")
    s = R.decomposed_scores(b, site, q, k, mask, causal)          # mask and causal before selection
    ninf = b.scalar_like(-math.inf, s)
    i64 = lambda x: b.const(np.array(x, np.int64))                # noqa: E731 - a 0-d int64
    if o["mode"] == "topk":
        kk = b.op("Min", b.ints(int(o["k"])), b.shape_of(s, 3, 4))   # k clamped to the run-time Lk
        top = topk(b, s, kk)
        kth = b.op("Slice", top, b.ints(-1), b.ints(np.iinfo(np.int64).max), b.ints(-1))
        s = b.op("Where", b.op("GreaterOrEqual", s, kth, dtype=TP.BOOL), s, ninf)
    elif o["mode"] == "window":                                   # short: the band over the dense scores
        before, after, _ = _onnx_band(o, causal)
        lq, lk = (b.op("Squeeze", b.shape_of(x, 2, 3), b.ints(0)) for x in (q, k))
        ip = b.op("Sub", b.op("Unsqueeze", b.op("Range", lk, b.op("Add", lk, lq), i64(1)), b.ints(1)), lq)
        j = b.op("Range", i64(0), lk, i64(1))                     # rows i' = i + Lk − Lq (Lq, 1), keys (Lk,)
        keep = b.op("And", b.op("GreaterOrEqual", j, b.op("Sub", ip, i64(before)), dtype=TP.BOOL),
                    b.op("LessOrEqual", j, b.op("Add", ip, i64(after)), dtype=TP.BOOL))
        keep = b.op("Or", keep, b.op("Less", j, i64(int(o["sinks"])), dtype=TP.BOOL))
        s = b.op("Add", s, b.op("Where", keep, b.scalar_like(0.0, s), ninf))   # (causal is already in s)
        y = b.op("MatMul", b.op("Softmax", s, axis=-1), b.cast(v, b.dtype(s)))
        dies = mask is not None or R.rows_can_die(b, site, None, True)      # (else every row keeps key i')
        return b.cast(R.zero_nan_rows(b, y) if dies else y, out_dt)
    p = R.safe_softmax(b, s)
    if o["mode"] == "block":
        p = _onnx_block_keep(b, s, p, o, R, i64)
    return b.cast(b.op("MatMul", p, b.cast(v, b.dtype(p))), out_dt)


def _onnx_band(o, causal: bool) -> tuple[int, int, int]:
    """(before, after, c): row i' keeps keys i' − before … i' + after; c rows per query block."""
    backward = o["band"] == "backward" or (o["band"] == "auto" and causal)
    before, after = (int(o["window"]) - 1, 0) if backward else (o["window"] // 2, o["window"] // 2)
    return before, after, max(int(o["window"]), 32)


def _onnx_window_dense(site, o, causal: bool) -> bool:
    """Whether a query block would score about every key anyway (a static Lk no longer than
    c + band + sinks): then the band masks the dense scores instead, with fewer ops."""
    before, after, c = _onnx_band(o, causal)
    return isinstance(site.kv_len, int) and c + before + after + int(o["sinks"]) >= site.kv_len


def _onnx_window(b, site, q, k, v, mask, o, causal: bool) -> str:
    """Window mode as blocked local attention: O(Lq·(c + band + sinks)·D), no (Lq, Lk) tensor.

    Queries are cut in blocks of c = max(window, 32) rows (padded to whole blocks). Block I's
    rows i can only see keys i' − before … i' + after (i' = i + Lk − Lq), one contiguous span
    of c + before + after keys starting at I·c + Lk − Lq − before: those are gathered for the
    block (positions outside 0..Lk−1 clamped and masked), the first `sinks` keys are scored
    for every row beside them, and the band, causal and sink rules of `_in_window` become a
    (nq, c, keys) keep mask shared by every batch and head. A given mask is read at the same
    positions (a key-only mask by Gather, a full one by GatherElements on row blocks).
    """
    TP, I64 = R.TensorProto, R.TensorProto.INT64
    before, after, c = _onnx_band(o, causal)
    span = c + before + after
    i64 = lambda x: b.const(np.array(x, np.int64))                 # noqa: E731 - a 0-d int64
    lq1, lk1 = b.shape_of(q, 2, 3), b.shape_of(k, 2, 3)            # (1,)
    lq, lk = b.op("Squeeze", lq1, b.ints(0)), b.op("Squeeze", lk1, b.ints(0))
    nq1 = b.op("Div", b.op("Add", lq1, b.ints(c - 1)), b.ints(c))   # ⌈Lq / c⌉, (1,)
    nq = b.op("Squeeze", nq1, b.ints(0))
    off = b.op("Sub", lk, lq)
    # positions: rows i (nq, c, 1) as i' = i + Lk − Lq, band keys j (nq, 1, span), sinks js (S,)
    start = b.op("Add", b.op("Mul", b.op("Range", i64(0), nq, i64(1), dtype=I64), i64(c)), off)   # (nq,)
    rows = b.op("Add", b.op("Unsqueeze", start, b.ints(1)), b.op("Range", i64(0), i64(c), i64(1), dtype=I64))
    j = b.op("Add", b.op("Unsqueeze", b.op("Sub", start, i64(before)), b.ints(1)),
             b.op("Range", i64(0), i64(span), i64(1), dtype=I64))  # (nq, span)
    ip, jj = b.op("Unsqueeze", rows, b.ints(2)), b.op("Unsqueeze", j, b.ints(1))
    le, ge, lt = (lambda x, y, op=op: b.op(op, x, y, dtype=TP.BOOL) for op in ("LessOrEqual", "GreaterOrEqual", "Less"))
    keep = b.op("And", ge(jj, b.op("Sub", ip, i64(before))), le(jj, b.op("Add", ip, i64(after))), dtype=TP.BOOL)
    keep = b.op("And", keep, b.op("And", ge(jj, i64(int(o["sinks"]))), lt(jj, lk), dtype=TP.BOOL), dtype=TP.BOOL)
    if causal:
        keep = b.op("And", keep, le(jj, ip), dtype=TP.BOOL)          # (nq, c, span)
    jc = b.op("Min", b.op("Max", j, i64(0)), b.op("Sub", lk, i64(1)))   # clamped for Gather
    qs = b.op("Mul", q, b.scalar_like(R.resolve_scale(b, site), q))
    pad_rows = b.op("Concat", b.ints(0, 0, 0, 0, 0, 0), b.op("Sub", b.op("Mul", nq1, b.ints(c)), lq1), b.ints(0),
                    axis=0, dtype=I64)
    qp = b.op("Pad", qs, pad_rows, b.scalar_like(0.0, q))          # (B, H, nq·c, D)
    qb = b.op("Reshape", qp, b.op("Concat", b.ints(0, 0), nq1, b.ints(c, -1), axis=0, dtype=I64))
    kg = b.op("Gather", k, jc, axis=2)                             # (B, H, nq, span, D)
    s = b.op("MatMul", qb, b.op("Transpose", kg, perm=[0, 1, 2, 4, 3]))   # (B, H, nq, c, span)
    vg = b.op("Gather", v, jc, axis=2)
    sinks = int(o["sinks"])
    if sinks:
        ns1 = b.op("Min", b.ints(sinks), lk1)
        ks, vs = (b.op("Slice", x, b.ints(0), ns1, b.ints(2)) for x in (k, v))        # (B, H, S, ·)
        ss = b.op("MatMul", qp, b.op("Transpose", ks, perm=[0, 1, 3, 2]))             # (B, H, nq·c, S)
        s = b.op("Concat", b.op("Reshape", ss, b.op("Concat", b.ints(0, 0), nq1, b.ints(c, -1), axis=0,
                                                   dtype=I64)), s, axis=-1)
        vshape = b.op("Concat", b.shape_of(vs, 0, 2), nq1, b.shape_of(vs, 2, 4), axis=0, dtype=I64)
        vg = b.op("Concat", b.op("Expand", b.op("Unsqueeze", vs, b.ints(2)), vshape), vg, axis=3)
        js = b.op("Range", i64(0), b.op("Squeeze", ns1, b.ints(0)), i64(1), dtype=I64)   # (S,)
        sk = le(js, ip) if causal else b.op("Expand", b.const(np.array(True)),
                                            b.op("Concat", nq1, b.ints(c), ns1, axis=0, dtype=I64))
        keep = b.op("Concat", sk, keep, axis=-1)                   # (nq, c, S + span)
    if site.softcap:
        cap = b.scalar_like(float(site.softcap), s)
        s = b.op("Mul", b.op("Tanh", b.op("Div", s, cap)), cap)
    if mask is not None:
        m = _onnx_window_mask(b, q, mask, jc, c, nq1, ns1 if sinks else None)
        if b.dtype(m) == TP.BOOL:
            keep = b.op("And", keep, m, dtype=TP.BOOL)
        else:
            s = b.op("Add", s, b.cast(m, b.dtype(s)))
    p = b.op("Softmax", b.op("Where", keep, s, b.scalar_like(-math.inf, s)), axis=-1)
    y = b.op("MatMul", p, vg)                                        # (B, H, nq, c, Dv)
    y = b.op("Reshape", y, b.op("Concat", b.ints(0, 0, -1), b.shape_of(y, 4, 5), axis=0, dtype=I64))
    y = b.op("Slice", y, b.ints(0), lq1, b.ints(2))
    dies = mask is not None or R.rows_can_die(b, site, None, True)      # (else every row keeps key i')
    return R.zero_nan_rows(b, y) if dies else y


def _onnx_window_mask(b, q, mask, jc, c, nq1, ns1):
    """The mask at the window's (row, key) pairs: (B', H', nq, 1 or c, [S +] span)."""
    I64 = R.TensorProto.INT64
    m = b.op("Expand", mask, b.ints(1, 1, 1, 1))                    # rank 4 (normal-form masks have ≤ 4)
    shape = b.g.shape(mask)
    if shape and len(shape) >= 2 and shape[-2] == 1:                 # key-only: one row for every query
        g = b.op("Transpose", b.op("Gather", m, jc, axis=3), perm=[0, 1, 3, 2, 4])   # (B', H', nq, 1, span)
        if ns1 is not None:
            ms = b.op("Unsqueeze", b.op("Slice", m, b.ints(0), ns1, b.ints(3)), b.ints(2))   # (B', H', 1, 1, S)
            shp = b.op("Concat", b.shape_of(m, 0, 2), nq1, b.ints(1), ns1, axis=0, dtype=I64)
            g = b.op("Concat", b.op("Expand", ms, shp), g, axis=-1)
        return g
    m = R.full_query_rows(b, m, q)                                   # (B', H', Lq, Lk)
    lq1 = b.shape_of(q, 2, 3)
    pad = b.op("Concat", b.ints(0, 0, 0, 0, 0, 0), b.op("Sub", b.op("Mul", nq1, b.ints(c)), lq1), b.ints(0),
               axis=0, dtype=I64)
    fill = b.const(np.array(True)) if b.dtype(m) == R.TensorProto.BOOL else b.scalar_like(0.0, m)
    m = b.op("Reshape", b.op("Pad", m, pad, fill), b.op("Concat", b.ints(0, 0), nq1, b.ints(c, -1), axis=0,
                                                         dtype=I64))   # (B', H', nq, c, Lk)
    shp = b.op("Concat", b.shape_of(m, 0, 2), nq1, b.ints(c), b.shape_of(jc, 1, 2), axis=0, dtype=I64)
    g = b.op("GatherElements", m, b.op("Expand", b.op("Unsqueeze", jc, b.ints(1)), shp), axis=4)
    if ns1 is not None:
        g = b.op("Concat", b.op("Slice", m, b.ints(0), ns1, b.ints(4)), g, axis=-1)
    return g


def _onnx_block_keep(b, s, p, o, R, i64):
    """Block mode: p restricted to the kept key blocks and renormalised (see _block_keep)."""
    TP = R.TensorProto
    bs = int(o["block"])
    zero = b.scalar_like(0.0, p)
    lq, lk = b.shape_of(s, 2, 3), b.shape_of(s, 3, 4)
    nq = b.op("Div", b.op("Add", lq, b.ints(bs - 1)), b.ints(bs))           # ⌈L / b⌉ (int64 Div floors)
    nk = b.op("Div", b.op("Add", lk, b.ints(bs - 1)), b.ints(bs))
    pads = b.op("Concat", b.ints(0, 0, 0, 0, 0, 0), b.op("Sub", b.op("Mul", nq, b.ints(bs)), lq),
                b.op("Sub", b.op("Mul", nk, b.ints(bs)), lk), axis=0, dtype=TP.INT64)
    view = b.op("Concat", b.ints(0, 0), nq, b.ints(bs), nk, b.ints(bs), axis=0, dtype=TP.INT64)

    def blocks(x):                                                          # Σ over each block: (B, H, nq, nk)
        return b.op("ReduceSum", b.op("Reshape", b.op("Pad", x, pads, zero), view), b.ints(3, 5), keepdims=0)

    live = b.op("Cast", b.op("Greater", s, b.scalar_like(-math.inf, s), dtype=TP.BOOL), to=b.dtype(p),
                dtype=b.dtype(p))
    mass = blocks(p)
    n_vis = b.op("ReduceSum", b.op("Cast", b.op("Greater", blocks(live), zero, dtype=TP.BOOL), to=b.dtype(p),
                                   dtype=b.dtype(p)), b.ints(-1), keepdims=1)
    budget = b.op("Max", b.op("Ceil", b.op("Mul", n_vis, b.scalar_like(float(o["density"]), p))),
                  b.scalar_like(1.0, p))                                    # blocks kept per query block
    top = topk(b, mass, nk)                                           # masses, best first
    if o["mass"] < 1.0:                                                     # + stop once `mass` is reached
        alive = b.op("Cast", b.op("Greater", b.op("ReduceSum", live, b.ints(-1), keepdims=0), zero, dtype=TP.BOOL),
                     to=b.dtype(p), dtype=b.dtype(p))                       # (B, H, Lq): rows seeing a key
        row_pads = b.op("Concat", b.ints(0, 0, 0, 0, 0), b.op("Sub", b.op("Mul", nq, b.ints(bs)), lq),
                        axis=0, dtype=TP.INT64)
        alive = b.op("Pad", alive, row_pads, zero)
        rows = b.op("ReduceSum", b.op("Reshape", alive, b.op("Concat", b.ints(0, 0), nq, b.ints(bs), axis=0,
                                                              dtype=TP.INT64)), b.ints(-1), keepdims=1)
        before = b.op("Sub", b.op("CumSum", top, i64(-1)), top)            # mass of the better-ranked blocks
        n_mass = b.op("ReduceSum", b.op("Cast", b.op("Less", before, b.op("Mul", rows, b.scalar_like(
            float(o["mass"]), p)), dtype=TP.BOOL), to=b.dtype(p), dtype=b.dtype(p)), b.ints(-1), keepdims=1)
        budget = b.op("Min", budget, n_mass)                                 # (the block crossing it is kept)
    idx = b.op("Sub", b.op("Cast", budget, to=TP.INT64, dtype=TP.INT64), b.ints(1))
    thr = b.op("GatherElements", top, idx, axis=3)                          # the budget-th best mass
    keep = b.op("GreaterOrEqual", mass, thr, dtype=TP.BOOL)                 # (B, H, nq, nk)
    full = b.op("Concat", b.shape_of(keep, 0, 2), nq, b.ints(bs), nk, b.ints(bs), axis=0, dtype=TP.INT64)
    keep = b.op("Expand", b.op("Unsqueeze", keep, b.ints(3, 5)), full)      # (B, H, nq, b, nk, b)
    keep = b.op("Reshape", keep, b.op("Concat", b.ints(0, 0), b.op("Mul", nq, b.ints(bs)),
                                      b.op("Mul", nk, b.ints(bs)), axis=0, dtype=TP.INT64))
    keep = b.op("Slice", keep, b.ints(0, 0), b.op("Concat", lq, lk, axis=0, dtype=TP.INT64), b.ints(2, 3))
    kept = b.op("Where", keep, p, zero)
    z = b.op("ReduceSum", kept, b.ints(-1), keepdims=1)
    return b.op("Div", kept, b.op("Where", b.op("Greater", z, zero, dtype=TP.BOOL), z, b.scalar_like(1.0, p)))
