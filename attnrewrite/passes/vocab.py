"""The detectors' shared vocabulary.

`fx_detect` (ATen FX graphs) and `onnx_detect` (ONNX graphs) look for the same thing,

    softmax(scale · q·kᵀ [soft-capped] + bias) · v

so everything that does not depend on how a graph stores its nodes lives here: the
`NoMatch` exception, the mask floor, how far back a q·kᵀ product is searched for, the
einsum equations, the kinds of step a score chain is made of and the order they must
come in, the two walks (back from the softmax to the product, forward from the
softmax to the P·v product) and a bounded reachability search (`reaches`). Each detector supplies a `GraphKind`: how to get from a
value to its producer and readers, and a table of rules for its spellings of each step.

A score-chain step is a named tuple whose first field is its kind (made by the functions
of the same name)::

    scale(how, value)                       s = s * value  |  s / value   (how: "mul" | "div")
    scale(how, t, shape)                    s = s * t, t a tensor constant along (Lq, Lk): a per-head
                                            scale, `shape` the scores' where it applies
    softcap(cap)                            s = cap * tanh(s / cap)
    add(bias, coef)                         s = s + coef * bias
    fill(cond, value, drops=True)           s = where(cond, value, s)     (cond drops keys)
    fill(cond, value, drops=False)          s = where(cond, s, value)     (cond keeps keys)
    fill(cond, value, drops, bias)          s = s + bias, bias = where(cond, value, 0) if drops
                                            else where(cond, 0, value)    (ONNX: a fill added as a bias)
    view(shape_in, shape_out, node)         s = s.view(...)               (ONNX: the head split, or a
                                            regrouping of the axes before the heads)

A cast (or any other step that leaves the values alone) contributes no step.
"""
from __future__ import annotations

import math

from typing import NamedTuple

from ..site import MASK_FLOOR

__all__ = ["NoMatch", "NEAR", "NEAR_SCALE", "NEAR_REGROUP", "NEAR_QUERY", "miss", "MASK_FLOOR", "PRODUCT_DEPTH", "CHAIN_LIMIT", "SOFTCAP_RTOL",
           "SCALE", "SOFTCAP", "ADD", "FILL", "VIEW", "Scale", "Softcap", "Add", "Fill", "View",
           "scale", "softcap", "add", "fill", "view", "PRODUCT", "IGNORE", "OTHER",
           "is_mask_fill", "is_softcap", "check_order", "head_scale", "probs_read_elsewhere", "mask_kind", "default_scale",
           "parse_einsum", "einsum_qk", "einsum_pv", "rule_table", "reaches", "GraphKind"]


class NoMatch(Exception):
    """A candidate that is not attention (or not one we can describe); the message says why.

    `near` names the accepted form the candidate came closest to (one of `NEAR`), so that
    `--list --verbose` can say in one line what kind of spelling a miss is.
    """

    def __init__(self, message: str, near: str | None = None):
        super().__init__(message)
        self.near = near


NEAR_SCALE = "per-head scale"          # a tensor multiplies the scores
NEAR_REGROUP = "regrouped scores"      # the scores are reshaped or permuted before the softmax
NEAR_QUERY = "constant query"          # a weight (or nothing computed from the input) on one side
NEAR = (NEAR_SCALE, NEAR_REGROUP, NEAR_QUERY)


def miss(e: NoMatch) -> str:
    """The one-line reason a softmax was skipped, with the accepted form it came closest to."""
    return f"{e} (closest form: {getattr(e, 'near', None) or 'none of ' + ', '.join(NEAR)})"


PRODUCT_DEPTH = 24    # steps searched back from a value for a q·kᵀ product (see reaches_product)
CHAIN_LIMIT = 64      # steps walked back from the softmax before giving up
SOFTCAP_RTOL = 1e-5   # how closely the two constants of a soft-cap must undo each other

SCALE, SOFTCAP, ADD, FILL, VIEW = "scale", "softcap", "add", "fill", "view"
PRODUCT, IGNORE, OTHER = "product", "ignore", "other"     # what a reader of the probabilities is


class Scale(NamedTuple):
    """s = s * value | s / value."""
    kind: str
    how: str                     # "mul" | "div"
    value: object                # a number, or the graph value holding the factor
    shape: list | None = None    # a per-head tensor: the scores' shape where it applies


