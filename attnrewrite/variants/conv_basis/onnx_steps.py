"""What both ONNX lowerings of conv-basis share: a small node vocabulary over the Builder and the
run-time length (`Ops`), the sampled diagonals' offsets and gap weights, and the start columns —
`find_starts` in ONNX ops (TopK of the estimated ‖bⱼ‖², eps, k ≥ n → every column) or the fixed
ones — written once for the dense and the DFT lowering."""
from __future__ import annotations

import functools
import math

import numpy as np
from onnx import helper

from ...passes import onnx_rewrite as R
from .options import NAME
from .selection import sampled_offsets

ONNX_OFFSET_TABLE_N = 4096   # sequence lengths whose sampled-diagonal offsets are tabulated in the model

TP = R.TensorProto
F32, F64, I64, BOOL = TP.FLOAT, TP.DOUBLE, TP.INT64, TP.BOOL
BIG = np.iinfo(np.int64)


def check_lowerable(site, options: dict) -> None:
    """Unsupported for what no conv-basis lowering covers: Lq ≠ Lk, starts=search."""
    if isinstance(site.q_len, int) and isinstance(site.kv_len, int) and site.q_len != site.kv_len:
        raise R.Unsupported(f"{NAME}: needs q_len == kv_len (got {site.q_len} and {site.kv_len})")
    if options.get("starts") == "search":
        raise R.Unsupported(f"{NAME}: starts=search has no ONNX lowering yet (starts=norm or fixed columns do)")


def same_heads(b, site, k: str, v: str) -> tuple[str, str]:
    """k and v with q's head count (a GQA site's kv heads repeated)."""
    if isinstance(site.heads, int) and isinstance(site.kv_heads, int) and site.heads != site.kv_heads:
        return R.repeat_kv(b, k, site.heads, site.kv_heads), R.repeat_kv(b, v, site.heads, site.kv_heads)
    return k, v


@functools.lru_cache(maxsize=2)
def _offset_table(n_max: int):
    """(n_max + 1, T) int16: row n = find_starts' sorted offsets for length n, padded with -1."""
    rows = [sampled_offsets(n) for n in range(n_max + 1)]
    table = np.full((n_max + 1, max(len(r) for r in rows)), -1, np.int16)
    for n, r in enumerate(rows):
        table[n, :len(r)] = r
    table.flags.writeable = False
    return table


class Ops:
    """The nodes the lowerings are written in, over one Builder `b`: 0-d constants, Where, Unsqueeze,
    Concat, flips, TopK, the site's soft-cap; and the sizes every step reads — bh (2,) = (B, H),
    n1 (1,) = n, n0 = n (0-d), last = n − 1, ar = Range(n), bhn (3,) = (B, H, n)."""

    def __init__(self, b, bh: str, n1: str, softcap: float = 0.0):
        self.b, self.softcap = b, softcap
        self.reduce, self.cmp = b.reduce, b.compare
        self.bh, self.n1 = bh, n1
        self.n0 = b.op("Squeeze", n1, b.ints(0))
        self.last = b.op("Sub", self.n0, self.i(1))
        self.ar = b.op("Range", self.i(0), self.n0, self.i(1), dtype=I64)
        self.bhn = self.cat(bh, n1)

    def f32(self, x) -> str:
        return self.b.const(np.array(x, np.float32))

    def f64(self, x) -> str:
        return self.b.const(np.array(x, np.float64))

    def i(self, x) -> str:
        return self.b.const(np.array(x, np.int64))

    def where(self, c: str, x: str, y: str) -> str:
        return self.b.op("Where", c, x, y, dtype=self.b.dtype(x))

    def unsq(self, x: str, *axes) -> str:
        return self.b.op("Unsqueeze", x, self.b.ints(*axes))

    def cat(self, *xs, axis: int = 0) -> str:
        return self.b.op("Concat", *xs, axis=axis, dtype=self.b.dtype(xs[0]))

    def flip(self, x: str, *axes) -> str:
        """x reversed along `axes` (default: axis 2, the sequence)."""
        axes = axes or (2,)
        ones = [-1] * len(axes)
        b = self.b
        return b.op("Slice", x, b.ints(*ones), b.ints(*[BIG.min] * len(axes)), b.ints(*axes), b.ints(*ones))

    def finite_or_zero(self, x: str) -> str:
        b = self.b
        bad = b.op("Or", b.op("IsInf", x, dtype=BOOL), b.op("IsNaN", x, dtype=BOOL), dtype=BOOL)
        return self.where(bad, b.scalar_like(0.0, x), x)

    def all_true(self, x: str, axes) -> str:
        """Whether every entry of the boolean x holds (over `axes`, to 0-d): ReduceMin of it as int32 > 0."""
        b = self.b
        low = self.reduce("ReduceMin", b.op("Cast", x, to=TP.INT32, dtype=TP.INT32), axes, keepdims=0)
        return self.cmp("Greater", low, b.const(np.array(0, np.int32)))

    def topk(self, x: str, k: str, sorted_: int = 1) -> tuple[str, str]:
        """(values, int64 indices) of the k largest along the last axis."""
        b = self.b
        vals, inds = b.fresh("TopK"), b.fresh("TopK_indices")
        b.nodes.append(helper.make_node("TopK", [x, k], [vals, inds], name=b.fresh("TopK_node"),
                                        axis=-1, largest=1, sorted=sorted_))
        b.types[vals], b.types[inds] = b.dtype(x), I64
        return vals, inds

    def softcapped(self, s: str) -> str:
        """cap·tanh(s / cap), the site's soft-cap on raw scores (s itself without one)."""
        if not self.softcap:
            return s
        b = self.b
        cap = b.scalar_like(float(self.softcap), s)
        return b.op("Mul", b.op("Tanh", b.op("Div", s, cap)), cap)


