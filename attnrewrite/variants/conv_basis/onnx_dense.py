"""conv-basis in standard ONNX ops (onnxruntime CPU), dense: the same H̃ the reference builds for
n ≤ DENSE_MAX_N, in float64.

Dense memory: the (B, H, n, n) scores S = softcap(scale·q·kᵀ) are materialised (no FFT).
  start search  the sampled diagonals S[j + t, j] are read from S with GatherElements; the
                offsets t (0..7 and the 40 log-spaced ones, exactly as `find_starts`) come
                from a table indexed by the run-time n (n > ONNX_OFFSET_TABLE_N uses the
                last row: an estimate on fewer diagonals than the reference's); gap weights,
                key weights, column 0 forced, TopK(Min(k, n)), eps, and k ≥ n → every column
                (`onnx_steps.choose_starts`, shared with the DFT lowering).
  H̃             owner s(j) = the largest start ≤ j (ReduceMax); H̃[r, j] = exp(S[s(j) + r − j,
                s(j)] − c) for r ≥ j, by two GatherElements; c = max over the start columns.
                Bidirectional: the same on S flipped on both axes (strict diagonal), flipped
                back and added.
  output        (H̃·(V∘w)) / (H̃·w); rows whose normaliser is below RELIABLE × the reference's
                FFT error estimate are the exact softmax rows, as in the reference.
Masks: additive or boolean, causal + per-key bias only (`prepare` keeps the others); whether
the mask is causal is decided at run time (every strictly-upper entry removed), and the key
bias is its last (causal) or first row, as `split_mask`. Needs Lq == Lk.
"""
from __future__ import annotations

import math

import numpy as np

from ...passes import onnx_rewrite as R
from ..base import MASK_REMOVED
from .compute import RELIABLE
from .onnx_steps import (BOOL, F64, I64, Ops, check_lowerable, choose_starts, diagonal_offsets, gap_weights,
                         same_heads)
from .options import op_args


def lower_dense(b, site, q, k, v, mask, options: dict) -> str:
    """The site's output (B, H, n, Dv) in q's dtype: the dense H̃ of the module notes."""
    check_lowerable(site, options)
    count, fixed, eps = op_args(site, options)[:3]
    out_dt = b.dtype(q)
    q, k, v = (b.cast(x, F64) for x in (q, k, v))
    k, v = same_heads(b, site, k, v)
    s = R.decomposed_scores(b, site, q, k, None, False)            # (B, H, n, n) raw scores, float64
    o = Ops(b, b.shape_of(s, 0, 2), b.shape_of(s, 3, 4))
    off = b.op("Sub", o.unsq(o.ar, 1), o.ar)                       # (n, n): r − j
    causal, w, kb = _mask_weights(o, site, mask, off)
    offs, _ = diagonal_offsets(o)
    gap = gap_weights(o, offs)

    def logits(sp, wp, strict):
        st = choose_starts(o, count, fixed, eps, strict, wp, offs, gap, lambda rows: _diagonals(o, sp, rows))
        return _triangle(o, sp, st, off, strict)

    lo, own_lo = logits(s, w, False)
    c = o.reduce("ReduceMax", lo, [2, 3])
    if not site.causal:                                            # causal known only at run time: both parts
        s_up, w_up = o.flip(s, 2, 3), o.flip(w, 2)
        up, own_up = logits(s_up, w_up, True)
        c = b.op("Max", c, o.where(causal, o.f64(-math.inf), o.reduce("ReduceMax", up, [2, 3])))
    c = o.finite_or_zero(c)
    h = h_lo = b.op("Exp", b.op("Sub", lo, c))
    noise = _noise(o, h_lo, own_lo, w)
    if not site.causal:
        h_up = b.op("Exp", b.op("Sub", up, c))
        h = b.op("Add", h_lo, o.where(causal, o.f64(0.0), o.flip(h_up, 2, 3)))
        noise = b.op("Add", noise, o.where(causal, o.f64(0.0), _noise(o, h_up, own_up, w_up)))
    return b.cast(_normalised(o, h, noise, s, v, w, kb, causal, off), out_dt)


