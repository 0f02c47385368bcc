"""The walks along an FX attention chain, from its softmax.

* back from the softmax input to the q·kᵀ product (`walk_scores`): each step of the
  score chain — casts, views, scales, the soft-cap, additive and boolean masks, in place
  or not — read by the rule of its op (`FxKind.rules`) into the detectors' shared step
  kinds (`vocab`);
* forward from the softmax to the single P·v product (`follow_probs`), through the
  steps that keep the probabilities' values and layout (`FxKind.classify_reader`);
* the products' operands peeled back to the tensors the normal form is built from
  (`score_operands`, `value_operand`, `peel`, `peel_kv_repeat`), only through steps
  that keep the element mapping (see fx_graph's layouts).

`fx_detect` puts these together into sites.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from . import vocab as V
from .fx_graph import (ADDS, BADDBMM, CASTS, DIVS, DROPOUTS, EXPAND, FILLS, IN_PLACE, MULS, NOOPS, PERMUTES,
                       PRODUCERS, PRODUCTS, RESHAPES, SHAPE_ONLY, SQUEEZES, SUBS, TANH, VIEWS, WHERES, aten,
                       axis_map, base_op, const_value, data_axes, dtype_of, is_identity, is_scalar, is_swap2,
                       last2_pattern, node_kind, regroups_lead, same_dim, same_shape, shape_of, val_of)
from .vocab import (IGNORE, MASK_FLOOR, NEAR_REGROUP, NEAR_SCALE, OTHER, PRODUCT, GraphKind, NoMatch, einsum_pv,
                    einsum_qk, head_scale, is_mask_fill, is_softcap, rule_table)


# ----------------------------------------------------------------------------- operands
@dataclass
class Operand:
    """A normal-form tensor: `node`, permuted by `perm` (None = as is)."""
    node: Node
    perm: list | None = None
    kv_root: Node | None = None      # the un-repeated K/V when GQA was peeled

    @property
    def shape(self):
        s = list(val_of(self.node).shape)
        return [s[i] for i in self.perm] if self.perm else s


def _peel(node: Node, factors: list | None) -> tuple[Node, bool]:
    """Walk back from a product operand through steps that keep its layout (see fx_graph's layouts).

    Returns (root, swapped): the operand equals `root` with its last two axes swapped when
    `swapped`, leading axes regrouped and size-1 axes added, dropped or moved, times the
    scalar `factors` collected (None: stop at scalar scales, they stay on the tensor).
    A run of permutes may pass through other orders, as long as it ends at the operand's
    own or its transpose; the root is the furthest point where it does and whose last two
    axes are the meaningful ones; the factors collected beyond it are dropped again.
    """
    pat = last2_pattern(shape_of(node))
    m = pat.count(False) if pat is not None else 0
    if m == 0:
        return node, False
    pi = list(range(len(data_axes(shape_of(node)))))     # rest point's data axis r is node's pi[r]
    swapped = False
    best = (node, swapped, len(factors or ()))
    for _ in range(32):
        if node.op != "call_function" or node.target in IN_PLACE or peel_kv_repeat(node) is not None:
            break      # stop at repeat_kv's (B, H, L, D) view so the GQA root is found
        t = node.target
        sigma = axis_map(node)
        if sigma is not None:
            pi = [sigma[r] for r in pi]
        elif t in RESHAPES and is_identity(pi) and regroups_lead(shape_of(node.args[0]), shape_of(node), m):
            pi = list(range(len(data_axes(shape_of(node.args[0])))))
        elif factors is not None and t in MULS | DIVS and isinstance(node.args[0], Node) \
                and is_scalar(node.args[1]) and same_shape(shape_of(node.args[0]), shape_of(node)):
            factors.append((node.args[1], "mul" if t in MULS else "div"))
        else:
            break
        node = node.args[0]
        if m == 2 and is_swap2(pi):
            swapped, pi = not swapped, list(range(len(pi)))
        if is_identity(pi) and last2_pattern(shape_of(node)) in (pat, pat[::-1]):
            best = (node, swapped, len(factors or ()))
    root, swapped, kept = best
    if factors is not None:
        del factors[kept:]
    if m == 1:      # one data axis: the size-1 one may sit on either side of it
        swapped = last2_pattern(shape_of(root)) != pat
    return root, swapped


def peel(node: Node, factors: list, constants=None) -> tuple[Node, bool]:
    """_peel collecting scalar scales into `factors` (q and kᵀ of the score product)."""
    return _peel(node, factors)


def peel_no_scale(node: Node) -> tuple[Node, bool]:
    """_peel that stops at scalar scales (used where a scale must stay on its tensor: v)."""
    return _peel(node, None)


def peel_kv_repeat(node: Node) -> Node | None:
    """The un-repeated (B, Hkv, L, D) tensor behind a GQA/MQA head repeat, if any.

    view(clone?(expand(unsqueeze(x, 2), [B, Hkv, r, L, D])), [B, Hkv*r, L, D])   (repeat_kv)
    expand(x, [B, H, L, D]) with x (B, 1, L, D)                                   (MQA)
    repeat_interleave(x, r, dim=1)
    """
    shape = shape_of(node)
    if shape is None or len(shape) != 4:
        return None
    n = node
    if n.op == "call_function" and n.target == aten.repeat_interleave.self_int:
        dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
        return n.args[0] if dim in (1, -3) else None
    if n.op == "call_function" and n.target == aten.expand.default:
        s = shape_of(n.args[0])
        if len(s) == 4 and same_dim(s[1], 1) and same_dim(s[0], shape[0]) and same_shape(s[2:], shape[2:]):
            return n.args[0]
        return None
    if not (n.op == "call_function" and n.target in VIEWS - {aten.expand.default}):
        return None
    n = n.args[0]
    while n.op == "call_function" and n.target in NOOPS:
        n = n.args[0]
    if not (n.op == "call_function" and n.target == aten.expand.default):
        return None
    s5 = shape_of(n)
    if len(s5) != 5:
        return None
    u = n.args[0]
    us = shape_of(u)
    if len(us) != 5 or not same_dim(us[2], 1):
        return None
    if u.op == "call_function" and u.target == aten.unsqueeze.default and u.args[1] in (2, -3):
        x = u.args[0]
    else:
        return None
    xs = shape_of(x)
    ok = (same_dim(xs[0], shape[0]) and same_dim(s5[1] * s5[2], shape[1]) and same_shape(xs[2:], shape[2:]))
    return x if ok else None


# ----------------------------------------------------------------------------- scores

def _check_fill_value(val, constants, where: str):
    """A fill fixed in the graph must remove its key; one computed at run time is trusted."""
    c = const_value(val, constants)
    if c is not None and not is_mask_fill(c):
        raise NoMatch(f"{where} sets scores to {c:g}: a fill above {MASK_FLOOR:g} is not a mask")


COPY_ = aten.copy_.default


def _copied(gk, n: Node):
    """s = buf.copy_(t) (its result is what both export and Dynamo's graphs read next): the
    buffer now holds t, whatever it held before (a broadcasting copy is not the scores)."""
    if not isinstance(n.args[1], Node) or shape_of(n.args[1]) != shape_of(n.args[0]):
        raise NoMatch(f"{n.name} copies a broadcast value into the scores' buffer")
    return n.args[1], None


def _pass(gk, n: Node):
    """s = s.to(torch.float32) | s.clone() | s.contiguous() | s.detach_(): the values are unchanged."""
    return n.args[0], None


def _view(gk, n: Node):
    """s = s.view(B * H, Lq, Lk) | s.unsqueeze(1) | s.unsqueeze_(1): replayed on the bias when it follows one."""
    return n.args[0], V.view(shape_of(n.args[0]), shape_of(n), n)


def _permute(gk, n: Node):
    """s = s.permute(0, 1, 2, 4, 3) of (B, H, Lq, 1, Lk) | s.transpose(1, 2) of (B, 1, H, Lk):
    only a size-1 axis moves, so it is a view in effect (core ATen einsum, see fx_graph's layouts).

    Anything else reorders the scores: s.transpose(-2, -1) is softmax over the queries.
    """
    sigma = axis_map(n)
    if sigma is None or not is_identity(sigma):
        raise NoMatch(f"{n.name} reorders the axes of the scores", near=NEAR_REGROUP)
    return n.args[0], V.view(shape_of(n.args[0]), shape_of(n), n)


def _scale(gk, n: Node):
    """s = s * c | c * s | s / c | s.mul_(c) | s.div_(c), c a float, 0-d tensor or SymFloat,
    or a tensor constant along the queries and keys (`head_scale`: Swin V2's
    `logit_scale.clamp(max=…).exp()`, XCiT's `temperature`, both (H, 1, 1)).

    s = cap * tanh(s / cap) is read as a soft-cap (see _softcap).
    """
    t = base_op(n)
    i = gk.score_arg(n)
    other = n.args[1 - i]
    if i == 1 and t in DIVS:
        raise NoMatch(f"{n.name} divides by the scores")
    src = n.args[i]
    if not is_scalar(other):
        if not head_scale(shape_of(other), shape_of(n), same_dim) or not (dtype_of(other) or torch.int64).is_floating_point:
            raise NoMatch(f"{n.name} multiplies the scores by a tensor of shape {shape_of(other)} that varies "
                          f"along the queries or keys of scores {shape_of(n)}", near=NEAR_SCALE)
        return src, V.scale("mul" if t in MULS else "div", other, shape_of(n))
    if t in MULS and isinstance(src, Node) and src.op == "call_function" and base_op(src) == TANH:
        return _softcap(gk, src, other)
    return src, V.scale("mul" if t in MULS else "div", other)


def _softcap(gk, tanh: Node, cap):
    """s = cap * tanh(s / cap) | cap * tanh(s * (1 / cap)) | s.div_(cap).tanh_().mul_(cap),
    both constants fixed in the graph."""
    cap = const_value(cap, gk.constants)
    inner = tanh.args[0]
    if cap is None or not (isinstance(inner, Node) and inner.op == "call_function" and base_op(inner) in MULS | DIVS):
        raise NoMatch(f"{tanh.name}: tanh on the scores is not a soft-cap")
    how = "div" if base_op(inner) in DIVS else "mul"
    c = const_value(inner.args[1], gk.constants)
    if not is_softcap(cap, how, c):
        raise NoMatch(f"{tanh.name}: tanh on the scores is not a soft-cap ({cap:g} * tanh(s {how} {c}))")
    return inner.args[0], V.softcap(cap)


def _add(gk, n: Node):
    """s = s + bias | bias + s | s - bias | s + alpha * bias | s.add_(bias) | s.sub_(bias):
    an additive mask or bias."""
    t = base_op(n)
    i = gk.score_arg(n)
    if i == 1 and t in SUBS:
        raise NoMatch(f"{n.name} negates the scores")
    alpha = n.kwargs.get("alpha", 1)
    return n.args[i], V.add(n.args[1 - i], -alpha if t in SUBS else alpha)


def _masked_fill(gk, n: Node):
    """s = s.masked_fill(drop, -inf) | s.masked_fill_(drop, -inf): the keys where `drop` is true are removed."""
    _check_fill_value(n.args[2], gk.constants, n.name)
    return n.args[0], V.fill(n.args[1], n.args[2], True)


def _where(gk, n: Node):
    """s = where(keep, s, finfo.min) | where(drop, -inf, s): a boolean mask."""
    i = gk.score_arg(n, (1, 2))
    val = n.args[3 - i]
    _check_fill_value(val, gk.constants, n.name)
    return n.args[i], V.fill(n.args[0], val, i == 2)     # fill where cond (score in "else")


def _bare_tanh(gk, n: Node):
    """s = tanh(s) | s.tanh_() without the soft-cap's scales around it: not in the normal form."""
    raise NoMatch(f"{n.name}: tanh on the scores without a soft-cap scale")


def _with_twins(*rows):
    """rule_table rows, each op's in-place twin (IN_PLACE) added to the row of its op."""
    return [(set(ops) | {tw for tw, op in IN_PLACE.items() if op in ops}, read) for ops, read in rows]


class FxKind(GraphKind):
    """The shared walks on an ATen FX graph: a value is the Node computing it.

    In-place steps (`s.masked_fill_(m, -inf)`) are read by the rule of their op, provided
    the tensor they write is the scores (`score_arg` 0); a step writing into its other
    operand (`bias.add_(s)`) is refused. Whether anyone else sees the write is the
    rewrite's business (fx_rewrite keeps such a step).
    """
    products = PRODUCERS
    rules = rule_table(*_with_twins(
        (CASTS | NOOPS, _pass),
        (VIEWS, _view),
        (PERMUTES, _permute),
        (MULS | DIVS, _scale),
        (ADDS | SUBS, _add),
        (FILLS, _masked_fill),
        (WHERES, _where),
        ({TANH}, _bare_tanh),
        ({COPY_}, _copied),
    ))

    def __init__(self, constants=None):
        self.constants = constants
        self.layout: dict = {}       # forward walk: value -> axis map from the probabilities (None: theirs)
        self.pattern = (False, False)

    def producer(self, x):
        return x if isinstance(x, Node) and x.op == "call_function" else None

    def op(self, node):
        return node.target

    def inputs(self, node) -> list:
        return [a for a in node.args if isinstance(a, Node)]

    def readers(self, x) -> list:
        return list(x.users)

    def name(self, node) -> str:
        return node.name

    def origin(self, x) -> str:
        return x if not isinstance(x, Node) else node_kind(x)

    def score_arg(self, node: Node, candidates=(0, 1)) -> int:
        """The argument of a two-sided step holding the scores: the first leading back to q·kᵀ.

        An in-place step must hold them in the tensor it writes (argument 0).
        """
        hits = [i for i in candidates if i < len(node.args) and self.reaches_product(node.args[i])]
        if not hits:
            raise NoMatch(f"{node.name} ({node.target}) does not lead back to a q·kᵀ product")
        if node.target in IN_PLACE and hits[0] != 0:
            raise NoMatch(f"{node.name} writes the scores in place into another tensor ({node.target})")
        return hits[0]

    def start_forward(self, p: Node) -> None:
        """Before follow_forward(p): the probabilities' own layout is the reference."""
        self.pattern = last2_pattern(shape_of(p))
        self.layout = {p: None}

    def classify_reader(self, u: Node, p: Node):
        """What `u` does with the probabilities `p` (see GraphKind).

        Steps that keep the values are followed: casts, clone, dropout, the safe-softmax
        guard, lead-only views and any run of permutes/(un)squeezes; the P·v product must
        read them in their own layout (a run of permutes that ends where it started).
        """
        t = base_op(u) if u.op == "call_function" else None
        pi = self.layout.get(p)
        if u.op == "call_function" and u.target in IN_PLACE and u.args[0] is not p:
            return OTHER                      # writes the probabilities into another tensor
        if (t in PRODUCTS and u.args[0] is p) or (t == aten.einsum.default and p in u.args[1]):
            if pi is None and last2_pattern(shape_of(p)) == self.pattern:
                return PRODUCT                # p @ v | einsum("bhqk,bhkd->bhqd", p, v)
            return OTHER                      # p reordered: p.transpose(-2, -1) @ v
        if t in PRODUCTS and u.args[1] is p and u.args[0] is not p:
            swapped = (pi is not None and is_swap2(pi)) or self.pattern.count(False) <= 1   # (size-1 axes: the pattern says)
            if swapped and last2_pattern(shape_of(p)) == self.pattern[::-1]:
                return PRODUCT                # v' @ p.transpose(-2, -1) = (p @ v'ᵀ)ᵀ (EfficientViT-MSRA)
            return OTHER
        sigma = axis_map(u) if t in PERMUTES | SQUEEZES | NOOPS | {EXPAND} else None
        if sigma is not None:                 # p.permute(...) | p.unsqueeze(4) | p.clone()
            new = sigma if pi is None else [pi[r] for r in sigma]
            return self._follow([u], None if is_identity(new) else new)
        if t in RESHAPES and pi is None and regroups_lead(shape_of(p), shape_of(u), self.pattern.count(False)):
            return self._follow([u], None)    # p.view(B * H, Lq, Lk)
        if t in RESHAPES and same_shape(shape_of(p), shape_of(u)):
            return self._follow([u], pi)      # a view to the same shape (core ATen's matmul), any layout
        if t in CASTS:
            return self._follow([u], pi)      # p.to(dtype)
        if t == aten.native_dropout.default:
            return self._follow([g for g in u.users if g.target is operator.getitem and g.args[1] == 0], pi)
        if t in DROPOUTS:
            return self._follow([u], pi)      # dropout(p, 0.1, train) | dropout_(p, 0.1, train)
        if t in SHAPE_ONLY:
            return IGNORE                     # reads only shape/metadata, not the values
        if t in WHERES and u.args[2] is p and const_value(u.args[1]) == 0.0:
            return self._follow([u], pi)      # the safe-softmax guard: where(dead_row, 0, p)
        return OTHER

    def _follow(self, nodes: list, pi) -> list:
        for n in nodes:
            self.layout[n] = pi
        return nodes


def walk_scores(x: Node, constants) -> tuple[Node, list]:
    """From the softmax input back to the product; returns (product, forward steps)."""
    return FxKind(constants).walk_back(x)


def score_operands(prod: Node, steps: list, factors: list, constants):
    """(q Operand, k Operand) of the q·kᵀ product; baddbmm adds its scale/bias steps."""
    t = prod.target
    if t in PRODUCTS | BADDBMM:
        a, b = (prod.args[1], prod.args[2]) if t in BADDBMM else prod.args[:2]
        if len(shape_of(a)) < 2 or len(shape_of(b)) < 2:
            raise NoMatch(f"{prod.name}: a vector product is not q·kᵀ")
        if t in BADDBMM:
            beta, alpha = prod.kwargs.get("beta", 1), prod.kwargs.get("alpha", 1)
            pre = [V.scale("mul", alpha)] if alpha != 1 else []
            if beta != 0:
                pre.append(V.add(prod.args[0], beta))
            steps[:0] = pre
        qr, qs = peel(a, factors, constants)
        kr, ks = peel(b, factors, constants)
        q = Operand(qr, _swap_perm(qr) if qs else None)
        k = Operand(kr, None if ks else _swap_perm(kr))      # k = (kᵀ)ᵀ
        return q, k
    q_perm, k_perm = einsum_qk(prod.args[0])
    qa, ka = prod.args[1]
    return Operand(qa, q_perm), Operand(ka, k_perm)


def _swap_perm(node: Node) -> list:
    nd = len(shape_of(node))
    return list(range(nd - 2)) + [nd - 1, nd - 2]


# ----------------------------------------------------------------------------- probabilities
def follow_probs(sm: Node):
    """From the softmax forward to the single P·v product.

    Returns (product, P node it reads, dropout_p, dropout_active, other consumers).
    """
    kind = FxKind()
    kind.start_forward(sm)
    prod, p, followed, others = kind.follow_forward(sm)
    dropout_p, active = 0.0, False
    for u in followed:
        if base_op(u) in DROPOUTS:
            rate = float(u.args[1])
            train = u.args[2] if len(u.args) > 2 else u.kwargs.get("train", True)
            dropout_p, active = max(dropout_p, rate), active or bool(train and rate > 0)
    return prod, p, dropout_p, active, others


def value_operand(prod: Node, p: Node):
    """(v Operand, P·v lead dims, output permutation) of the P·v product.

    A scale on v stays inside v (peel_no_scale): it is not a score scale. The product may
    also be written transposed, v' @ pᵀ with v' (…, Dv, Lk): its output is (…, Dv, Lq).
    """
    plead = shape_of(p)[:-2]
    if prod.target in PRODUCTS and prod.args[1] is p:      # o' = v' @ pᵀ: v = v'ᵀ, o = o'ᵀ
        vr, vs = peel_no_scale(prod.args[0])
        return Operand(vr, None if vs else _swap_perm(vr)), plead, _swap_perm(prod)
    if prod.target in PRODUCTS:
        vr, vs = peel_no_scale(prod.args[1])
        return Operand(vr, _swap_perm(vr) if vs else None), plead, None
    pi = list(prod.args[1]).index(p)
    v_perm, perm = einsum_pv(prod.args[0], pi)
    return (Operand(prod.args[1][1 - pi], v_perm), plead,
            None if perm == list(range(len(perm))) else perm)
