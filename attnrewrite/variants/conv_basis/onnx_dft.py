"""The reference's FFT path in standard ONNX ops, float32: memory O(k·n·d), no (n, n) tensor.

  start search  the sampled diagonals s[j + t, j] = q[j + t]·k[j] (the offsets t of
                `find_starts`: static n exactly, dynamic n from the same table as the
                dense lowering), ONNX_DIAG_GROUP offsets at a time (one Gather of q rows
                and one batched MatMul); the ranking in float64 as the reference's short
                path; TopK(Min(k, n)), eps, k ≥ n → every column; fixed starts as given
                (`onnx_steps.choose_starts`, shared with the dense lowering).
  columns       colᵢ[t] = s[sᵢ + t, sᵢ] from q·k[starts]ᵀ (n × k); kernᵢ = exp(colᵢ − c),
                c the largest over both triangles. A repeated start keeps its first copy.
  apply         overlap-save as `_overlap_save`, block P = fft_block(n): the columns of
                X = [V·w | w] cut into segments (one block ∩ one start's columns, at most
                nb + k', placed by ScatterElements), each transformed once by `DFT` (real
                input, onesided, zero-padded by the op to 2P); each start's kernel windows
                (nb of 2P lags) once; per frequency the complex (nb × S)·(S × m) product as
                one real MatMul of [Tr; Ti] with [Xr | Xi]; one inverse `DFT` (onesided →
                real) per output block and column. Bidirectional: the strict upper
                triangle is the same on the reversed sequence, flipped back and added (a
                run-time causal mask selects). Memory O((1 + k/nb)·n·d + k·n).
  fallback      the reference's test: normaliser ≤ RELIABLE_F32 × its FFT error estimate
                (n ≤ DENSE_MAX_N: Σᵢ ‖kernᵢ‖·‖w on block i‖ per head; above: per row block
                of fft_block(n), Σ over the start blocks reaching it of ‖kernel window‖·
                ‖w on the block‖), × unit round-off × log₂ of the transform size. The
                unreliable rows (R = the most in any head) are taken by TopK, scored
                exactly against every key (R·n per head), and scattered back.
Masks: causal + per-key bias as `split_mask`; a constant causal mask is the causal flag;
a mask with one query row is a key mask; with n rows the causal test runs on the mask's
rows (the last key each row keeps), and the key bias is its last (causal) or first row.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ...passes import onnx_rewrite as R
from ..base import MASK_REMOVED
from .compute import RELIABLE_F32
from .convolve import DENSE_MAX_N, FFT_BLOCKS, FFT_MIN_BLOCK, UNIT, fft_block, is_dense
from .onnx_steps import (BIG, BOOL, F32, F64, I64, TP, Ops, choose_starts, diagonal_offsets, gap_weights,
                         same_heads)
from .options import op_args

ONNX_DIAG_GROUP = 8                # sampled diagonals gathered at once (group·n·d values per head)


def lower_dft(b, site, q, k, v, mask, options: dict) -> str:
    """The site's output (B, H, n, Dv) in q's dtype, by the steps of the module notes."""
    count, fixed, eps = op_args(site, options)[:3]
    out_dt = b.dtype(q)
    q, k, v = (b.cast(x, F32) for x in (q, k, v))
    k, v = same_heads(b, site, k, v)
    causal = bool(site.causal)
    if mask is not None and R.constant_causal(b, mask):
        mask, causal = None, True                                  # the constant causal pattern: the flag
    static_n = site.kv_len if isinstance(site.kv_len, int) else site.q_len
    static_n = static_n if isinstance(static_n, int) else None
    o = Ops(b, b.shape_of(q, 0, 2), b.shape_of(k, 2, 3), site.softcap)
    qs = b.op("Mul", q, o.f32(R.resolve_scale(b, site)))          # scaled in float32, as the reference
    w, kb, causal = _key_weights(o, mask, causal)
    x = o.cat(b.op("Mul", v, o.unsq(w, 3)), o.unsq(w, 3), axis=3)   # [V·w | w] (B, H, n, dv + 1)
    dv = b.op("Squeeze", b.shape_of(v, 3, 4), b.ints(0))
    static_causal = causal if isinstance(causal, bool) else None
    offs, n_offs = diagonal_offsets(o, static_n)
    gap = gap_weights(o, offs)

    parts = [(qs, k, x, w, False)]
    if static_causal is not True:                                  # the strictly upper triangle, reversed
        parts.append((o.flip(qs), o.flip(k), o.flip(x), o.flip(w), True))
    plans = []
    for qp, kp, _, wp, strict in parts:
        diagonals = (lambda rows, qp=qp, kp=kp: o.softcapped(b.cast(_diagonals(o, qp, kp, offs, n_offs), F64)))
        st = choose_starts(o, count, fixed, eps, strict, wp, offs, gap, diagonals)
        plans.append(_start_columns(o, qp, kp, st, strict))
    blocks = _Blocks(o, static_n)
    y, noise = _convolutions(o, blocks, parts, plans, causal, static_causal)
    approx, bad = _normalise(o, y, noise, dv)
    return b.cast(_exact_rows(o, qs, k, v, kb, approx, bad, dv, causal, static_causal), out_dt)


def _key_weights(o: Ops, mask, causal):
    """(w (B, H, n) float32, key bias (B, H, n) or None, causal: bool or a 0-d bool value): the mask
    as the causal pattern + a per-key bias; with n rows and no causal flag, causal when every row
    keeps no key after its own (the key bias is then the last row, else the first)."""
    b = o.b
    if mask is None:
        return b.op("Expand", o.f32(1.0), o.bhn), None, causal
    ninf = o.f64(-math.inf)
    m = o.where(mask, o.f64(0.0), ninf) if b.dtype(mask) == BOOL else b.cast(mask, F64)
    m = o.where(o.cmp("LessOrEqual", m, o.f64(MASK_REMOVED)), ninf, m)
    m = b.op("Expand", m, o.cat(b.ints(1, 1, 1), o.n1))            # rank 4, its own rows (1 or n)
    rows = b.shape_of(m, 2, 3)
    if not causal:                                                 # every key after the row removed?
        kept = o.cmp("Greater", m, ninf)
        last_kept = o.reduce("ReduceMax", o.where(kept, o.ar, o.i(-1)), [3], keepdims=0)   # (B', H', rows)
        rr = b.op("Range", o.i(0), b.op("Squeeze", rows, b.ints(0)), o.i(1), dtype=I64)
        causal = b.op("And", o.all_true(o.cmp("LessOrEqual", last_kept, rr), [0, 1, 2]),
                      o.cmp("Greater", b.op("Squeeze", rows, b.ints(0)), o.i(1)), dtype=BOOL)
        row = o.where(causal, b.op("Sub", rows, b.ints(1)), b.ints(0))
    else:
        row = b.op("Sub", rows, b.ints(1))
    kb = b.cast(b.op("Expand", b.op("Squeeze", b.op("Gather", m, row, axis=2), b.ints(2)), o.bhn), F32)
    w = b.op("Exp", b.op("Sub", kb, o.finite_or_zero(o.reduce("ReduceMax", kb, [2]))))   # (B, H, n)
    return w, kb, causal


def _diagonals(o: Ops, qp: str, kp: str, offs: str, n_offs: int) -> str:
    """(B, H, T, n) float32 raw scores qp[j + t]·kp[j] (garbage where j + t ≥ n or t < 0)."""
    b = o.b
    kcol = o.unsq(kp, 4)                                           # (B, H, n, d, 1)
    out = []
    for a in range(0, n_offs, ONNX_DIAG_GROUP):
        group = b.op("Slice", offs, b.ints(a), b.ints(a + ONNX_DIAG_GROUP), b.ints(0))
        idx = b.op("Min", b.op("Max", b.op("Add", o.unsq(o.ar, 1), o.unsq(group, 0)), o.i(0)), o.last)  # (n, G)
        rowsq = b.op("Gather", qp, idx, axis=2)                    # (B, H, n, G, d)
        out.append(b.op("Squeeze", b.op("MatMul", rowsq, kcol), b.ints(4)))                   # (B, H, n, G)
    d = out[0] if len(out) == 1 else o.cat(*out, axis=3)
    return b.op("Transpose", d, perm=[0, 1, 3, 2])


def _start_columns(o: Ops, qp: str, kp: str, st: str, strict: bool):
    """(colᵢ[t] = s[sᵢ + t, sᵢ] (B, H, k', n) soft-capped, −inf past the end (and at t = 0 if strict);
    owner mask (B, H, k', n)
    float32: start i owns column j when it is the last start ≤ j and no earlier slot repeats it)."""
    b = o.b
    st3 = o.unsq(st, 3)                                            # (B, H, k', 1)
    kn = b.shape_of(st, 2, 3)                                      # (1,) k'
    kidx = b.op("Range", o.i(0), b.op("Squeeze", kn, b.ints(0)), o.i(1), dtype=I64)
    ks = b.op("GatherElements", kp, b.op("Expand", st3, o.cat(o.bh, kn, b.shape_of(kp, 3, 4))), axis=2)
    s = o.softcapped(b.op("MatMul", ks, b.op("Transpose", qp, perm=[0, 1, 3, 2])))   # (B, H, k', n): s[r, sᵢ]
    rows = b.op("Add", st3, o.ar)                                  # sᵢ + t
    cols = b.op("GatherElements", s, b.op("Min", rows, o.last), axis=3)
    dead = o.cmp("GreaterOrEqual", rows, o.n0)
    if strict:
        dead = b.op("Or", dead, o.cmp("Equal", o.ar, o.i(0)), dtype=BOOL)
    cols = o.where(dead, o.f32(-math.inf), cols)
    own = o.reduce("ReduceMax", o.where(o.cmp("LessOrEqual", st3, o.ar), st3, o.i(-1)), [2])   # (B, H, 1, n): s(j)
    earlier = o.cmp("Greater", o.unsq(kidx, 1), o.unsq(kidx, 0))   # [i, i']: i' before i
    dup = o.reduce("ReduceMax", b.op("Cast", b.op("And", o.cmp("Equal", st3, o.unsq(st, 2)), earlier, dtype=BOOL),
                                     to=TP.INT32, dtype=TP.INT32), [3])              # (B, H, k', 1)
    owns = b.op("And", o.cmp("Equal", own, st3), o.cmp("Equal", dup, b.const(np.array(0, np.int32))), dtype=BOOL)
    return cols, b.op("Cast", owns, to=F32, dtype=F32)


class _Blocks:
    """The overlap-save geometry for the run-time n: block P = fft_block(n) (a constant for a static n,
    else computed from a table of powers of two), nb blocks, each row's block, the lags 0 … nb − 1."""

    def __init__(self, o: Ops, static_n: int | None):
        b = self.b = o.b
        self.o, self.static_n = o, static_n
        self.pows = None if static_n is not None else b.const(np.array([1 << e for e in range(1, 48)], np.int64))
        if static_n is not None:
            self.p = b.const(np.array(fft_block(static_n), np.int64))
        else:                                                      # fft_block at run time
            self.p = b.op("Max", o.i(FFT_MIN_BLOCK), self._pow2_at_least(b.op("Max", o.i(1), b.op(
                "Div", b.op("Add", o.n0, o.i(FFT_BLOCKS - 1)), o.i(FFT_BLOCKS)))))
        self.nb = b.op("Div", b.op("Add", o.n0, b.op("Sub", self.p, o.i(1))), self.p)
        self.blk = b.op("Div", o.ar, self.p)                       # (n,) the row's block
        self.p1 = o.unsq(self.p, 0)                                # (1,) P
        self.p2 = b.op("Mul", self.p, o.i(2))                      # 2P, the transform size
        self.nb1 = o.unsq(self.nb, 0)
        self.delta = b.op("Range", o.i(0), self.nb, o.i(1), dtype=I64)   # (nb,) blocks / lags in blocks

    def _pow2_at_least(self, m: str) -> str:
        """0-d: the smallest power of two ≥ m (≥ 2)."""
        o = self.o
        return o.reduce("ReduceMin", o.where(o.cmp("GreaterOrEqual", self.pows, m), self.pows, o.i(BIG.max)), [0],
                        keepdims=0)

    def bit_length(self, m: str) -> str:
        """0-d float32: m's bit length (m ≥ 1)."""
        b, o = self.b, self.o
        ones = b.op("Cast", o.cmp("LessOrEqual", o.cat(b.ints(1), self.pows), m), to=I64, dtype=I64)
        return b.op("Cast", o.reduce("ReduceSum", ones, [0], keepdims=0), to=F32, dtype=F32)


def _dft(o: Ops, x: str, length: str, axis: int, inverse: int = 0) -> str:
    """The DFT op, onesided (its axis an attribute before opset 20, an input from it on)."""
    b = o.b
    if b.opset >= 20:
        return b.op("DFT", x, length, o.i(axis), onesided=1, inverse=inverse, dtype=F32)
    return b.op("DFT", x, length, axis=axis, onesided=1, inverse=inverse, dtype=F32)


def _convolutions(o: Ops, g: _Blocks, parts, plans, causal, static_causal):
    """(y = H̃·[V·w | w] (B, H, n, dv + 1), the normaliser's error estimate (B, H, n)) summed over the
    triangles, with one shift c = the largest start-column score of both (a run-time causal mask drops
    the upper one)."""
    b = o.b
    tops = [o.reduce("ReduceMax", cols, [2, 3]) for cols, _ in plans]
    if len(tops) == 2 and static_causal is None:
        tops[1] = o.where(causal, o.f32(-math.inf), tops[1])
    c = o.finite_or_zero(tops[0] if len(tops) == 1 else b.op("Max", *tops))
    y = noise = None
    for (_, _, xp, wp, strict), (cols, owns) in zip(parts, plans):
        kern = b.op("Exp", b.op("Sub", cols, c))
        yp = _overlap_save(o, g, kern, owns, xp)
        if g.static_n is not None and is_dense(g.static_n):
            np_ = _noise_per_head(o, g, kern, owns, wp)
        elif g.static_n is not None:
            np_ = _noise_per_block(o, g, kern, owns, wp)
        else:
            np_ = o.where(o.cmp("Greater", o.n0, o.i(DENSE_MAX_N)), _noise_per_block(o, g, kern, owns, wp),
                          b.op("Expand", _noise_per_head(o, g, kern, owns, wp), o.bhn))
        if strict:
            yp, np_ = o.flip(yp), o.flip(np_)
            if static_causal is None:
                yp, np_ = o.where(causal, o.f32(0.0), yp), o.where(causal, o.f32(0.0), np_)
        y = yp if y is None else b.op("Add", y, yp)
        noise = np_ if noise is None else b.op("Add", noise, np_)
    return y, noise


def _overlap_save(o: Ops, g: _Blocks, kern: str, owns: str, xp: str) -> str:
    """Σᵢ kernᵢ ∗ (xp on start i's columns): (B, H, n, m), as `convolve._overlap_save`.

    Output block o is Σₛ window(owner s, o − block s)·X̂ₛ: per frequency one (2nb × S)·(S × 2m)
    real MatMul for the complex product, then one inverse transform per block and column."""
    b = o.b
    m1 = b.shape_of(xp, 3, 4)
    xf, seg_blk, seg_own, nseg = _segment_spectra(o, g, owns, xp, m1)
    tm = _transfer_matrix(o, g, _window_spectra(o, g, kern), seg_blk, seg_own, nseg)
    prod = b.op("MatMul", tm, xf)                                  # (B, H, F, 2nb, 2m)
    blocks = lambda r0, r1, c0, c1: b.op("Slice", prod, o.cat(r0, c0), o.cat(r1, c1), b.ints(3, 4))   # noqa: E731
    z = b.ints(0)
    nb2, m2 = b.op("Mul", g.nb1, b.ints(2)), b.op("Mul", m1, b.ints(2))
    yr = b.op("Sub", blocks(z, g.nb1, z, m1), blocks(g.nb1, nb2, m1, m2))   # Tr·Xr − Ti·Xi
    yi = b.op("Add", blocks(z, g.nb1, m1, m2), blocks(g.nb1, nb2, z, m1))   # Tr·Xi + Ti·Xr
    y = b.op("Transpose", o.cat(o.unsq(yr, 5), o.unsq(yi, 5), axis=5), perm=[0, 1, 3, 4, 2, 5])   # (B, H, nb, m, F, 2)
    y = _dft(o, y, g.p2, 4, inverse=1)                             # (B, H, nb, m, 2P, 1)
    y = b.op("Squeeze", b.op("Slice", y, b.op("Sub", g.p1, b.ints(1)),
                             b.op("Sub", b.op("Mul", g.p1, b.ints(2)), b.ints(1)), b.ints(4)), b.ints(5))
    y = b.op("Reshape", b.op("Transpose", y, perm=[0, 1, 2, 4, 3]), o.cat(o.bh, b.ints(-1), m1))
    return b.op("Slice", y, b.ints(0), o.n1, b.ints(2))


def _segment_spectra(o: Ops, g: _Blocks, owns: str, xp: str, m1: str):
    """(X̂ (B, H, F, S, [re | im]·m), each segment's block (B, H, S), its owning start's slot (B, H, S),
    S (1,)): segments are the runs of columns with one block and one owning start (at most nb + k'),
    each placed in the first P of 2P entries and transformed once."""
    b = o.b
    kn = b.shape_of(owns, 2, 3)
    own = b.op("ArgMax", owns, axis=2, keepdims=0)                 # (B, H, n): the owning start's slot
    key = b.op("Add", b.op("Mul", g.blk, b.op("Squeeze", kn, b.ints(0))), own)
    new = b.op("Cast", b.op("Not", o.cmp("Equal", b.op("Slice", key, b.ints(1), b.ints(BIG.max), b.ints(2)),
                                         b.op("Slice", key, b.ints(0), b.ints(-1), b.ints(2)))), to=I64, dtype=I64)
    seg = b.op("CumSum", b.op("Pad", new, b.ints(0, 0, 1, 0, 0, 0), o.i(0)), o.i(2))   # (B, H, n) segment of j
    nseg = b.op("Add", g.nb1, kn)                                  # (1,) S, an upper bound
    slot = b.op("Add", b.op("Mul", seg, g.p), b.op("Mod", o.ar, g.p))
    xs = b.op("Expand", o.f32(0.0), o.cat(o.bh, b.op("Mul", nseg, g.p1), m1))
    xs = b.op("ScatterElements", xs, b.op("Expand", o.unsq(slot, 3), o.cat(o.bhn, m1)), xp, axis=2)
    xs = b.op("Transpose", b.op("Reshape", xs, o.cat(o.bh, nseg, g.p1, m1)), perm=[0, 1, 2, 4, 3])
    xf = _dft(o, o.unsq(xs, 5), g.p2, 4)                           # (B, H, S, m, P + 1, 2)
    xf = b.op("Transpose", xf, perm=[0, 1, 4, 2, 5, 3])            # (B, H, F, S, 2, m)
    xf = b.op("Reshape", xf, b.ints(0, 0, 0, 0, -1))               # (B, H, F, S, [re | im])
    zero = b.op("Expand", o.i(0), o.cat(o.bh, nseg))
    seg_blk = b.op("ScatterElements", zero, seg, b.op("Expand", g.blk, o.bhn), axis=2)    # (B, H, S)
    seg_own = b.op("ScatterElements", zero, seg, own, axis=2)
    return xf, seg_blk, seg_own, nseg


def _window_spectra(o: Ops, g: _Blocks, kern: str) -> str:
    """(B, H, k'·nb, F, 2): the spectra of each start's kernel windows, window (i, δ) holding the lags
    (δ − 1)·P + 1 … (δ + 1)·P of start i."""
    b = o.b
    right = b.op("Sub", b.op("Mul", b.op("Add", g.nb, o.i(1)), g.p), b.op("Add", o.n0, b.op("Sub", g.p, o.i(1))))
    kp = b.op("Pad", kern, o.cat(b.ints(0, 0, 0), b.op("Sub", g.p1, b.ints(1)), b.ints(0, 0, 0), o.unsq(right, 0)),
              o.f32(0.0))                                          # (B, H, k', (nb + 1)·P)
    widx = b.op("Add", o.unsq(b.op("Mul", g.delta, g.p), 1), b.op("Range", o.i(0), g.p2, o.i(1), dtype=I64))
    wf = _dft(o, o.unsq(b.op("Gather", kp, widx, axis=3), 5), g.p2, 4)   # (B, H, k', nb, P + 1, 2)
    return b.op("Reshape", wf, o.cat(b.ints(0, 0, -1), b.shape_of(wf, 4, 6)))


def _transfer_matrix(o: Ops, g: _Blocks, wf: str, seg_blk: str, seg_own: str, nseg: str) -> str:
    """(B, H, F, [Tr; Ti] (2nb), S): entry (o, s) the window of segment s's start at lag o − block s
    (0 where the lag is negative)."""
    b = o.b
    lag = b.op("Sub", o.unsq(g.delta, 0, 1, 3), o.unsq(seg_blk, 2))   # (B, H, nb, S): o − block s
    pick = b.op("Add", b.op("Mul", o.unsq(seg_own, 2), g.nb), b.op("Max", lag, o.i(0)))
    tm = b.op("GatherND", wf, o.unsq(b.op("Reshape", pick, b.ints(0, 0, -1)), 3), batch_dims=2)  # (B, H, nb·S, F, 2)
    live = o.unsq(b.op("Reshape", o.cmp("GreaterOrEqual", lag, o.i(0)), b.ints(0, 0, -1)), 3, 4)
    tm = o.where(live, tm, o.f32(0.0))
    tm = b.op("Reshape", tm, o.cat(o.bh, g.nb1, nseg, b.ints(-1, 2)))
    tm = b.op("Transpose", tm, perm=[0, 1, 4, 5, 2, 3])            # (B, H, F, 2, nb, S)
    return b.op("Reshape", tm, o.cat(b.ints(0, 0, 0, -1), nseg))


def _noise_per_head(o: Ops, g: _Blocks, kern: str, owns: str, wp: str) -> str:
    """(B, H, 1): Σᵢ ‖kernᵢ‖·‖w on start i's columns‖ × unit × log₂(the dense path's size)."""
    b = o.b
    wsq = o.reduce("ReduceSum", b.op("Mul", owns, o.unsq(b.op("Mul", wp, wp), 2)), [3], keepdims=0)
    s = o.reduce("ReduceSum", b.op("Mul", o.reduce("ReduceL2", kern, [3], keepdims=0), b.op("Sqrt", wsq)), [2])
    bits = o.f32(float((2 * g.static_n - 1).bit_length())) if g.static_n is not None else \
        g.bit_length(b.op("Sub", b.op("Mul", o.n0, o.i(2)), o.i(1)))
    return b.op("Mul", b.op("Mul", s, o.f32(UNIT[torch.float32])), bits)


def _noise_per_block(o: Ops, g: _Blocks, kern: str, owns: str, wp: str) -> str:
    """(B, H, n): the overlap-save path's estimate (package notes), per row block of P: Σ over the
    start blocks reaching it of ‖kernel window‖·‖w on the block‖ × unit × log₂(2P)."""
    b = o.b
    k2 = b.op("Cast", b.op("Mul", kern, kern), to=F64, dtype=F64)
    csum = b.op("Pad", b.op("CumSum", k2, o.i(3)), b.ints(0, 0, 0, 1, 0, 0, 0, 0), o.f64(0.0))   # Σ_{lag < x}
    hi = b.op("Min", b.op("Add", b.op("Mul", b.op("Add", g.delta, o.i(1)), g.p), o.i(1)), o.n0)
    lo = b.op("Min", b.op("Max", b.op("Add", b.op("Mul", b.op("Sub", g.delta, o.i(1)), g.p), o.i(1)), o.i(0)), o.n0)
    wn2 = b.op("Sub", b.op("Gather", csum, hi, axis=3), b.op("Gather", csum, lo, axis=3))
    wn = b.cast(b.op("Sqrt", b.op("Max", wn2, o.f64(0.0))), F32)    # (B, H, k', nb) window norms
    pad = b.op("Sub", b.op("Mul", g.nb, g.p), o.n0)
    wsq = b.op("Mul", owns, o.unsq(b.op("Mul", wp, wp), 2))       # (B, H, k', n)
    wsq = b.op("Pad", wsq, o.cat(b.ints(0, 0, 0, 0, 0, 0, 0), o.unsq(pad, 0)), o.f32(0.0))
    wsq = b.op("Reshape", wsq, o.cat(b.shape_of(owns, 0, 3), o.unsq(g.nb, 0), o.unsq(g.p, 0)))
    xn = b.op("Sqrt", o.reduce("ReduceSum", wsq, [4], keepdims=1))    # (B, H, k', nb, 1) ‖w on segment‖
    lag = b.op("Sub", o.unsq(g.delta, 1), o.unsq(g.delta, 0))      # (nb, nb): o − β
    tm = b.op("Gather", wn, b.op("Max", lag, o.i(0)), axis=3)      # (B, H, k', nb, nb)
    tm = o.where(o.cmp("GreaterOrEqual", lag, o.i(0)), tm, o.f32(0.0))
    per_block = o.reduce("ReduceSum", b.op("MatMul", tm, xn), [2, 4], keepdims=0)       # (B, H, nb)
    bits = o.f32(float(fft_block(g.static_n).bit_length())) if g.static_n is not None else g.bit_length(g.p)
    return b.op("Mul", b.op("Mul", b.op("Gather", per_block, g.blk, axis=2), o.f32(UNIT[torch.float32])), bits)


def _normalise(o: Ops, y: str, noise: str, dv: str):
    """(approx = H̃·(V·w) / H̃·w (B, H, n, dv), bad (B, H, n): the normaliser not above RELIABLE_F32 ×
    its error estimate)."""
    b = o.b
    norm = b.op("Squeeze", b.op("Slice", y, o.unsq(dv, 0), b.ints(BIG.max), b.ints(3)), b.ints(3))   # (B, H, n)
    approx = b.op("Div", b.op("Slice", y, b.ints(0), o.unsq(dv, 0), b.ints(3)),
                  o.unsq(b.op("Max", norm, o.f32(np.finfo(np.float32).tiny)), 3))
    return approx, o.cmp("LessOrEqual", norm, b.op("Mul", noise, o.f32(RELIABLE_F32)))


def _exact_rows(o: Ops, qs, k, v, kb, approx, bad, dv, causal, static_causal) -> str:
    """approx with its unreliable rows recomputed exactly: R = the most in any head, picked by TopK,
    scored against every key (R·n per head) and scattered back."""
    b = o.b
    flag = b.op("Cast", bad, to=F32, dtype=F32)
    r = b.op("Max", b.ints(1), b.op("Cast", o.reduce("ReduceMax", o.reduce("ReduceSum", flag, [2]), [0, 1, 2],
                                                     keepdims=0), to=I64, dtype=I64))
    r = b.op("Reshape", r, b.ints(1))
    vals, rows = o.topk(flag, r, sorted_=0)
    rows4 = o.unsq(rows, 3)                                        # (B, H, R, 1)
    qr = b.op("GatherElements", qs, b.op("Expand", rows4, o.cat(o.bh, r, b.shape_of(qs, 3, 4))), axis=2)
    s = o.softcapped(b.op("MatMul", qr, b.op("Transpose", k, perm=[0, 1, 3, 2])))          # (B, H, R, n)
    if kb is not None:
        s = b.op("Add", s, o.unsq(kb, 2))
    if static_causal is not False:
        after = o.cmp("Greater", o.ar, rows4)
        if static_causal is None:
            after = b.op("And", causal, after, dtype=BOOL)
        s = o.where(after, o.f32(-math.inf), s)
    exact = b.op("MatMul", R.safe_softmax(b, s), v)               # (B, H, R, dv)
    ridx = b.op("Expand", rows4, o.cat(o.bh, r, o.unsq(dv, 0)))
    picked = o.where(o.unsq(o.cmp("Greater", vals, o.f32(0.5)), 3), exact,
                     b.op("GatherElements", approx, ridx, axis=2))
    return b.op("ScatterElements", approx, ridx, picked, axis=2)