class Softcap(NamedTuple):
    """s = cap * tanh(s / cap)."""
    kind: str
    cap: float


class Add(NamedTuple):
    """s = s + coef * bias."""
    kind: str
    bias: object
    coef: float


class Fill(NamedTuple):
    """s = where(cond, value, s) when `drops` (cond removes keys), else where(cond, s, value);
    with `bias`, ONNX's Where(cond, 0, value) added to the scores (that Where is `bias`)."""
    kind: str
    cond: object
    value: object
    drops: bool
    bias: object = None


class View(NamedTuple):
    """s = s.view(...): shape_in → shape_out, by `node`."""
    kind: str
    shape_in: list
    shape_out: list
    node: object


def scale(how: str, value, shape=None) -> Scale:
    return Scale(SCALE, how, value, shape)


def softcap(cap: float) -> Softcap:
    return Softcap(SOFTCAP, cap)


def add(bias, coef) -> Add:
    return Add(ADD, bias, coef)


def fill(cond, value, drops: bool, bias=None) -> Fill:
    return Fill(FILL, cond, value, drops, bias)


def view(shape_in, shape_out, node) -> View:
    return View(VIEW, shape_in, shape_out, node)


# ----------------------------------------------------------------------------- rules
def is_mask_fill(value: float) -> bool:
    """A fill value removes its key from the softmax when at or below the mask floor.

    where(m, s, -inf) and masked_fill(m, finfo.min) are masks; where(m, s, -1.0) is not.
    """
    return value <= MASK_FLOOR


def is_softcap(cap: float | None, how: str, c: float | None) -> bool:
    """cap * tanh(s / c) or cap * tanh(s * c) is a soft-cap when the inner scale undoes `cap`.

    30 * tanh(s / 30) and 30 * tanh(s * 0.0333333) are; 30 * tanh(s / 10) is not.
    """
    if cap is None or c is None or cap == 0 or c == 0:
        return False
    inner = c if how == "mul" else 1.0 / c
    return math.isclose(cap * inner, 1.0, rel_tol=SOFTCAP_RTOL)


def check_order(steps: list) -> None:
    """Raise NoMatch unless the steps (forward order) fit the normal form.

    The normal form soft-caps the scaled scores and masks the capped ones, so scales
    come before the one soft-cap and masks after it::

        s = s * c;  s = cap * tanh(s / cap);  s = s + bias     fits
        s = s + bias;  s = cap * tanh(s / cap)                 a mask inside the cap
        s = cap * tanh(s / cap);  s = s * c                    a scale outside the cap

    A per-head scale (a tensor) must also come before the masks: there, and only there,
    it is a scale on q per head.
    """
    capped = masked = False
    for st in steps:
        kind = st.kind
        if kind == SCALE and capped:
            raise NoMatch("a scale after the soft-cap is outside the normal form")
        if kind == SCALE and st.shape is not None and masked:
            raise NoMatch("a per-head scale after a mask is outside the normal form", near=NEAR_SCALE)
        if kind == SOFTCAP:
            if capped:
                raise NoMatch("a second soft-cap is outside the normal form")
            if masked:
                raise NoMatch("a mask before the soft-cap is outside the normal form")
            capped = True
        elif kind in (ADD, FILL):
            masked = True


def probs_read_elsewhere(readers) -> str:
    """Why a site whose probabilities something else reads is kept: that reader (e.g.
    `nn.MultiheadAttention(need_weights=True)` averaging them into the returned weights)
    needs the dense softmax, so a rewrite would add its op to the dense work, not replace it."""
    return (f"the probabilities are also read by {', '.join(sorted(set(readers)))} (e.g. need_weights=True): "
            "the dense scores stay, so the site is kept")


def head_scale(t_shape, s_shape, same) -> bool:
    """A tensor of shape `t_shape` times scores of shape `s_shape` is a scale per head (per
    leading index): it broadcasts into the scores without growing them and is constant
    along the last two axes, the queries and the keys, so it is a scale on q per head.
    `same(a, b)` compares two dims (ints or symbols).

        logit_scale (H, 1, 1) · s (B, H, Lq, Lk)      yes (Swin V2; XCiT's temperature)
        t (1, H, 1, 1), t (B, H, 1, 1)                 yes
        t (H, Lq, 1), t (Lk,)                          no: it varies along the queries / keys
    """
    if t_shape is None or s_shape is None or len(t_shape) > len(s_shape) or len(s_shape) < 2:
        return False
    aligned = [1] * (len(s_shape) - len(t_shape)) + list(t_shape)
    return all(same(a, 1) for a in aligned[-2:]) and all(same(a, 1) or same(a, d)
                                                        for a, d in zip(aligned[:-2], s_shape[:-2]))


