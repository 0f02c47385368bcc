"""Find every scaled-dot-product attention in an ATen-level FX graph.

Two rules, each a plain function that either returns an `FxSite` or raises `NoMatch`
with the reason (which `--list --verbose` prints for every softmax left unmatched):

* `match_fused` — `aten.scaled_dot_product_attention` and its backend ops::

      out = sdpa(q, k, v, attn_mask=m, is_causal=c, scale=s, enable_gqa=g)

* `match_decomposed` — anchored on a softmax over the last axis, walked backwards to a
  q·kᵀ product and forwards to a P·v product::

      s = matmul|bmm|einsum|baddbmm(q', kᵀ')     # kᵀ' any tensor whose last two axes are (D, Lk)
      s = s * c | s / c | cast | view            # scale: float, 0-d tensor, SymFloat
      s = cap * tanh(s / cap)                    # optional soft-cap (Gemma2)
      s = s + bias | masked_fill(m, -inf) | where(m, s, min)   # masks, any mix
      p = softmax(s, -1) [casts, dropout, safe-softmax guard, lead-only views]
      o = matmul|bmm|einsum(p, v')

  Every step may be written in place (`s.masked_fill_(m, -inf)`, `s.div_(c)`,
  `s.tanh_()`, `F.dropout(p, inplace=True)`), and a view may be a permute that only
  moves axes of size 1 (core ATen's einsum).

The normal form is built from the operands *as the products see them*: q' and kᵀ'
are peeled back only through steps that provably keep the element mapping (lead-only
views, a transpose of exactly the last two axes, size-1 axes added, dropped or moved,
scalar scales, the repeat_kv expand), so a permuted K is never mistaken for a
transposed one (see "layouts").

Each site records the lowest precision it computes in (`compute_dtype`): fp32 q and k
with `p.half() @ v.half()` compute P·v in fp16, which sets the exact check's tolerance.

The step kinds, the order they must come in, the einsum equations and the two walks are
the detectors' shared vocabulary (`vocab`); `FxKind` holds this graph kind's spellings.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..site import AttentionSite, dim_value
from . import vocab as V
from .vocab import (ADD, FILL, IGNORE, MASK_FLOOR, NEAR_QUERY, NEAR_REGROUP, NEAR_SCALE, OTHER, PRODUCT,
                    SCALE, SOFTCAP, VIEW, GraphKind, NoMatch, check_order, default_scale, einsum_pv, einsum_qk,
                    head_scale, is_mask_fill, is_softcap, mask_kind, miss, probs_read_elsewhere, rule_table)

aten = torch.ops.aten


def _ops(*names):
    out = set()
    for name in names:
        packet, _, overload = name.partition(".")
        p = getattr(aten, packet, None)
        if p is not None and hasattr(p, overload or "default"):
            out.add(getattr(p, overload or "default"))
    return out


SOFTMAX = _ops("softmax.int", "_softmax.default", "_safe_softmax.default")
PRODUCTS = _ops("matmul.default", "bmm.default", "mm.default")
CASTS = _ops("_to_copy.default", "to.dtype", "to.dtype_layout", "to.device", "type_as.default")
NOOPS = _ops("clone.default", "contiguous.default", "alias.default", "detach.default")
SQUEEZES = _ops("unsqueeze.default", "squeeze.dim", "squeeze.dims", "squeeze.default")
RESHAPES = SQUEEZES | _ops("view.default", "reshape.default", "_unsafe_view.default", "flatten.using_ints",
                          "unflatten.int")
EXPAND = aten.expand.default
VIEWS = RESHAPES | {EXPAND}
PERMUTES = _ops("permute.default", "transpose.int", "t.default")
MULS = _ops("mul.Tensor", "mul.Scalar")
DIVS = _ops("div.Tensor", "div.Scalar")
ADDS = _ops("add.Tensor", "add.Scalar")
SUBS = _ops("sub.Tensor", "sub.Scalar")
FILLS = _ops("masked_fill.Scalar", "masked_fill.Tensor")
WHERES = _ops("where.self", "where.ScalarOther", "where.ScalarSelf", "where.Scalar")
TANH = aten.tanh.default
DROPOUTS = _ops("dropout.default", "native_dropout.default")
FUSED = _ops("scaled_dot_product_attention.default",
             "_scaled_dot_product_flash_attention_for_cpu.default",
             "_scaled_dot_product_flash_attention.default",
             "_scaled_dot_product_efficient_attention.default",
             "_scaled_dot_product_cudnn_attention.default")
SHAPE_ONLY = _ops("full_like.default", "empty_like.default", "zeros_like.default", "ones_like.default",
                  "_assert_tensor_metadata.default", "sym_size.int", "sym_numel.default")
BADDBMM = _ops("baddbmm.default", "baddbmm_.default")     # in place: s = empty(...).baddbmm_(q, kᵀ, beta=0)
PRODUCERS = PRODUCTS | _ops("einsum.default") | BADDBMM
# Ops that always return a new tensor (never an alias of an input): an in-place step
# writing into one that nothing else reads changes nothing anyone can see.
FRESH = (PRODUCERS - {aten.baddbmm_.default}) | MULS | DIVS | ADDS | SUBS | FILLS | WHERES | SOFTMAX | \
    _ops("tanh.default", "_to_copy.default", "clone.default")


def _in_place_twins(ops) -> dict:
    """{in-place twin: op} for the ops that have one: mul.Tensor → mul_.Tensor, tanh → tanh_."""
    out = {}
    for op in ops:
        packet = getattr(aten, op.overloadpacket.__name__ + "_", None)
        twin = getattr(packet, op._overloadname, None) if packet is not None else None
        if twin is not None:
            out[twin] = op
    return out


# Every op the score chain accepts is also accepted in place (`s.masked_fill_(~m, -inf)`,
# Falcon's `s.div_(sqrt(d))`, `s.tanh_()`), read by the same rule as long as the tensor
# written is the scores themselves. Casts, views other than (un)squeeze/transpose, and
# where have no in-place twin in ATen; softmax has none either. The probabilities' steps
# get theirs too (`F.dropout(p, inplace=True)` is `dropout_`).
IN_PLACE = _in_place_twins(CASTS | NOOPS | VIEWS | PERMUTES | MULS | DIVS | ADDS | SUBS | FILLS | WHERES
                           | DROPOUTS | {TANH})


def _base(n: Node):
    """The out-of-place op of `n` (mul_.Tensor → mul.Tensor); its own target otherwise."""
    return IN_PLACE.get(n.target, n.target)


# ----------------------------------------------------------------------------- records
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


@dataclass
class FxSite:
    """How to rebuild one site's normal form from its graph (see fx_rewrite)."""
    out: Node                        # its uses are replaced by the op's output
    anchor: Node                     # softmax or fused node, for names and provenance
    q: Operand
    k: Operand
    v: Operand
    lead: list                       # canonical lead dims (the probabilities')
    pv_lead: list                    # lead dims of the P·V product
    out_perm: list | None = None     # einsum output order of the P·V product
    scale: float = 1.0
    scale_nodes: list = field(default_factory=list)   # [(node, "mul"|"div")]
    softcap: float = 0.0
    bias_steps: list = field(default_factory=list)    # forward-order replay steps
    mask: Node | None = None         # fused: attn_mask as given
    causal: bool = False             # the op's causal flag
    dropout_p: float = 0.0
    dropout_active: bool = False
    mask_kinds: set = field(default_factory=set)
    others: list = field(default_factory=list)   # other consumers of the probabilities, live
    dead_readers: list = field(default_factory=list)   # ... and ones nothing uses (erased by the rewrite)
    compute_dtype: torch.dtype | None = None     # the lowest precision the site computes in