def diagonal_offsets(o: Ops, static_n: int | None = None) -> tuple[str, int]:
    """((T,) int64 offsets t of the sampled diagonals, −1 = padding; T): `sampled_offsets(n)` as a
    constant for a static n, else the row of a table indexed by the run-time n (n above
    ONNX_OFFSET_TABLE_N reads the last row: an estimate on fewer diagonals than the reference's)."""
    b = o.b
    if static_n is not None:
        table = sampled_offsets(static_n)
        return b.const(np.array(table, np.int64)), len(table)
    cache = b.__dict__.setdefault("_conv_basis_consts", {})
    if "offsets" not in cache:
        cache["offsets"] = b.const(_offset_table(ONNX_OFFSET_TABLE_N))
    offs = b.op("Cast", b.op("Gather", cache["offsets"], b.op("Min", o.n0, o.i(ONNX_OFFSET_TABLE_N)), axis=0),
                to=I64, dtype=I64)
    return offs, _offset_table(ONNX_OFFSET_TABLE_N).shape[1]


def gap_weights(o: Ops, offs: str) -> str:
    """(T,) float64: each sampled diagonal's weight, the gap to the next one (to n after the last)."""
    b = o.b
    nxt = o.cat(b.op("Slice", offs, b.ints(1), b.ints(BIG.max)), b.ints(-1))
    nxt = o.where(o.cmp("GreaterOrEqual", nxt, o.i(0)), nxt, o.n0)
    return b.op("Cast", o.where(o.cmp("GreaterOrEqual", offs, o.i(0)), b.op("Sub", nxt, offs), o.i(0)),
                to=F64, dtype=F64)


def choose_starts(o: Ops, count: int, fixed, eps: float, strict: bool, wp: str, offs: str, gap: str,
                  diagonals) -> str:
    """(B, H, k') start columns of one triangle (unsorted, repeats allowed), as `find_starts` — or
    the fixed columns with 0 added, clamped to n − 1.

    `diagonals(rows)` gives the raw (soft-capped) scores S[j + t, j] (B, H, T, n) in float64 for
    rows = j + t (T, n); entries past the end are masked here. ‖bⱼ‖² = Σₜ gapₜ·(H[j + t, j] −
    H[j + t − 1, j − 1])², H = exp(S − c) with c shared; times the key weight; column 0 forced;
    TopK(Min(k, n)); candidates at or below eps²·(the second largest) repeat column 0; k ≥ n:
    every column."""
    b = o.b
    if fixed is not None:
        st = b.op("Min", b.const(np.array(sorted({0, *[int(s) for s in fixed]}), np.int64)), o.last)
        return b.op("Expand", o.unsq(st, 0, 1), o.cat(o.bh, b.shape_of(st, 0, 1)))
    okt = o.cmp("GreaterOrEqual", offs, o.i(1 if strict else 0))                # (T,)
    rows = b.op("Add", o.unsq(offs, 1), o.ar)                                   # (T, n): j + t
    valid = b.op("And", o.unsq(okt, 1), o.cmp("Less", rows, o.n0), dtype=BOOL)
    d = o.where(valid, diagonals(rows), o.f64(-math.inf))                      # (B, H, T, n)
    h = b.op("Exp", b.op("Sub", d, o.reduce("ReduceMax", d, [2, 3])))
    prev = b.op("Slice", b.op("Pad", h, b.ints(0, 0, 0, 1, 0, 0, 0, 0), o.f64(0.0)), b.ints(0), o.n1, b.ints(3))
    bj = o.where(b.op("And", valid, o.cmp("Greater", o.ar, o.i(0)), dtype=BOOL), b.op("Sub", h, prev), o.f64(0.0))
    norm2 = o.reduce("ReduceSum", b.op("Mul", o.unsq(o.where(okt, gap, o.f64(0.0)), 1), b.op("Mul", bj, bj)), [2],
                     keepdims=0)
    norm2 = b.op("Mul", norm2, b.cast(wp, F64))
    norm2 = o.where(o.cmp("Equal", o.ar, o.i(0)), o.f64(math.inf), norm2)
    kk = b.op("Min", b.ints(int(count)), o.n1)                                  # (1,) k' = min(k, n)
    kk0 = b.op("Squeeze", kk, b.ints(0))
    vals, inds = o.topk(norm2, kk)
    second = b.op("Gather", vals, b.op("Min", o.i(1), b.op("Sub", kk0, o.i(1))), axis=2)
    floor = o.where(o.cmp("Greater", kk0, o.i(1)), b.op("Mul", o.f64(eps * eps), second),
                    b.op("Gather", vals, o.i(0), axis=2))
    keep = b.op("Or", o.cmp("Greater", vals, o.unsq(floor, 2)), o.cmp("Equal", inds, o.i(0)), dtype=BOOL)
    every = o.unsq(b.op("Range", o.i(0), kk0, o.i(1), dtype=I64), 0, 1)
    return o.where(o.cmp("Equal", kk0, o.n0), every, o.where(keep, inds, o.i(0)))