def _mask_weights(o: Ops, site, mask, off: str):
    """(causal (0-d bool), key weights w (B, H, n), key bias (B, H, n) or None): the mask as the
    causal pattern (a static flag, or every strictly-upper entry removed) + a per-key bias, its
    last (causal) or first row; w = exp(bias − its finite max)."""
    b = o.b
    if mask is None:
        return b.const(np.array(bool(site.causal))), b.op("Expand", o.f64(1.0), o.bhn), None
    ninf = o.f64(-math.inf)
    m = (o.where(mask, o.f64(0.0), ninf) if b.dtype(mask) == BOOL else b.cast(mask, F64))
    m = o.where(o.cmp("LessOrEqual", m, o.f64(MASK_REMOVED)), ninf, m)
    m = b.op("Expand", m, o.cat(b.ints(1, 1), o.n1, o.n1))
    upper = o.cmp("Less", off, o.i(0))                             # j > r
    removed = b.op("Or", b.op("Not", upper), o.cmp("Equal", m, ninf), dtype=BOOL)
    causal = o.all_true(removed, [0, 1, 2, 3])
    if site.causal:
        causal = b.const(np.array(True))
    last = b.op("Gather", m, b.op("Sub", o.n1, b.ints(1)), axis=2)          # (B', H', 1, n)
    first = b.op("Gather", m, b.ints(0), axis=2)
    kb = b.op("Expand", b.op("Squeeze", o.where(causal, last, first), b.ints(2)), o.bhn)   # (B, H, n)
    w = b.op("Exp", b.op("Sub", kb, o.finite_or_zero(o.reduce("ReduceMax", kb, [2]))))
    return causal, w, kb


def _diagonals(o: Ops, sp: str, rows: str) -> str:
    """(B, H, T, n) S[j + t, j] read from the scores (rows = j + t clamped into the sequence)."""
    b = o.b
    idx = b.op("Expand", b.op("Max", b.op("Min", rows, o.last), o.i(0)),
               o.cat(b.shape_of(sp, 0, 2), b.shape_of(rows, 0, 2)))
    return b.op("GatherElements", sp, idx, axis=2)


def _triangle(o: Ops, sp: str, st: str, off: str, strict: bool):
    """(logits of H̃ (B, H, n, n), −inf where H̃ is 0, in this triangle's coordinates; owners s(j)
    (B, H, 1, n)): H̃[r, j] = S[s(j) + r − j, s(j)] for r ≥ j (r > j if strict)."""
    b = o.b
    st3 = o.unsq(st, 3)
    le = o.cmp("LessOrEqual", st3, o.ar)                                    # (B, H, k', n)
    own = o.reduce("ReduceMax", o.where(le, st3, o.i(-1)), [2], keepdims=1)   # (B, H, 1, n)
    shape = b.op("Shape", sp, dtype=I64)
    cols = b.op("GatherElements", sp, b.op("Expand", own, shape), axis=3)   # [r, j] = S[r, s(j)]
    ridx = b.op("Expand", b.op("Max", b.op("Add", own, off), o.i(0)), shape)   # s(j) + r − j
    x = b.op("GatherElements", cols, b.op("Min", ridx, o.last), axis=2)
    live = o.cmp("GreaterOrEqual", off, o.i(1 if strict else 0))
    return o.where(live, x, o.f64(-math.inf)), own


def _noise(o: Ops, ht: str, own: str, wp: str) -> str:
    """Σᵢ ‖kernᵢ‖·‖w on block i‖ (B, H, 1, 1): the normaliser's FFT error estimate before its factor."""
    b = o.b
    colnorm = o.reduce("ReduceL2", ht, [2], keepdims=1)                      # (B, H, 1, n)
    onehot = b.op("Cast", o.cmp("Equal", b.op("Transpose", own, perm=[0, 1, 3, 2]), o.ar), to=F64, dtype=F64)
    blocksq = b.op("MatMul", o.unsq(b.op("Mul", wp, wp), 2), onehot)          # (B, H, 1, n)
    return o.reduce("ReduceSum", b.op("Mul", colnorm, b.op("Sqrt", blocksq)), [2, 3])


def _normalised(o: Ops, h: str, noise: str, s: str, v: str, w: str, kb, causal: str, off: str) -> str:
    """(H̃·(V∘w)) / (H̃·w), with the exact softmax rows where the normaliser is not above RELIABLE ×
    noise × log₂(the FFT size) × float64's unit round-off."""
    b = o.b
    m2 = b.op("Cast", b.op("Sub", b.op("Mul", o.n0, o.i(2)), o.i(1)), to=F64, dtype=F64)
    size_log2 = b.op("Add", b.op("Floor", b.op("Div", b.op("Log", m2), o.f64(math.log(2.0)))), o.f64(1.0))
    noise = b.op("Mul", noise, b.op("Mul", size_log2, o.f64(2.2e-16)))       # (B, H, 1, 1)
    w4 = o.unsq(w, 3)                                                        # (B, H, n, 1)
    num = b.op("MatMul", h, b.op("Mul", v, w4))
    den = b.op("MatMul", h, w4)                                              # (B, H, n, 1)
    approx = b.op("Div", num, b.op("Max", den, o.f64(1e-300)))
    bad = o.cmp("LessOrEqual", den, b.op("Mul", noise, o.f64(RELIABLE)))
    ex = s if kb is None else b.op("Add", s, o.unsq(kb, 2))
    ex = o.where(b.op("And", causal, o.cmp("Less", off, o.i(0)), dtype=BOOL), o.f64(-math.inf), ex)
    exact = b.op("MatMul", R.safe_softmax(b, ex), v)
    return o.where(bad, exact, approx)