def mask_kind(additive: bool, boolean: bool) -> str:
    """The reported mask: "additive" when any bias is added (boolean masks fold into it)."""
    return "additive" if additive else ("boolean" if boolean else "none")


def default_scale(head_dim) -> float:
    """The scale of the normal form when the graph gives none: 1/√head_dim."""
    return 1.0 / math.sqrt(head_dim)


# ----------------------------------------------------------------------------- einsum
def parse_einsum(eq: str) -> tuple[str, str, str]:
    """'bhqd, bhkd -> bhqk' -> ('bhqd', 'bhkd', 'bhqk').

    Only an explicit two-operand product with no letter repeated within a term is read;
    anything else (implicit output, '...', a trace 'ii->i') raises NoMatch.
    """
    eq = eq.replace(" ", "")
    if "..." in eq or eq.count("->") != 1:
        raise NoMatch(f"einsum '{eq}' uses an implicit output or ellipsis")
    lhs, out = eq.split("->")
    ops = lhs.split(",")
    if len(ops) != 2:
        raise NoMatch(f"einsum '{eq}' is not a two-operand product")
    if any(len(set(t)) != len(t) for t in (*ops, out)):
        raise NoMatch(f"einsum '{eq}' repeats an axis within a term")
    return ops[0], ops[1], out


def einsum_qk(eq: str) -> tuple[list, list]:
    """The q·kᵀ scores einsum 'bhqd,bhkd->bhqk' (any letters, orders, number of batch axes).

    Returns (q_perm, k_perm): the permutations bringing q and k to (batch..., L, D), the
    batch axes in the output's order; NoMatch unless exactly one axis is contracted and
    the last two output axes come one from each side.
    """
    a, b, out = parse_einsum(eq)
    if len(out) < 2:
        raise NoMatch(f"einsum '{eq}' does not produce a score matrix")
    iq, ik, batch = out[-2], out[-1], out[:-2]
    c = (set(a) & set(b)) - set(out)
    if len(c) != 1 or set(a) != set(batch) | {iq} | c or set(b) != set(batch) | {ik} | c:
        raise NoMatch(f"einsum '{eq}': axes do not line up as q·kᵀ")
    (c,) = c
    return [a.index(x) for x in batch + iq + c], [b.index(x) for x in batch + ik + c]


def einsum_pv(eq: str, p_index: int) -> tuple[list, list]:
    """The P·v einsum 'bhqk,bhkd->bhqd', P being operand `p_index` (0 or 1).

    Returns (v_perm, out_perm): v_perm brings v to (batch..., Lk, Dv); out_perm takes
    the canonical (batch..., Lq, Dv) result to the einsum's output order. NoMatch
    unless P's last (key) axis is the one contracted with v.
    """
    a, b, out = parse_einsum(eq)
    pl, wl = (a, b) if p_index == 0 else (b, a)
    key, dv = pl[-1], set(wl) - set(pl)
    if len(dv) != 1 or set(wl) != set(pl[:-2]) | {key} | dv or set(out) != set(pl[:-1]) | dv:
        raise NoMatch(f"einsum '{eq}': probabilities are not contracted over the key axis")
    (dv,) = dv
    canon = pl[:-1] + dv
    return [wl.index(x) for x in pl[:-2] + key + dv], [canon.index(x) for x in out]


# ----------------------------------------------------------------------------- walks
def rule_table(*rows) -> dict:
    """{op: read} from rows (ops, read); an op may appear in one row only.

    read(gk, node) -> (scores before the step, step or None), gk being the `GraphKind`
    walking; it raises NoMatch when the node has the op but not a spelling it knows.
    """
    table = {}
    for ops, read in rows:
        for op in ops:
            if op in table:
                raise ValueError(f"{op} is in two score-chain rules")
            table[op] = read
    return table


