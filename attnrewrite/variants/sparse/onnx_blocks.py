"""sparse's gathered-block lowerings in ONNX (block select=pooled, mode=heads): a ranking of key
blocks per query block, TopK, then attention over only the chosen blocks — O(Lq·kept·block·D),
never an (Lq, Lk) tensor. Static sequence lengths; no mask or a constant causal one."""
from __future__ import annotations

import math

import numpy as np
import torch
from onnx import helper

from ...passes import onnx_rewrite as R
from . import heads
from .blocks import _block_stats, _n_keep

TP, I64 = R.TensorProto, R.TensorProto.INT64


def topk(b, x, k: str, indices: bool = False):
    """The k largest values of x over the last axis, sorted descending (TopK's values output;
    with `indices`, (values, indices))."""
    values, index = b.fresh("TopK"), b.fresh("TopK_indices")
    b.nodes.append(helper.make_node("TopK", [x, k], [values, index], name=b.fresh("TopK_node"),
                                    axis=-1, largest=1, sorted=1))
    b.types[values], b.types[index] = b.dtype(x), I64
    return (values, index) if indices else values


class Blocks:
    """A site cut in blocks of `bs`: the static sizes, the visible-pair counts and budgets (the
    reference's own `_block_stats` / `_n_keep`, constants here), and q, k, v as (B, H, n, bs, D)."""

    def __init__(self, b, site, q, k, v, mask, o, causal: bool, what: str):
        lq, lk = site.q_len, site.kv_len
        if not (isinstance(lq, int) and isinstance(lk, int) and lq > 0 and lk > 0):
            raise R.Unsupported(f"sparse {what}: ONNX needs static sequence lengths")
        if mask is not None:
            if causal or not R.constant_causal(b, mask):
                raise R.Unsupported(f"sparse {what}: ONNX supports no mask or a constant causal one")
            causal = True              # the constant causal mask as the flag: counts are the causal pattern's
        self.b, self.site, self.o, self.causal = b, site, o, causal
        self.lq, self.lk, self.bs = lq, lk, int(o["block"])
        self.nq, self.nk = -(-lq // self.bs), -(-lk // self.bs)
        with torch.no_grad():
            self.count, self.bias = _block_stats(None, causal, lq, lk, self.bs, "cpu")
            self.n_keep = _n_keep(self.count, o, site.heads if isinstance(site.heads, int) else 1)
        self.np_dt = R.helper.tensor_dtype_to_np_dtype(b.dtype(q))
        self.scale = R.resolve_scale(b, site)
        self.q, self.k = q, k
        self.qb, self.kb, self.vb = self.cut(q, lq, self.nq), self.cut(k, lk, self.nk), self.cut(v, lk, self.nk)

    def i64(self, x):
        return self.b.const(np.array(x, np.int64))

    def cut(self, x, n, nb):
        """(B, H, n, D) → (B, H, nb, bs, D), zero-padded."""
        b = self.b
        x = b.op("Pad", x, b.ints(0, 0, 0, 0, 0, 0, nb * self.bs - n, 0), b.scalar_like(0.0, x))
        return b.op("Reshape", x, b.ints(0, 0, nb, self.bs, -1))

    def means(self, xb, n, nb):
        sizes = np.minimum(self.bs, n - np.arange(nb) * self.bs).astype(self.np_dt).reshape(nb, 1)
        return self.b.op("Div", self.b.op("ReduceSum", xb, self.b.ints(3), keepdims=0), self.b.const(sizes))

    def capped(self, s):
        if not self.site.softcap:
            return s
        cap = self.b.scalar_like(float(self.site.softcap), s)
        return self.b.op("Mul", self.b.op("Tanh", self.b.op("Div", s, cap)), cap)

    def pooled_logits(self):
        """z_IJ = scale·q̄_I·k̄_J (soft-capped) + log(visible pairs) + mean bias: (B, H, nq, nk)."""
        b = self.b
        qm, km = self.means(self.qb, self.lq, self.nq), self.means(self.kb, self.lk, self.nk)
        z = self.capped(b.op("MatMul", b.op("Mul", qm, b.scalar_like(self.scale, qm)),
                             b.op("Transpose", km, perm=[0, 1, 3, 2])))
        cnt = self.count.double().numpy()
        extra = np.log(cnt, where=cnt > 0, out=np.full_like(cnt, -np.inf))
        if self.bias is not None:
            extra = extra + np.where(cnt > 0, self.bias.double().numpy() / np.maximum(cnt, 1), 0.0)
        return z, b.op("Add", z, b.const(extra.astype(self.np_dt)))

    def shares(self, z, at=None):
        """exp(at − logsumexp z) over key blocks, at = z unless given (a row of −inf gives zeros)."""
        b = self.b
        lse = b.op("ReduceLogSumExp", z, b.ints(-1), keepdims=1) if b.opset >= 18 else \
            b.op("ReduceLogSumExp", z, axes=[-1], keepdims=1)
        lse = b.op("Where", b.op("IsInf", lse, dtype=TP.BOOL), b.scalar_like(0.0, lse), lse)
        return b.op("Exp", b.op("Sub", z if at is None else at, lse))

    def choose(self, z):
        """(top, idx, valid, kb): the kb best key blocks by z, and whether each is within the budget."""
        b = self.b
        kb = min(int(self.n_keep.max()), self.nk)
        top, idx = topk(b, z, b.ints(kb), indices=True)                           # (B, H, nq, kb)
        valid = b.op("And", b.op("Less", b.const(np.arange(kb, dtype=np.int64)), b.const(self.n_keep.numpy()),
                                 dtype=TP.BOOL),
                     b.op("Greater", top, b.scalar_like(-math.inf, top), dtype=TP.BOOL), dtype=TP.BOOL)
        return top, idx, valid, kb

    def attend(self, idx, valid, kb: int):
        """Each query block attends over its chosen key blocks, gathered from (B·H·nk, bs, D) views:
        keys past Lk, unchosen slots and (causal) keys past a row's diagonal masked; (B, H, Lq, Dv)."""
        b, bs, nq, nk, lq, lk = self.b, self.bs, self.nq, self.nk, self.lq, self.lk
        q = self.q
        bh = b.op("Mul", b.shape_of(q, 0, 1), b.shape_of(q, 1, 2), dtype=I64)
        base = b.op("Reshape", b.op("Mul", b.op("Range", self.i64(0), b.op("Squeeze", bh, b.ints(0)), self.i64(1),
                                                 dtype=I64), self.i64(nk)),
                    b.op("Concat", b.shape_of(q, 0, 2), b.ints(1, 1), axis=0, dtype=I64))
        flat = b.op("Add", idx, base)                                             # (B, H, nq, kb)

        def gathered(xb):
            x = b.op("Reshape", xb, b.op("Concat", b.ints(-1), b.shape_of(xb, 3, 5), axis=0, dtype=I64))
            return b.op("Reshape", b.op("Gather", x, flat, axis=0), b.ints(0, 0, 0, kb * bs, -1))

        kg, vg = gathered(self.kb), gathered(self.vb)
        s = self.capped(b.op("MatMul", b.op("Mul", self.qb, b.scalar_like(self.scale, q)),
                             b.op("Transpose", kg, perm=[0, 1, 2, 4, 3])))        # (B, H, nq, bs, kb·bs)
        j = b.op("Reshape", b.op("Add", b.op("Unsqueeze", b.op("Mul", idx, self.i64(bs)), b.ints(4)),
                                 b.const(np.arange(bs, dtype=np.int64))), b.ints(0, 0, 0, kb * bs))   # key positions
        ok = b.op("And", b.op("Unsqueeze", b.op("Less", j, self.i64(lk), dtype=TP.BOOL), b.ints(3)),
                  b.op("Reshape", b.op("Expand", b.op("Unsqueeze", valid, b.ints(4)), b.ints(1, 1, 1, 1, bs)),
                       b.ints(0, 0, 0, 1, kb * bs)), dtype=TP.BOOL)               # (B, H, nq, 1, kb·bs)
        if self.causal:
            rows = (np.arange(nq * bs).reshape(nq, bs, 1) + (lk - lq)).astype(np.int64)
            ok = b.op("And", ok, b.op("LessOrEqual", b.op("Unsqueeze", j, b.ints(3)), b.const(rows), dtype=TP.BOOL),
                      dtype=TP.BOOL)
        p = b.op("Softmax", b.op("Where", ok, s, b.scalar_like(-math.inf, s)), axis=-1)
        y = b.op("Reshape", b.op("MatMul", p, vg), b.ints(0, 0, nq * bs, -1))
        y = b.op("Slice", y, b.ints(0), b.ints(lq), b.ints(2))
        return R.zero_nan_rows(b, y) if R.rows_can_die(b, self.site, None, self.causal) else y


def pooled_block(b, site, q, k, v, mask, o, causal: bool) -> str:
    """Block mode with select=pooled: the reference's pooled logit (`_pooled_select`) ranks the key
    blocks, TopK keeps the budget (and with mass < 1 stops once the pooled shares of those before
    reach `mass`), then gathered attention. The counts and budgets depend only on the lengths and
    the (constant causal) mask, so they are the reference's own, stored as constants."""
    if o["head_density"]:
        raise R.Unsupported("sparse block: per-head densities (budget=global) have no ONNX lowering")
    g = Blocks(b, site, q, k, v, mask, o, causal, "block select=pooled")
    _, z = g.pooled_logits()
    top, idx, valid, kb = g.choose(z)
    if o["mass"] < 1.0:
        share = b.op("Where", valid, g.shares(z, top), b.scalar_like(0.0, top))
        before = b.op("Sub", b.op("CumSum", share, g.i64(-1)), share)
        valid = b.op("And", valid, b.op("Less", before, b.scalar_like(float(o["mass"]), top), dtype=TP.BOOL),
                     dtype=TP.BOOL)
    return g.attend(idx, valid, kb)


# ---------------------------------------------------------------- mode=heads

def heads_block(b, site, q, k, v, mask, o, causal: bool) -> str:
    """mode=heads: every pattern a head uses ranks the key blocks in the graph as `heads.plan` does
    (window: a constant; vslash: from the last queries; blocks: pooled logits + the guard), each
    head takes its own (a constant choice per head), TopK keeps its budget, blocks heads stop at
    the `mass` threshold, then gathered attention."""
    g = Blocks(b, site, q, k, v, mask, o, causal, "heads")
    if not isinstance(site.heads, int):
        raise R.Unsupported("sparse heads: ONNX needs a static head count")
    chosen = heads.head_patterns(o, site.heads)
    visible = b.const((g.count > 0).numpy())                                     # (1, 1, nq, nk)
    ranks = {}
    share = alike = None
    if heads.WINDOW in chosen:
        ranks[heads.WINDOW] = b.const(heads.window_rank(g.nq, g.nk, g.lq, g.lk, g.bs, "cpu").numpy()
                                      .astype(g.np_dt))
    if heads.VSLASH in chosen:
        ranks[heads.VSLASH] = _vslash(g)
    if heads.BLOCKS in chosen:
        ranks[heads.BLOCKS], share, alike = _guarded_blocks(g)
    z = None
    for pattern, rank in ranks.items():                                          # one rank per head
        z = rank if z is None else b.op("Where", b.const(np.array([x == pattern for x in chosen])
                                                         .reshape(1, -1, 1, 1)), rank, z)
    z = b.op("Where", visible, z, b.scalar_like(-math.inf, q))
    top, idx, valid, kb = g.choose(z)
    if o["mass"] < 1.0 and share is not None:
        got = b.op("GatherElements", b.op("Expand", share, b.shape_of(z, 0, 4)), idx, axis=3)
        before = b.op("Sub", b.op("CumSum", got, g.i64(-1)), got)
        stop = b.op("And", b.op("GreaterOrEqual", before, b.scalar_like(float(o["mass"]), got), dtype=TP.BOOL),
                    b.op("Less", top, b.scalar_like(heads.FIRST / 2, top), dtype=TP.BOOL), dtype=TP.BOOL)
        stop = b.op("And", stop, b.op("Unsqueeze", alike, b.ints(3)), dtype=TP.BOOL)
        stop = b.op("And", stop, b.const(np.array([x == heads.BLOCKS for x in chosen]).reshape(1, -1, 1, 1)),
                    dtype=TP.BOOL)
        valid = b.op("And", valid, b.op("Not", stop, dtype=TP.BOOL), dtype=TP.BOOL)
    return g.attend(idx, valid, kb)


def _vslash(g: Blocks):
    """heads.vslash_rank in the graph: the last queries' softmax p (B, H, nl, Lk) / nl; column mass
    per key block; diagonal mass s_δ by gathering each row at j = i' − δ; the triangle as a Conv;
    read at every block's corner diagonal."""
    b, bs, lq, lk, nq, nk = g.b, g.bs, g.lq, g.lk, g.nq, g.nk
    nl = min(int(g.o["last"]), lq)
    nd = lk + nl - 1
    ql = b.op("Slice", g.q, b.ints(lq - nl), b.ints(lq), b.ints(2))
    s = g.capped(b.op("MatMul", b.op("Mul", ql, b.scalar_like(g.scale, ql)), b.op("Transpose", g.k, perm=[0, 1, 3, 2])))
    if g.causal:                                                                 # keys j ≤ i' = i + Lk − Lq
        rows = np.arange(lq - nl, lq).reshape(nl, 1) + (lk - lq)
        s = b.op("Where", b.const(np.arange(lk).reshape(1, lk) <= rows), s, b.scalar_like(-math.inf, s))
    p = b.op("Div", R.safe_softmax(b, s), b.scalar_like(float(nl), s))
    cols = b.op("Pad", b.op("ReduceSum", p, b.ints(2), keepdims=0), b.ints(0, 0, 0, 0, 0, nk * bs - lk),
                b.scalar_like(0.0, p))
    vert = b.op("ReduceSum", b.op("Reshape", cols, b.ints(0, 0, nk, bs)), b.ints(-1), keepdims=0)   # (B, H, nk)
    r, t = np.arange(nl).reshape(nl, 1), np.arange(nd).reshape(1, nd)
    j = lk - 1 + r - t                                                           # the key on row r's diagonal t
    at = b.op("GatherElements", p, b.op("Expand", b.const(np.clip(j, 0, lk - 1).astype(np.int64)),
                                        b.op("Concat", b.shape_of(p, 0, 3), b.ints(nd), axis=0, dtype=I64)), axis=3)
    at = b.op("Where", b.const((j >= 0) & (j < lk)), at, b.scalar_like(0.0, at))
    diag = b.op("ReduceSum", at, b.ints(2), keepdims=0)                           # (B, H, nd)
    tri = heads._triangle(bs, "cpu").numpy().astype(g.np_dt).reshape(1, 1, -1)
    flat = b.op("Reshape", diag, b.ints(-1, 1, nd))
    diag = b.op("Reshape", b.op("Conv", flat, b.const(tri), pads=[bs - 1, bs - 1]),
                b.op("Concat", b.shape_of(p, 0, 2), b.ints(nd), axis=0, dtype=I64))
    corner = (np.arange(nq).reshape(nq, 1) - np.arange(nk).reshape(1, nk)) * bs + (lk - lq) + nl - 1
    slash = b.op("Gather", diag, b.const(np.clip(corner, 0, nd - 1).astype(np.int64)), axis=2)   # (B, H, nq, nk)
    slash = b.op("Where", b.const((corner >= 0) & (corner < nd)), slash, b.scalar_like(0.0, slash))
    return b.op("Add", b.op("Unsqueeze", vert, b.ints(2)), slash)


def _alike(g: Blocks, xb, n: int, nb: int):
    """heads._alike in the graph: (B, H, nb) bool, the rows' mean cosine to their block mean ≥ SELF_SIMILAR."""
    b = g.b
    m = b.op("Unsqueeze", g.means(xb, n, nb), b.ints(3))                         # (B, H, nb, 1, D)
    norm = lambda x: b.op("Sqrt", b.op("ReduceSum", b.op("Mul", x, x), b.ints(-1), keepdims=0))   # noqa: E731
    dot = b.op("ReduceSum", b.op("Mul", xb, m), b.ints(-1), keepdims=0)           # (B, H, nb, bs)
    xn = norm(xb)
    cos = b.op("Div", dot, b.op("Max", b.op("Mul", xn, norm(m)), b.scalar_like(1e-12, dot)))
    cos = b.op("Where", b.op("Equal", xn, b.scalar_like(0.0, xn), dtype=TP.BOOL), b.scalar_like(1.0, cos), cos)
    real = (np.arange(nb * g.bs) < n).reshape(nb, g.bs)
    mean = b.op("Div", b.op("ReduceSum", b.op("Mul", cos, b.const(real.astype(g.np_dt))), b.ints(-1), keepdims=0),
                b.const(real.sum(-1).astype(g.np_dt)))
    return b.op("GreaterOrEqual", mean, b.scalar_like(heads.SELF_SIMILAR, mean), dtype=TP.BOOL)


def _guarded_blocks(g: Blocks):
    """heads.blocks_rank in the graph: (rank, pooled shares, query blocks alike)."""
    b = g.b
    _, z = g.pooled_logits()
    unlike = b.op("Not", b.op("Unsqueeze", _alike(g, g.kb, g.lk, g.nk), b.ints(2)), dtype=TP.BOOL)
    rank = b.op("Where", unlike, b.op("Add", z, b.scalar_like(heads.FIRST, z)), z)
    return rank, g.shares(z), _alike(g, g.qb, g.lq, g.nq)