# ----------------------------------------------------------------------------- helpers
def val_of(n):
    return n.meta.get("val") if isinstance(n, Node) else n


def shape_of(n):
    v = val_of(n)
    return list(v.shape) if isinstance(v, torch.Tensor) else None


def dtype_of(n):
    v = val_of(n)
    return v.dtype if isinstance(v, torch.Tensor) else None


def same_dim(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def same_shape(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(same_dim(x, y) for x, y in zip(a, b))


def numel_of(dims):
    return math.prod(dims) if dims else 1


def is_scalar(x) -> bool:
    """A python/symbolic number, or a node holding a one-element tensor or a sym value."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    if isinstance(x, Node):
        v = val_of(x)
        if isinstance(v, (torch.SymInt, torch.SymFloat, int, float)):
            return True
        return isinstance(v, torch.Tensor) and v.dim() == 0 or (isinstance(v, torch.Tensor) and same_dim(v.numel(), 1))
    return False


def const_value(x, constants=None):
    """The python value of a scalar argument when it is fixed in the graph, else None."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if not isinstance(x, Node):
        return None
    if x.op == "call_function":
        if x.target in _ops("full.default", "full_like.default") and isinstance(x.args[1], (int, float)):
            return float(x.args[1])
        if x.target in _ops("scalar_tensor.default") and isinstance(x.args[0], (int, float)):
            return float(x.args[0])
        if x.target in CASTS | NOOPS | _ops("lift_fresh_copy.default"):
            return const_value(x.args[0], constants)
        if x.target in _ops("sqrt.default"):
            c = const_value(x.args[0], constants)
            return None if c is None else math.sqrt(c)
    if x.op == "placeholder" and constants and x.name in constants:
        t = constants[x.name]
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            return float(t.reshape(()).item())
    return None


def _kind(x) -> str:
    return str(x.target) if x.op == "call_function" else f"{x.op} {x.target}"


def module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, _ = list(stack.values())[-1]
        path = re.sub(r"^L\['self'\]\.?", "", str(path))
        return path or node.name
    return node.name


# ----------------------------------------------------------------------------- layouts
# A product reads a tensor whose last two axes mean something (Lq, D for q; D, Lk for kᵀ;
# Lq, Lk for the probabilities; Lk, Dv for v) and whose other axes are batch-like. Walking
# from that tensor back to where it was made (or from the softmax forward to the P·v
# product), a step is safe when it keeps that meaning: it may regroup the leading axes,
# swap the two meaningful ones (operands only), and add, drop or move axes of size 1.
#
# An axis statically of size 1 holds no data, so only the others ("data axes") are
# tracked: unsqueeze/squeeze and a permute keeping the order of the data axes then
# reorder nothing, a chain of permutes counts by what it does as a whole, and a reshape
# counts by the data axes it keeps last. Core ATen spells `einsum("bhqd,bhkd->bhqk", q, k)`
#
#     bmm(view(permute(unsqueeze(q, 4), [0, 1, 2, 4, 3]), [B*H, Lq, D]), ...)      (B*H, Lq, Lk)
#     view(permute(view(s, [B, H, Lq, 1, Lk]), [0, 1, 2, 4, 3]), [B, H, Lq, Lk])
#
# which is this. A meaningful axis of size 1 (Lq = 1 while decoding) is tracked only by
# where the size-1 axis must sit when the product reads the tensor: (…, 1, D) for q.
def _is_one(d) -> bool:
    return same_dim(d, 1)


def _data_axes(shape) -> list:
    """The axes not statically of size 1."""
    return [i for i, d in enumerate(shape) if not _is_one(d)]


def _pattern(shape) -> tuple | None:
    """Which of the last two axes are of size 1: (False, False) for (…, Lq, D), (True, False) for (…, 1, D)."""
    return tuple(_is_one(d) for d in shape[-2:]) if shape is not None and len(shape) >= 2 else None


def _regroups_lead(i, o, m: int) -> bool:
    """A reshape i → o keeping the last `m` data axes and only regrouping the ones before.

    view(x, [B*H, L, D]) of (B, H, L, D) or of (B, H, L, D, 1) does (m = 2);
    view(x, [B, H*L, D]) does not.
    """
    if i is None or o is None:
        return False
    i, o = [i[a] for a in _data_axes(i)], [o[a] for a in _data_axes(o)]
    return len(i) >= m and len(o) >= m and same_shape(i[len(i) - m:], o[len(o) - m:]) \
        and same_dim(numel_of(i[:len(i) - m]), numel_of(o[:len(o) - m]))


def _perm_of(n: Node, nd: int) -> list | None:
    """The permutation a permute/transpose/t node applies (output axis j reads input axis p[j])."""
    t = _base(n)
    if t == aten.permute.default:
        return [a % nd for a in n.args[1]]
    if t == aten.transpose.int:
        p = list(range(nd))
        d0, d1 = (a % nd for a in n.args[1:3])
        p[d0], p[d1] = p[d1], p[d0]
        return p
    if t == aten.t.default:
        return list(range(nd))[::-1] if nd == 2 else list(range(nd))
    return None


def _axis_map(n: Node) -> list | None:
    """How a step moves the data axes, or None when it is not a pure reordering.

    Returns σ: output data axis r is input data axis σ[r]. Reorderings are permute,
    transpose and t; and, as the identity, unsqueeze/squeeze (they add or drop size-1
    axes), clone, contiguous, alias, detach and an expand to the same shape.
    """
    x = n.args[0] if n.args else None
    i, o = shape_of(x) if isinstance(x, Node) else None, shape_of(n)
    if i is None or o is None:
        return None
    ai, ao = _data_axes(i), _data_axes(o)
    t = _base(n)
    if t in NOOPS | SQUEEZES or (t == EXPAND and same_shape(i, o)):
        return list(range(len(ai))) if len(ai) == len(ao) else None
    if t in PERMUTES:
        p = _perm_of(n, len(i))
        rank = {a: r for r, a in enumerate(ai)}
        return [rank[a] for a in p if a in rank]
    return None


def _identity(p) -> bool:
    return p == list(range(len(p)))


def _swap2(p) -> bool:
    n = len(p)
    return n >= 2 and p == list(range(n - 2)) + [n - 1, n - 2]


# ----------------------------------------------------------------------------- operands
def _peel(node: Node, factors: list | None) -> tuple[Node, bool]:
    """Walk back from a product operand through steps that keep its layout (see layouts).

    Returns (root, swapped): the operand equals `root` with its last two axes swapped when
    `swapped`, leading axes regrouped and size-1 axes added, dropped or moved, times the
    scalar `factors` collected (None: stop at scalar scales, they stay on the tensor).
    A run of permutes may pass through other orders, as long as it ends at the operand's
    own or its transpose; the root is the furthest point where it does and whose last two
    axes are the meaningful ones; the factors collected beyond it are dropped again.
    """
    pat = _pattern(shape_of(node))
    m = pat.count(False) if pat is not None else 0
    if m == 0:
        return node, False
    pi = list(range(len(_data_axes(shape_of(node)))))     # rest point's data axis r is node's pi[r]
    swapped = False
    best = (node, swapped, len(factors or ()))
    for _ in range(32):
        if node.op != "call_function" or node.target in IN_PLACE or peel_kv_repeat(node) is not None:
            break      # stop at repeat_kv's (B, H, L, D) view so the GQA root is found
        t = node.target
        sigma = _axis_map(node)
        if sigma is not None:
            pi = [sigma[r] for r in pi]
        elif t in RESHAPES and _identity(pi) and _regroups_lead(shape_of(node.args[0]), shape_of(node), m):
            pi = list(range(len(_data_axes(shape_of(node.args[0])))))
        elif factors is not None and t in MULS | DIVS and isinstance(node.args[0], Node) \
                and is_scalar(node.args[1]) and same_shape(shape_of(node.args[0]), shape_of(node)):
            factors.append((node.args[1], "mul" if t in MULS else "div"))
        else:
            break
        node = node.args[0]
        if m == 2 and _swap2(pi):
            swapped, pi = not swapped, list(range(len(pi)))
        if _identity(pi) and _pattern(shape_of(node)) in (pat, pat[::-1]):
            best = (node, swapped, len(factors or ()))
    root, swapped, kept = best
    if factors is not None:
        del factors[kept:]
    if m == 1:      # one data axis: the size-1 one may sit on either side of it
        swapped = _pattern(shape_of(root)) != pat
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


def _param_like(node: Node, params: set) -> bool:
    for _ in range(16):
        if node.op == "get_attr" or (node.op == "placeholder" and node.name in params):
            return True
        if node.op != "call_function" or not (node.target in VIEWS | NOOPS | CASTS
                                               or node.target in _ops("transpose.int", "permute.default", "t.default")):
            return False
        node = node.args[0]
    return False


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
    only a size-1 axis moves, so it is a view in effect (core ATen einsum, see layouts).

    Anything else reorders the scores: s.transpose(-2, -1) is softmax over the queries.
    """
    sigma = _axis_map(n)
    if sigma is None or not _identity(sigma):
        raise NoMatch(f"{n.name} reorders the axes of the scores", near=NEAR_REGROUP)
    return n.args[0], V.view(shape_of(n.args[0]), shape_of(n), n)


def _scale(gk, n: Node):
    """s = s * c | c * s | s / c | s.mul_(c) | s.div_(c), c a float, 0-d tensor or SymFloat,
    or a tensor constant along the queries and keys (`head_scale`: Swin V2's
    `logit_scale.clamp(max=…).exp()`, XCiT's `temperature`, both (H, 1, 1)).

    s = cap * tanh(s / cap) is read as a soft-cap (see _softcap).
    """
    t = _base(n)
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
    if t in MULS and isinstance(src, Node) and src.op == "call_function" and _base(src) == TANH:
        return _softcap(gk, src, other)
    return src, V.scale("mul" if t in MULS else "div", other)


def _softcap(gk, tanh: Node, cap):
    """s = cap * tanh(s / cap) | cap * tanh(s * (1 / cap)) | s.div_(cap).tanh_().mul_(cap),
    both constants fixed in the graph."""
    cap = const_value(cap, gk.constants)
    inner = tanh.args[0]
    if cap is None or not (isinstance(inner, Node) and inner.op == "call_function" and _base(inner) in MULS | DIVS):
        raise NoMatch(f"{tanh.name}: tanh on the scores is not a soft-cap")
    how = "div" if _base(inner) in DIVS else "mul"
    c = const_value(inner.args[1], gk.constants)
    if not is_softcap(cap, how, c):
        raise NoMatch(f"{tanh.name}: tanh on the scores is not a soft-cap ({cap:g} * tanh(s {how} {c}))")
    return inner.args[0], V.softcap(cap)


def _add(gk, n: Node):
    """s = s + bias | bias + s | s - bias | s + alpha * bias | s.add_(bias) | s.sub_(bias):
    an additive mask or bias."""
    t = _base(n)
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
        return x if not isinstance(x, Node) else _kind(x)

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
        self.pattern = _pattern(shape_of(p))
        self.layout = {p: None}

    def classify_reader(self, u: Node, p: Node):
        """What `u` does with the probabilities `p` (see GraphKind).

        Steps that keep the values are followed: casts, clone, dropout, the safe-softmax
        guard, lead-only views and any run of permutes/(un)squeezes; the P·v product must
        read them in their own layout (a run of permutes that ends where it started).
        """
        t = _base(u) if u.op == "call_function" else None
        pi = self.layout.get(p)
        if u.op == "call_function" and u.target in IN_PLACE and u.args[0] is not p:
            return OTHER                      # writes the probabilities into another tensor
        if (t in PRODUCTS and u.args[0] is p) or (t == aten.einsum.default and p in u.args[1]):
            if pi is None and _pattern(shape_of(p)) == self.pattern:
                return PRODUCT                # p @ v | einsum("bhqk,bhkd->bhqd", p, v)
            return OTHER                      # p reordered: p.transpose(-2, -1) @ v
        if t in PRODUCTS and u.args[1] is p and u.args[0] is not p:
            swapped = (pi is not None and _swap2(pi)) or self.pattern.count(False) <= 1   # (size-1 axes: the pattern says)
            if swapped and _pattern(shape_of(p)) == self.pattern[::-1]:
                return PRODUCT                # v' @ p.transpose(-2, -1) = (p @ v'ᵀ)ᵀ (EfficientViT-MSRA)
            return OTHER
        sigma = _axis_map(u) if t in PERMUTES | SQUEEZES | NOOPS | {EXPAND} else None
        if sigma is not None:                 # p.permute(...) | p.unsqueeze(4) | p.clone()
            new = sigma if pi is None else [pi[r] for r in sigma]
            return self._follow([u], None if _identity(new) else new)
        if t in RESHAPES and pi is None and _regroups_lead(shape_of(p), shape_of(u), self.pattern.count(False)):
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
        if _base(u) in DROPOUTS:
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


def _lowest_precision(dtypes) -> torch.dtype | None:
    """The floating dtype with the fewest mantissa bits: bfloat16 < float16 < float32 < float64."""
    floats = [d for d in dtypes if isinstance(d, torch.dtype) and d.is_floating_point]
    return max(floats, key=lambda d: torch.finfo(d).eps, default=None)


def _path(start: Node, end: Node, limit: int = 4096) -> list | None:
    """The nodes on a path from `start` to `end` (both included), in graph order; None
    when `end` is more than `limit` nodes after `start`."""
    span, n = [start], start
    while n is not end and len(span) < limit:
        n = n.next
        if n.op == "root":
            return None
        span.append(n)
    if span[-1] is not end:
        return None
    after = {start}
    for n in span[1:]:
        if any(a in after for a in n.all_input_nodes):
            after.add(n)
    before = {end}
    for n in reversed(span):
        if n in before:
            before.update(n.all_input_nodes)
    return [n for n in span if n in after and n in before]


def _path_dtypes(start: Node, end: Node) -> list:
    """The dtypes of every value on a path from `start` to `end`.

    q·kᵀ in float32, `p.half() @ v.half()`: [float32, ..., float16, float16].
    """
    path = _path(start, end)
    return [dtype_of(n) for n in (path if path is not None else (start, end))]


# ----------------------------------------------------------------------------- in place
def written(n: Node) -> list:
    """The arguments an op writes in place: [s] for `s.masked_fill_(m, v)`, [] for a pure op."""
    schema = getattr(n.target, "_schema", None)
    if n.op != "call_function" or schema is None or not schema.is_mutable:
        return []
    return [a for a, arg in zip(n.args, schema.arguments) if arg.alias_info is not None and arg.alias_info.is_write]


def aliases_self(n: Node) -> bool:
    """The op returns its first argument or a view of it: `s.mul_(c)`, `s.view(...)`."""
    schema = getattr(n.target, "_schema", None)
    if n.op != "call_function" or schema is None or not schema.returns or not schema.arguments:
        return False
    ret, arg = schema.returns[0].alias_info, schema.arguments[0].alias_info
    return ret is not None and arg is not None and bool(set(ret.before_set) & set(arg.before_set))


def precedes(a: Node, b: Node, limit: int = 100_000) -> bool:
    """`a` runs before `b` in the graph."""
    n = a
    for _ in range(limit):
        n = n.next
        if n is b:
            return True
        if n.op == "root":
            return False
    return False


def _check_no_hidden_write(prod: Node, pv: Node) -> None:
    """NoMatch when a value between the q·kᵀ and P·v products is written in place by an op
    off the path (through another name or a view) before the path reads it again::

        s3 = s.view(B * H, L, L);  s.masked_fill_(~m, -inf);  softmax(s3)

    The walks follow what each node reads, so such a write (here the mask) would be
    missed. A write after the last read (`p = softmax(s); s.zero_()`) changes nothing.
    """
    path = _path(prod, pv)
    if path is None:
        return
    on_path, bases = set(path), set()
    for x in path:                        # the tensor each value on the path is (a view of)
        while aliases_self(x) and isinstance(x.args[0], Node):
            x = x.args[0]
        bases.add(x)
    for base in bases:
        group, stack = {base}, [base]     # every name of that tensor: views, in-place results
        while stack:
            x = stack.pop()
            for u in x.users:
                if u not in group and aliases_self(u) and u.args[0] is x:
                    group.add(u)
                    stack.append(u)
        readers = [r for g in group for r in g.users if r in on_path]
        for g in group:
            for u in g.users:
                if u not in on_path and any(w is g for w in written(u)) and any(precedes(u, r) for r in readers):
                    raise NoMatch(f"{u.name} ({u.target}) writes in place into {g.name}, "
                                  "which the attention reads under another name")


def live(n: Node, limit: int = 4096) -> bool:
    """Something the graph returns (or an op with side effects) is computed from `n`."""
    return V.reaches(n, lambda x: x.users, lambda x: x.op == "output" or (
        x.op == "call_function" and x.is_impure() and x is not n), limit)


def depends_on(x: Node, target: Node, limit: int = 4096) -> bool:
    """`x` is computed from `target` (a node before `target` in the graph never is)."""
    if not precedes(target, x):
        return False
    return V.reaches(x, lambda n: n.all_input_nodes, lambda n: n is target, limit)


# ----------------------------------------------------------------------------- rules
def match_decomposed(sm: Node, params: set, constants) -> FxSite:
    x = sm.args[0]
    xs = shape_of(x)
    dim = sm.args[1] if len(sm.args) > 1 else sm.kwargs.get("dim")
    if xs is None or len(xs) < 2 or dim % len(xs) != len(xs) - 1:
        raise NoMatch(f"softmax over dim {dim}, not the last (key) axis")
    prod, steps = walk_scores(x, constants)
    factors: list = []
    q, k = score_operands(prod, steps, factors, constants)
    if _param_like(k.node, params):
        raise NoMatch("the key is a parameter: a classifier or learned pooling softmax, not attention",
                      near=NEAR_QUERY)
    try:
        pv, p, dropout_p, active, others = follow_probs(sm)
    except NoMatch as e:
        if _param_like(q.node, params):
            e.near = NEAR_QUERY
        raise
    v, pv_lead, out_perm = value_operand(pv, p)
    if _param_like(v.node, params):      # a learned query may pool values computed from the input
        raise NoMatch("the values are a parameter: the probabilities mix weights, not the input",
                      near=NEAR_QUERY)
    qs, ks, vs_ = q.shape, k.shape, v.shape
    if not same_dim(qs[-1], ks[-1]):
        raise NoMatch(f"{prod.name}: contraction axes do not line up ({qs[-1]} vs {ks[-1]})")
    if not same_dim(ks[-2], vs_[-2]):
        raise NoMatch(f"{pv.name}: key length {ks[-2]} != value length {vs_[-2]}")
    _check_no_hidden_write(prod, pv)
    site = FxSite(out=pv, anchor=sm, q=q, k=k, v=v, lead=xs[:-2], pv_lead=pv_lead, out_perm=out_perm,
                  dropout_p=dropout_p, dropout_active=active)
    site.compute_dtype = _lowest_precision([dtype_of(n) for n in (q.node, k.node, v.node)] + _path_dtypes(prod, pv))
    _fold_steps(site, steps, factors, constants)
    for f, _ in site.scale_nodes:
        if isinstance(f, Node) and depends_on(f, prod):
            raise NoMatch(f"{f.name} scales the scores by a value computed from them", near=NEAR_SCALE)
    for op in (site.k, site.v):
        if op.perm is None:
            op.kv_root = peel_kv_repeat(op.node)
    site.others = [o for o in others if live(o)]       # `out, _ = mha(x, x, x)`: the weights die
    site.dead_readers = [o for o in others if o not in site.others]
    return site


def _fold_steps(site: FxSite, steps: list, factors: list, constants) -> None:
    """Split the score chain into scale (static float + dynamic nodes), softcap and bias steps.

    Steps after the first mask are replayed on the bias (a scale there scales it too).
    """
    check_order(steps)
    for f, how in factors:
        _apply_scale(site, f, how, constants, with_bias=False)
    for st in steps:
        kind = st.kind
        if kind == SCALE and st.shape is not None and not same_shape(st.shape[:-2], site.lead):
            raise NoMatch(f"a per-head scale on scores {st.shape} laid out unlike the softmax's {site.lead}",
                          near=NEAR_SCALE)
        if kind == SCALE:
            _apply_scale(site, st.value, st.how, constants, with_bias=True)
            if site.bias_steps:
                site.bias_steps.append(st)
        elif kind == SOFTCAP:
            site.softcap = st.cap
        elif kind == ADD:
            site.bias_steps.append(st)
            site.mask_kinds.add("additive")
        elif kind == FILL:
            site.bias_steps.append(st)
            site.mask_kinds.add("boolean")
        elif kind == VIEW and site.bias_steps:
            site.bias_steps.append(st)


def _apply_scale(site: FxSite, f, how: str, constants, with_bias: bool) -> None:
    c = const_value(f, constants)
    if c is not None:
        if how == "div" and c == 0:
            raise NoMatch("division of the scores by zero")
        site.scale = site.scale * c if how == "mul" else site.scale / c
    else:
        site.scale_nodes.append((f, how))


def match_fused(node: Node) -> FxSite:
    from torch.fx.operator_schemas import normalize_function
    nk = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
    q, k, v = nk["query"], nk["key"], nk["value"]
    mask = nk.get("attn_mask", nk.get("attn_bias"))
    out = node
    if node.target != aten.scaled_dot_product_attention.default:
        outs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if len(outs) != 1:
            raise NoMatch(f"{node.name}: output is not read")
        out = outs[0]
    qs, ks = shape_of(q), shape_of(k)
    if len(qs) < 2 or len(ks) < 2:
        raise NoMatch(f"{node.name}: inputs of rank < 2")
    causal = bool(nk.get("is_causal", False))
    if causal and not same_dim(qs[-2], ks[-2]):
        raise NoMatch(f"{node.name}: is_causal with q_len != kv_len (top-left alignment) is not supported")
    scale = nk.get("scale")
    if scale is None:
        if not isinstance(qs[-1], int):
            raise NoMatch(f"{node.name}: default scale of a symbolic head_dim")
        scale = default_scale(qs[-1])
    site = FxSite(out=out, anchor=node, q=Operand(q), k=Operand(k), v=Operand(v), lead=qs[:-2],
                  pv_lead=qs[:-2], mask=mask, causal=causal, dropout_p=float(nk.get("dropout_p", 0.0)))
    site.dropout_active = site.dropout_p > 0
    site.compute_dtype = _lowest_precision([dtype_of(n) for n in (q, k, v, out)])
    if isinstance(scale, (int, float)):
        site.scale = float(scale)
    else:
        site.scale_nodes.append((scale, "mul"))
    if mask is not None:
        site.mask_kinds.add("boolean" if val_of(mask).dtype == torch.bool else "additive")
    gqa = bool(nk.get("enable_gqa", False)) and len(qs) == 4 and len(ks) == 4 and not same_dim(qs[1], ks[1])
    for op in (site.k, site.v):         # enable_gqa: k/v already hold Hkv heads
        op.kv_root = op.node if gqa else peel_kv_repeat(op.node)
    return site


# ----------------------------------------------------------------------------- driver
def _describe(fx: FxSite, idx: int, name: str) -> AttentionSite:
    qs, ks, vs = fx.q.shape, fx.k.shape, fx.v.shape
    lead = list(fx.lead)
    if len(lead) == 2:
        batch, heads = lead
    elif len(lead) > 2:
        batch, heads = numel_of(lead[:-1]), lead[-1]
    else:
        batch, heads = _find_4d(fx) or ((lead[0] if lead else 1), 1)
    kv_heads = heads
    kroot = fx.k.kv_root
    if kroot is not None:
        kv_heads = shape_of(kroot)[1]
    elif len(ks) == len(qs) and len(ks) >= 3 and same_dim(ks[-3], 1) and not same_dim(qs[-3], 1) \
            and not same_dim(numel_of(ks[:-2]), numel_of(qs[:-2])):      # not just a size-1 axis in another place
        kv_heads = 1
    elif fx.anchor.target in FUSED and len(ks) == 4:
        kv_heads = ks[1]
    lq = qs[-2]
    lk = ks[-2]
    dtype = str(val_of(fx.q.node).dtype).replace("torch.", "")
    compute = str(fx.compute_dtype).replace("torch.", "") if fx.compute_dtype is not None else dtype
    mask = mask_kind("additive" in fx.mask_kinds, "boolean" in fx.mask_kinds)
    s = AttentionSite(
        id=idx, name=name, source="sdpa" if fx.anchor.target in FUSED else "decomposed",
        batch=dim_value(batch), heads=dim_value(heads), kv_heads=dim_value(kv_heads),
        q_len=dim_value(lq), kv_len=dim_value(lk), head_dim=dim_value(qs[-1]), dtype=dtype, compute_dtype=compute,
        scale=_reported_scale(fx), softcap=fx.softcap or None,
        causal=fx.causal, mask=mask, dropout=fx.dropout_p, graph=fx)
    if fx.others:
        s.add_reason(probs_read_elsewhere(str(o.target) for o in fx.others))
    if fx.dropout_active:
        s.add_reason(f"dropout {fx.dropout_p:g} active: unchecked")
    return s


def _reported_scale(fx: FxSite) -> float | str:
    """The scale as the report gives it: a number, "per-head" (a tensor in the graph scales
    each head) or "dynamic" (a scalar computed in the graph)."""
    if not fx.scale_nodes:
        return fx.scale
    return "per-head" if any(not is_scalar(f) for f, _ in fx.scale_nodes) else "dynamic"


def _find_4d(fx: FxSite):
    """(batch, heads) from a 4-D view of the same scores/probabilities/output, if any."""
    n_lead = numel_of(fx.lead)
    seen = [fx.anchor, fx.out, fx.anchor.args[0]]
    for n in list(seen):
        seen.extend(n.users)
        if isinstance(n.args[0], Node):
            seen.append(n.args[0])
    node = fx.anchor.args[0]
    for _ in range(12):                    # scores chain
        if not isinstance(node, Node) or node.op != "call_function":
            break
        seen.append(node)
        node = node.args[0] if node.target not in WHERES else node.args[1]
    for n in seen:
        s = shape_of(n)
        if s is not None and len(s) == 4 and same_dim(numel_of(s[:2]), n_lead):
            return s[0], s[1]
    return None


def find_sites(graph: Graph, params: set = frozenset(), constants=None):
    """All sites in `graph` and, for every softmax not matched, why: (sites, [(name, reason)])."""
    sites, unmatched, per_name = [], [], {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        try:
            if node.target in FUSED:
                fx = match_fused(node)
            elif node.target in SOFTMAX:
                fx = match_decomposed(node, params, constants)
            else:
                continue
        except NoMatch as e:
            unmatched.append((f"{module_path(node)} ({node.name})", miss(e)))
            continue
        base = module_path(node)
        count = per_name.get(base, 0)
        per_name[base] = count + 1
        sites.append(_describe(fx, len(sites), base if count == 0 else f"{base}#{count}"))
    return sites, unmatched
