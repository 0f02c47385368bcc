"""The walks along a decomposed ONNX attention chain, and the site record they fill.

* back from the Softmax input to the q·kᵀ product (`walk_scores`): casts, scalar and
  per-head scales, the soft-cap, additive and boolean masks, one head split or a
  regrouping of the axes before the heads, each read by the rule of its op
  (`OnnxKind.rules`, `OnnxKind.views`) into the detectors' shared step kinds (`vocab`);
* forward from the Softmax to the P·V product (`follow_probs`): casts, inference
  Dropout, the `Where(IsNaN(p), 0, p)` guard, a head merge, a transpose for `v'·pᵀ`;
* the products' operands peeled back to the tensors the normal form is built from:
  scalar scales (`peel_scale`), the key's transpose (`untranspose_key`), the GQA
  repeat (`peel_repeat_kv`), heads merged into the first axis (`unmerge_heads`).

`OnnxSite` is the pass-private record of one site, which these walks and `onnx_detect`'s
rules fill in and `onnx_rewrite` reads back. Shapes, element types and small constants
are read through `onnx_graph.Graph`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import vocab as V
from .onnx_graph import Graph, attr
from .vocab import (ADD, FILL, IGNORE, MASK_FLOOR, NEAR_REGROUP, NEAR_SCALE, OTHER, PRODUCT, SCALE, SOFTCAP, VIEW,
                    GraphKind, NoMatch, check_order, einsum_qk, head_scale, is_mask_fill, is_softcap, rule_table)



# ---------------------------------------------------------------- the site record
@dataclass
class OnnxSite:
    """Pass-private description of one site: how to rebuild its normal form."""
    kind: str                       # decomposed | attention | mha | msattention | gqa
    node: str                       # anchor node name (Softmax or the fused op)
    out: str                        # value the site produces (replaced by the rewrite)
    out_node: str                   # node producing `out`
    q: str = ""
    k: str = ""
    v: str = ""
    q_perm: list | None = None      # Transpose perm that brings q to (B, H, Lq, D); None = as is
    k_perm: list | None = None
    v_perm: list | None = None
    out_perm: list | None = None    # perm from (B, H, Lq, Dv) to the site output's layout
    rank: int = 4
    scale: float | None = None      # None: 1/sqrt(head_dim), resolved at lowering
    softcap: float = 0.0
    causal: bool = False
    biases: list = field(default_factory=list)    # (value, coefficient): added to the scores
    keeps: list = field(default_factory=list)     # (value, keep_when_true): boolean masks
    # a fill with a finite value (finfo.min) in the chain: the masks in forward order, each
    # ("add", value, coefficient) | ("fill", cond, fill value, fill_when_true) | ("scale", c),
    # replayed on a zero bias (a -inf fill commutes with the rest, a finite one does not)
    mask_steps: list = field(default_factory=list)
    # heads merged into the first axis, (B·H, L, D), on part of the site: split by `flat_heads`
    flat_heads: int | None = None
    flat: set = field(default_factory=set)        # roles in that layout: "q", "k", "v", "out"
    flat_masks: set = field(default_factory=set)  # mask/bias values added before the split
    scores: str = ""                # the softmax input: (B, H, Lq, Lk) for a decomposed site
    head_scales: list = field(default_factory=list)   # (value, "mul"|"div"): per-head tensors on q
    # masks added while the scores were regrouped (Swin's (B, nW, H, Lq, Lk)): value -> the
    # leading dims of that layout, to expand and merge the mask by
    regrouped: dict = field(default_factory=dict)
    # fused ops: the op's own inputs/attributes
    inputs: list = field(default_factory=list)
    attrs: dict = field(default_factory=dict)
    heads: int | None = None
    kv_heads: int | None = None
    keep: str = ""                  # non-empty: reported, never rewritten (the reason)


# ---------------------------------------------------------------- the score chain

PASS_CASTS = ("Cast", "Identity")


def _is_fill(g: Graph, name: str) -> bool:
    """A constant fill that removes its key (unknown values are not fills here)."""
    c = g.scalar(name)
    return c is not None and is_mask_fill(c)


def _pass(gk, n):
    """s = Cast(s, to=FLOAT) | Identity(s): the values are unchanged."""
    return n.input[0], None


def _add(gk, n):
    """s = Add(s, bias) | Add(bias, s): an additive bias, or a boolean mask when spelled
    bias = Where(keep, 0, -inf) | Where(drop, -inf, 0) (or finfo.min), the fill step then
    carrying the bias it adds: with a finite fill it is replayed as that bias, since
    s + Where(keep, 0, min) + pad is -inf where both mask a key and min where one does.

        s = Add(Mul(MatMul(q, kᵀ), alpha), Mul(alibi, beta))     baddbmm: s is the left side
        s = Add(MatMul(pos, W), s)                                a bias made by a weight product

    The scores are the side that reaches a q·kᵀ product (`OnnxKind.qk_like`), wherever it is.
    """
    g = gk.g
    a, b = gk.sides(n)
    if a == b:
        raise NoMatch(f"{n.name}: cannot tell scores from bias in Add "
                      f"({'both sides reach' if a else 'neither side reaches'} a q·kᵀ product)")
    x, bias = (n.input[0], n.input[1]) if a else (n.input[1], n.input[0])
    w = g.op(bias, "Where")
    if w is not None and g.scalar(w.input[1]) == 0.0 and _is_fill(g, w.input[2]):
        return x, V.fill(w.input[0], w.input[2], False, bias)  # Where(keep, 0, -inf)
    if w is not None and g.scalar(w.input[2]) == 0.0 and _is_fill(g, w.input[1]):
        return x, V.fill(w.input[0], w.input[1], True, bias)   # Where(drop, -inf, 0)
    return x, V.add(bias, 1.0)


def _sub(gk, n):
    """s = Sub(s, bias)."""
    a, b = gk.sides(n)
    if a and not b:
        return n.input[0], V.add(n.input[1], -1.0)
    raise NoMatch(f"{n.name}: Sub does not subtract a bias from the scores")


def _scale(gk, n):
    """s = Mul(s, c) | Mul(c, s) | Div(s, c), c a constant scalar.

    s = Mul(Tanh(Div(s, cap)), cap) is read as a soft-cap.
    """
    g, op = gk.g, n.op_type
    c = g.scalar(n.input[1])
    if c is not None:
        t = n.input[0]
    elif op == "Mul" and g.scalar(n.input[0]) is not None:
        c, t = g.scalar(n.input[0]), n.input[1]
    else:
        return _tensor_scale(gk, n)
    tanh = g.op(t, "Tanh")
    if op == "Mul" and tanh is not None:          # cap * tanh(s / cap)
        inner = g.op(tanh.input[0], "Div", "Mul")
        ic = g.scalar(inner.input[1]) if inner is not None else None
        if ic is None:
            raise NoMatch(f"{n.name}: unsupported soft-cap form")
        if not is_softcap(c, inner.op_type.lower(), ic):
            raise NoMatch(f"{n.name}: tanh soft-cap with mismatched constants")
        return inner.input[0], V.softcap(c)
    if c == 1.0:
        return t, None                            # Mul(s, 1): no scale
    return t, V.scale(op.lower(), c)


def _tensor_scale(gk, n):
    """s = Mul(s, t) | Mul(t, s) | Div(s, t), t a tensor constant along the queries and keys
    (`head_scale`): Swin V2's Exp(Clip(logit_scale)), XCiT's temperature, both (H, 1, 1)."""
    g, op = gk.g, n.op_type
    a, b = gk.sides(n)
    if a == b:
        raise NoMatch(f"{n.name}: cannot tell scores from scale in {op}", near=NEAR_SCALE)
    if op == "Div" and not a:
        raise NoMatch(f"{n.name}: divides by the scores")
    x, t = (n.input[0], n.input[1]) if a else (n.input[1], n.input[0])
    if not head_scale(g.shape(t), g.shape(x), same_dim) or g.elem_type(t) not in FLOATS:
        raise NoMatch(f"{n.name}: scores {op} by a tensor of shape {g.shape(t)} that varies along the "
                      f"queries or keys of scores {g.shape(x)}", near=NEAR_SCALE)
    return x, V.scale(op.lower(), t, g.shape(x))


# the floating element types, by the names torch gives them
FLOAT_NAMES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.DOUBLE: "float64"}
FLOATS = tuple(FLOAT_NAMES)


def _where(gk, n):
    """s = Where(keep, s, -inf) | Where(drop, -inf, s): a boolean mask."""
    cond, a, b = n.input
    if _is_fill(gk.g, b) and not _is_fill(gk.g, a):
        return a, V.fill(cond, b, False)
    if _is_fill(gk.g, a):
        return b, V.fill(cond, a, True)
    raise NoMatch(f"{n.name}: Where fill is not a mask value (≤ {MASK_FLOOR:g})")


def _head_split(src, out) -> bool:
    """(B·H, Lq, Lk) → (B, H, Lq, Lk): rank 3 to 4, the last two dims kept, H a known int.

    Reshape keeps the row-major order, so with the last two dims unchanged the first axis
    can only be split as n = b·H + h (the layout torch's view(B, H, Lq, Lk) reads).
    """
    return (src is not None and out is not None and len(src) == 3 and len(out) == 4
            and same_dim(src[1], out[2]) and same_dim(src[2], out[3]) and isinstance(out[1], int) and out[1] > 0)


def _head_merge(src, out) -> bool:
    """(B, H, Lq, Lk) → (B·H, Lq, Lk): the inverse of `_head_split`."""
    return _head_split(out, src)


def _same_shape(src, out) -> bool:
    return src is not None and out is not None and len(src) == len(out) and all(map(same_dim, src, out))


def _view(gk, n):
    """s = Reshape(s, (B, H, Lq, -1)) of (B·H, Lq, Lk) scores: the head split after a
    bmm/baddbmm product (Bloom's ALiBi); a Reshape regrouping only the axes before the heads
    (Swin's shifted-window mask, `_regroup`); a Reshape that keeps the shape is no step.

        s = Add(Mul(MatMul(q3, kᵀ3), alpha), Mul(alibi3, beta))     # baddbmm, (B·H, Lq, Lk)
        s = Reshape(s, (B, H, Lq, -1)) + mask4                        # the split, then 4-D masks
    """
    g = gk.g
    src, out = g.shape(n.input[0]), g.shape(n.output[0])
    if _same_shape(src, out):
        return n.input[0], None
    if _head_split(src, out) or _regroup(src, out):
        return n.input[0], V.view(src, out, n)
    raise NoMatch(f"{n.name}: Reshape of the scores {src} → {out} is neither a (B·H, Lq, Lk) → "
                  "(B, H, Lq, Lk) head split nor a regrouping of the axes before the heads", near=NEAR_REGROUP)


def _regroup(src, out) -> bool:
    """(B·nW, H, Lq, Lk) ↔ (B, nW, H, Lq, Lk): both of rank ≥ 4 with the same last three dims
    (heads, queries, keys), so only the axes before the heads are regrouped (Reshape keeps
    the element count, hence their product)."""
    return (src is not None and out is not None and len(src) >= 4 and len(out) >= 4
            and all(same_dim(a, b) and a is not None for a, b in zip(src[-3:], out[-3:])))


def _bare_tanh(gk, n):
    """s = Tanh(s) without the soft-cap's scales around it: not in the normal form."""
    raise NoMatch(f"{n.name}: tanh on the scores without a soft-cap scale")


class OnnxKind(GraphKind):
    """The shared walks on an ONNX graph: a value is a name, computed by at most one node."""
    products = frozenset({"MatMul", "Einsum"})
    rules = rule_table(
        (PASS_CASTS, _pass),
        (("Add",), _add),
        (("Sub",), _sub),
        (("Mul", "Div"), _scale),
        (("Where",), _where),
        (("Tanh",), _bare_tanh),
    )
    views = rule_table((("Reshape",), _view))

    def __init__(self, g: Graph):
        self.g = g
        self.lenient = False
        self.transposed: set = set()     # forward walk: the probabilities with their last two axes swapped

    def _swaps_last2(self, n, x: str) -> bool:
        r = self.g.rank(x)
        return r is not None and r >= 2 and list(attr(n, "perm", [])) == [*range(r - 2), r - 1, r - 2]

    def qk_like(self, node) -> bool:
        """A MatMul/Einsum whose two operands are computed (traced back through scalar
        scales, transposes, reshapes and casts, neither is a constant weight): q·kᵀ can
        be, x·W (a bias projected by a weight) cannot.

            Add(Mul(MatMul(q, kᵀ), a), Mul(bias, b))     the left side reaches the scores
            Add(scores, MatMul(pos_table, W))             the right side does not
        """
        weights = [is_weight(self.g, peel_scale(self.g, i)[0]) for i in node.input[:2]]
        return not all(weights) if self.lenient else not any(weights)

    def sides(self, n) -> tuple[bool, bool]:
        """Which inputs of a two-sided step reach a q·kᵀ product. When neither reaches one
        whose operands are both computed, a product with one weight counts (a learned
        query: attention pooling)."""
        a, b = (self.reaches_product(i) for i in n.input[:2])
        if not a and not b:
            self.lenient = True
            try:
                a, b = (self.reaches_product(i) for i in n.input[:2])
            finally:
                self.lenient = False
        return a, b

    def producer(self, x):
        return self.g.producer.get(x)

    def op(self, node):
        return node.op_type

    def inputs(self, node) -> list:
        return list(node.input)

    def readers(self, x) -> list:
        return self.g.consumers(x)

    def name(self, node) -> str:
        return node.name

    def origin(self, x) -> str:
        return f"graph input {x!r}"

    def classify_reader(self, u, p: str):
        if u.op_type in self.products and u.input[0] == p:
            if p in self.transposed:
                return OTHER                      # MatMul(Transpose(p), x): over the queries
            return PRODUCT                        # MatMul(p, v) | Einsum("bhqk,bhkd->bhqd", p, v)
        if u.op_type == "MatMul" and u.input[1] == p and p in self.transposed and u.input[0] != p:
            return PRODUCT                        # MatMul(v', Transpose(p)) = (p·v'ᵀ)ᵀ (EfficientViT-MSRA)
        if u.op_type == "Transpose" and not self.transposed and self._swaps_last2(u, p) \
                and [c.op_type for c in self.g.consumers(u.output[0])] == ["MatMul"]:
            self.transposed.add(u.output[0])
            return [u.output[0]]
        if u.op_type == "Where" and u.input[2] == p:
            isnan = self.g.op(u.input[0], "IsNaN")
            if isnan is not None and isnan.input[0] == p:
                return [u.output[0]]              # Where(IsNaN(p), 0, p): the NaN guard
        if u.op_type in PASS_CASTS or (u.op_type == "Dropout" and len(u.input) < 3):
            return [u.output[0]]                  # Cast(p) | Dropout(p, ratio) at inference
        if u.op_type == "Reshape" and u.input[0] == p:
            src, out = self.g.shape(p), self.g.shape(u.output[0])
            if _same_shape(src, out) or _head_merge(src, out):
                return [u.output[0]]              # Reshape(p, (B·H, Lq, Lk)) before a bmm with v
        if u.op_type == "IsNaN":
            return IGNORE                         # read by the NaN guard above
        return OTHER


def walk_scores(g: Graph, x: str, site: OnnxSite):
    """From the softmax input back to the product; collects scale, soft-cap and masks.

    Read from the softmax backwards, a scale met so far multiplies everything added
    further up, so each bias is recorded with the product of the factors seen before it.

    A head split (VIEW) of (B·H, Lq, Lk) scores into (B, H, Lq, Lk) may appear once; the
    masks added before it are in the merged layout and are marked `flat`. Instead, the axes
    before the heads may be regrouped and back (Swin: (B·nW, H, N, N) → (B, nW, H, N, N),
    + the window mask, → (B·nW, H, N, N)); a mask added in between is `regrouped`. A per-head
    tensor scale (before every mask, `check_order`) goes to q (`head_scales`). When a fill is
    finite (where(keep, s, finfo.min)), the masks are also kept in order (`mask_steps`):
    where(keep, s, min) + pad ≠ s + where(keep, 0, -inf) + pad on a row whose keys are
    all masked (left padding: the original spreads it over the filled keys).
    """
    prod, steps = OnnxKind(g).walk_back(x)
    check_order(steps)
    splits = [st for st in steps if st.kind == VIEW and _head_split(st.shape_in, st.shape_out)]
    if len(splits) > 1:
        raise NoMatch("the scores are split by heads more than once")
    if splits:
        site.flat_heads = int(splits[0].shape_out[1])
    final = g.shape(x)
    factor, flat, layout, seen = 1.0, False, None, {}
    for st in reversed(steps):
        kind = st.kind
        if kind == SCALE and st.shape is not None:     # a per-head tensor: a scale on q
            if flat or layout is not None:
                raise NoMatch(f"a per-head scale on scores {st.shape} laid out unlike the softmax's {final}",
                              near=NEAR_SCALE)
            site.head_scales.append((st.value, st.how))
        elif kind == SCALE:
            if st.how == "div" and st.value == 0:
                raise NoMatch("division of the scores by zero")
            factor *= st.value if st.how == "mul" else 1.0 / st.value
        elif kind == SOFTCAP:
            site.softcap = st.cap
        elif kind == VIEW and _head_split(st.shape_in, st.shape_out):
            if layout is not None:
                raise NoMatch("the scores are split by heads while regrouped", near=NEAR_REGROUP)
            flat = True
        elif kind == VIEW:                             # walking back: now in the layout before it
            layout = None if _same_shape(st.shape_in, final) else st.shape_in
        elif kind in (ADD, FILL):
            values = [st.bias] if kind == ADD else [st.cond] + ([st.bias] if st.bias is not None else [])
            for value in values:
                where = (flat, None if layout is None else tuple(layout[:-3]))
                if seen.setdefault(value, where) != where:
                    raise NoMatch(f"{value} masks the scores in two layouts (before and after a reshape)",
                                  near=NEAR_REGROUP)
                if flat:
                    site.flat_masks.add(value)
                if layout is not None:
                    site.regrouped[value] = list(layout[:-3])
            if kind == ADD:
                site.biases.append((st.bias, st.coef * factor))
            else:
                site.keeps.append((st.cond, not st.drops))
    if layout is not None:
        raise NoMatch(f"the scores are regrouped from {layout} to {final} and not back", near=NEAR_REGROUP)
    fills = [g.scalar(st.value) for st in steps if st.kind == FILL]
    if any(math.isfinite(v) for v in fills):
        masked = False
        for st in steps:
            if st.kind == ADD:
                masked = True
                site.mask_steps.append(("add", st.bias, st.coef))
            elif st.kind == FILL and st.bias is not None:   # an added Where(keep, 0, min): the bias it is
                masked = True
                site.mask_steps.append(("add", st.bias, 1.0))
            elif st.kind == FILL:
                masked = True
                site.mask_steps.append(("fill", st.cond, g.scalar(st.value), st.drops))
            elif st.kind == SCALE and masked:
                site.mask_steps.append(("scale", st.value if st.how == "mul" else 1.0 / st.value))
    return prod, factor


# ---------------------------------------------------------------- operands
def peel_scale(g: Graph, x: str) -> tuple[str, float]:
    """Strip scalar Mul/Div (and casts) off a product operand: (value, factor)."""
    f = 1.0
    while True:
        n = g.producer.get(x)
        if n is None:
            return x, f
        if n.op_type in ("Mul", "Div") and g.scalar(n.input[1]) is not None:
            c = g.scalar(n.input[1])
            f *= (1.0 / c) if n.op_type == "Div" else c
            x = n.input[0]
        elif n.op_type == "Mul" and g.scalar(n.input[0]) is not None:
            f *= g.scalar(n.input[0])
            x = n.input[1]
        else:
            return x, f


def _swap_last2(perm: list) -> list:
    return [*perm[:-2], perm[-1], perm[-2]]


def untranspose_key(g: Graph, kt: str, rank: int) -> tuple[str, list | None]:
    """(value, perm) with k = Transpose(value, perm) exactly; perm None means k = value.

    Composes any producing Transpose with the last-two swap, so the result is exact
    whatever the perm was (a permuted K is never mistaken for a transposed one).
    """
    n = g.producer.get(kt)
    if n is not None and n.op_type == "Transpose":
        perm = list(attr(n, "perm", list(range(rank - 1, -1, -1))))
        p = _swap_last2(perm)
        return n.input[0], (None if p == list(range(rank)) else p)
    if n is not None and n.op_type == "Reshape":                 # dynamo: Reshape→T([0,2,1])→Reshape
        t = g.op(n.input[0], "Transpose")
        r = g.op(t.input[0], "Reshape") if t is not None else None
        if r is not None and list(attr(t, "perm", [])) == [0, 2, 1]:
            src, outer, inner = g.shape(r.input[0]), g.shape(kt), g.shape(t.input[0])
            if (src and outer and inner and len(outer) == rank and len(inner) == 3
                    and same_dim(src[-1], outer[-2]) and same_dim(src[-2], outer[-1])
                    and same_dim(inner[1], src[-2]) and same_dim(inner[2], src[-1])):
                if len(src) == rank and all(same_dim(a, b) for a, b in zip(src[:-2], outer[:-2])):
                    return r.input[0], None
                k0 = repeat_kv_source(g, r.input[0], [*outer[:-2], outer[-1], outer[-2]])
                if k0 is not None:                               # repeat_kv reshaped straight to 3-D
                    return k0, None
    return kt, _swap_last2(list(range(rank)))


def repeat_kv_source(g: Graph, x: str, target: list | None) -> str | None:
    """k0 when `x` = Expand|Tile(Unsqueeze(k0, 2)) is k0's heads repeated into `target` dims.

    `target` is the 4-D (B, H, L, D) shape the expanded value is reshaped to; shapes
    must prove (B, Hkv, n, L, D) → (B, Hkv·n, L, D), i.e. repeat_interleave of heads.
    """
    e = g.op(x, "Expand", "Tile")      # Tile only on the new axis: the shape check below
    u = g.op(e.input[0], "Unsqueeze") if e is not None else None
    if u is None or not target or len(target) != 4:
        return None
    axes = g.const(u.input[1]) if len(u.input) > 1 else np.array(attr(u, "axes", []))
    src, mid = g.shape(u.input[0]), g.shape(e.output[0])
    if axes is None or list(np.ravel(axes)) != [2] or not src or not mid or len(src) != 4 or len(mid) != 5:
        return None
    rep = mid[2]
    ok = (all(same_dim(src[i], mid[j]) for i, j in ((0, 0), (1, 1), (2, 3), (3, 4)))
          and same_dim(target[0], src[0]) and same_dim(target[2], src[2]) and same_dim(target[3], src[3])
          and isinstance(rep, int) and isinstance(src[1], int) and target[1] == src[1] * rep)
    return u.input[0] if ok else None


def peel_repeat_kv(g: Graph, x: str) -> str:
    """k before `repeat_kv` (Unsqueeze(2) → Expand → Reshape), when shapes prove it."""
    r = g.op(x, "Reshape")
    return (repeat_kv_source(g, r.input[0], g.shape(x)) if r is not None else None) or x


def einsum_scores(g: Graph, n, site: OnnxSite) -> tuple[str, str, int]:
    """q, k from Einsum("bhqd,bhkd->bhqk")-like scores: perms to (B, H, L, D)."""
    qp, kp = einsum_qk(einsum_equation(n))
    if len(qp) != 4:
        raise NoMatch(f"{n.name}: einsum equation is not a rank-4 q·kᵀ")
    site.q_perm = None if qp == [0, 1, 2, 3] else qp
    site.k_perm = None if kp == [0, 1, 2, 3] else kp
    return n.input[0], n.input[1], 4


def unmerge_heads(g: Graph, x: str, heads: int) -> str | None:
    """x4 when `x` = Reshape(x4) merges x4's (B, H) into its first axis, H = `heads`.

        q3 = Reshape(Transpose(q4, [0, 2, 1, 3]), (B·H, L, D))     → Transpose(...), (B, H, L, D)

    Reshape keeps the row-major order, so (B, H, L, D) → (B·H, L, D) → split by H is x4.
    """
    r = g.op(x, "Reshape")
    if r is None:
        return None
    src, out = g.shape(r.input[0]), g.shape(x)
    ok = (src is not None and out is not None and len(src) == 4 and len(out) == 3
          and src[1] == heads and same_dim(src[2], out[1]) and same_dim(src[3], out[2]))
    return r.input[0] if ok else None


# ---------------------------------------------------------------- probabilities
def follow_probs(g: Graph, p: str):
    """From the softmax output forward to the P·V product (casts, dropout, NaN guard, a
    head merge): (product, the probabilities value it reads, other consumers)."""
    prod, x, _, others = OnnxKind(g).follow_forward(p)
    return prod, x, others


# ---------------------------------------------------------------- graph reading
def same_dim(a, b) -> bool:
    """Two dims known and equal (an unknown dim equals none)."""
    return a is not None and b is not None and a == b


def is_weight(g: Graph, name: str) -> bool:
    """True for a constant (initializer/Constant), possibly reshaped, transposed or cast."""
    for _ in range(6):
        if name in g.inits or g.op(name, "Constant") is not None:
            return True
        n = g.op(name, "Transpose", "Reshape", "Cast", "Unsqueeze", "Squeeze", "Expand", "Identity")
        if n is None:
            return False
        name = n.input[0]
    return False


def depends_on(g: Graph, x: str, target: str, limit: int = 4096) -> bool:
    """Value `x` is computed from value `target` (searched back through producers)."""

    def inputs(v):
        n = g.producer.get(v)
        return [] if n is None else [i for i in n.input if i]

    return V.reaches(x, inputs, lambda v: v == target, limit)


def einsum_equation(n) -> str:
    """An Einsum node's equation attribute, as text."""
    e = attr(n, "equation", "")
    return e.decode() if isinstance(e, bytes) else e