def reaches(start, successors, goal, limit: int = 4096) -> bool:
    """Whether a depth-first search from `start` along `successors(node)` meets a node for which
    `goal(node)` holds, visiting at most `limit` distinct nodes; a search that hits the limit says
    True (the callers' safe answer: a value kept, a dependence assumed)."""
    stack, seen = [start], set()
    while stack and len(seen) < limit:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        if goal(x):
            return True
        stack.extend(successors(x))
    return len(seen) >= limit


class GraphKind:
    """What the shared walks need to know about one kind of graph.

    A subclass sets `products` (the ops computing q·kᵀ) and `rules` (a `rule_table` of
    the steps allowed between the product and the softmax) and says how to go from a
    value to the node computing it and to the nodes reading it. `views` (also a
    `rule_table`, read the same way) holds reshapes of the scores a graph kind keeps
    apart from its value steps (ONNX: the (B·H, Lq, Lk) → (B, H, Lq, Lk) head split);
    FX keeps its views in `rules`.
    """
    products: frozenset = frozenset()
    rules: dict = {}
    views: dict = {}

    def producer(self, x):
        """The op node computing value `x`, or None (a graph input or a constant)."""
        raise NotImplementedError

    def op(self, node):
        """The key `rules` and `products` are looked up by (aten target, op_type)."""
        raise NotImplementedError

    def inputs(self, node) -> list:
        """The values a node reads."""
        raise NotImplementedError

    def readers(self, x) -> list:
        """The nodes reading value `x`."""
        raise NotImplementedError

    def classify_reader(self, node, x):
        """What `node` does with the probabilities `x`: PRODUCT (P·v), IGNORE (reads
        only their shape), OTHER (another consumer) or a list of values that still hold
        the probabilities (casts, dropout, guards), to follow."""
        raise NotImplementedError

    def name(self, node) -> str:
        raise NotImplementedError

    def origin(self, x) -> str:
        """How to name a value no node computes, in a NoMatch message."""
        raise NotImplementedError

    def qk_like(self, node) -> bool:
        """Whether a product node could compute q·kᵀ (both operands computed, neither a
        weight). The default takes every product; `reaches_product` asks it so that a bias
        computed by a product of its own (x·W, a position table times a weight) is not
        mistaken for the scores."""
        return True

    def reaches_product(self, x, depth: int = PRODUCT_DEPTH) -> bool:
        """True when a q·kᵀ product (see `qk_like`) is fewer than `depth` score-chain steps behind `x`."""
        frontier, seen = [x], set()
        for _ in range(depth):
            nxt = []
            for v in frontier:
                node = self.producer(v)
                if node is None or v in seen:
                    continue
                seen.add(v)
                op = self.op(node)
                if op in self.products:
                    if self.qk_like(node):
                        return True
                    continue
                if op in self.rules or op in self.views:
                    nxt.extend(self.inputs(node))
            frontier = nxt
        return False

    def walk_back(self, x) -> tuple[object, list]:
        """From the softmax input back to the q·kᵀ product: (product, steps in forward order)."""
        steps = []
        for _ in range(CHAIN_LIMIT):
            node = self.producer(x)
            if node is None:
                raise NoMatch(f"scores come from {self.origin(x)}, not a q·kᵀ product")
            op = self.op(node)
            if op in self.products:
                return node, steps[::-1]
            read = self.rules.get(op) or self.views.get(op)
            if read is None:
                raise NoMatch(f"scores come from {op} ({self.name(node)}): "
                              "not a q·kᵀ product, scale, mask, cast or soft-cap")
            x, step = read(self, node)
            if step is not None:
                steps.append(step)
        raise NoMatch("scores chain too long")

    def follow_forward(self, p) -> tuple[object, object, list, list]:
        """From the softmax output forward to the one P·v product.

        Returns (product, the value of the probabilities it reads, the readers followed
        on the way, other consumers).
        """
        frontier, products, followed, others = [p], [], [], []
        while frontier:
            x = frontier.pop()
            for u in list(self.readers(x)):
                what = self.classify_reader(u, x)
                if what == PRODUCT:
                    products.append((u, x))
                elif what == OTHER:
                    others.append(u)
                elif what != IGNORE:
                    followed.append(u)
                    frontier.extend(what)
        if not products:
            names = ", ".join(sorted({str(self.op(o)) for o in others})) or "none"
            raise NoMatch(f"probabilities are not contracted with a value tensor (consumers: {names})")
        if len(products) > 1:
            raise NoMatch("probabilities feed several products")
        (prod, x), = products
        return prod, x, followed, others
