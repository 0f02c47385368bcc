"""Read an ATen-level FX graph: the generic helpers the FX passes share.

What a node holds (`val_of`, `shape_of`, `dtype_of`), comparing sizes that may be
symbolic (`same_dim`, `same_shape`), scalars and the constants they fold to
(`is_scalar`, `const_value`), the ATen op families the detector and the rewrite both
name (with their in-place twins, `IN_PLACE`), how a step moves the axes a product reads
(the layouts below), and the graph's order, aliasing and reachability (`precedes`,
`written`, `aliases_self`, `path_between`, `live`, `depends_on`).

Nothing here knows about attention: `fx_walk` reads the chain, `fx_detect` matches the
sites, `fx_rewrite` rebuilds them, all three through these helpers.
"""
from __future__ import annotations

import math
import re

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import vocab as V

aten = torch.ops.aten


def aten_ops(*names):
    """The ATen overloads named "packet.overload" that this torch has (the others are skipped)."""
    out = set()
    for name in names:
        packet, _, overload = name.partition(".")
        p = getattr(aten, packet, None)
        if p is not None and hasattr(p, overload or "default"):
            out.add(getattr(p, overload or "default"))
    return out


SOFTMAX = aten_ops("softmax.int", "_softmax.default", "_safe_softmax.default")
PRODUCTS = aten_ops("matmul.default", "bmm.default", "mm.default")
CASTS = aten_ops("_to_copy.default", "to.dtype", "to.dtype_layout", "to.device", "type_as.default")
NOOPS = aten_ops("clone.default", "contiguous.default", "alias.default", "detach.default")
SQUEEZES = aten_ops("unsqueeze.default", "squeeze.dim", "squeeze.dims", "squeeze.default")
RESHAPES = SQUEEZES | aten_ops("view.default", "reshape.default", "_unsafe_view.default", "flatten.using_ints",
                               "unflatten.int")
EXPAND = aten.expand.default
VIEWS = RESHAPES | {EXPAND}
PERMUTES = aten_ops("permute.default", "transpose.int", "t.default")
MULS = aten_ops("mul.Tensor", "mul.Scalar")
DIVS = aten_ops("div.Tensor", "div.Scalar")
ADDS = aten_ops("add.Tensor", "add.Scalar")
SUBS = aten_ops("sub.Tensor", "sub.Scalar")
FILLS = aten_ops("masked_fill.Scalar", "masked_fill.Tensor")
WHERES = aten_ops("where.self", "where.ScalarOther", "where.ScalarSelf", "where.Scalar")
TANH = aten.tanh.default
DROPOUTS = aten_ops("dropout.default", "native_dropout.default")
FUSED = aten_ops("scaled_dot_product_attention.default",
                 "_scaled_dot_product_flash_attention_for_cpu.default",
                 "_scaled_dot_product_flash_attention.default",
                 "_scaled_dot_product_efficient_attention.default",
                 "_scaled_dot_product_cudnn_attention.default")
SHAPE_ONLY = aten_ops("full_like.default", "empty_like.default", "zeros_like.default", "ones_like.default",
                      "_assert_tensor_metadata.default", "sym_size.int", "sym_numel.default")
BADDBMM = aten_ops("baddbmm.default", "baddbmm_.default")     # in place: s = empty(...).baddbmm_(q, kᵀ, beta=0)
PRODUCERS = PRODUCTS | aten_ops("einsum.default") | BADDBMM
# Ops that always return a new tensor (never an alias of an input): an in-place step
# writing into one that nothing else reads changes nothing anyone can see.
FRESH = (PRODUCERS - {aten.baddbmm_.default}) | MULS | DIVS | ADDS | SUBS | FILLS | WHERES | SOFTMAX | \
    aten_ops("tanh.default", "_to_copy.default", "clone.default")


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


def base_op(n: Node):
    """The out-of-place op of `n` (mul_.Tensor → mul.Tensor); its own target otherwise."""
    return IN_PLACE.get(n.target, n.target)


# ----------------------------------------------------------------------------- values
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
        if x.target in aten_ops("full.default", "full_like.default") and isinstance(x.args[1], (int, float)):
            return float(x.args[1])
        if x.target in aten_ops("scalar_tensor.default") and isinstance(x.args[0], (int, float)):
            return float(x.args[0])
        if x.target in CASTS | NOOPS | aten_ops("lift_fresh_copy.default"):
            return const_value(x.args[0], constants)
        if x.target in aten_ops("sqrt.default"):
            c = const_value(x.args[0], constants)
            return None if c is None else math.sqrt(c)
    if x.op == "placeholder" and constants and x.name in constants:
        t = constants[x.name]
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            return float(t.reshape(()).item())
    return None


def node_kind(x) -> str:
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


def data_axes(shape) -> list:
    """The axes not statically of size 1."""
    return [i for i, d in enumerate(shape) if not _is_one(d)]


def last2_pattern(shape) -> tuple | None:
    """Which of the last two axes are of size 1: (False, False) for (…, Lq, D), (True, False) for (…, 1, D)."""
    return tuple(_is_one(d) for d in shape[-2:]) if shape is not None and len(shape) >= 2 else None


def regroups_lead(i, o, m: int) -> bool:
    """A reshape i → o keeping the last `m` data axes and only regrouping the ones before.

    view(x, [B*H, L, D]) of (B, H, L, D) or of (B, H, L, D, 1) does (m = 2);
    view(x, [B, H*L, D]) does not.
    """
    if i is None or o is None:
        return False
    i, o = [i[a] for a in data_axes(i)], [o[a] for a in data_axes(o)]
    return len(i) >= m and len(o) >= m and same_shape(i[len(i) - m:], o[len(o) - m:]) \
        and same_dim(numel_of(i[:len(i) - m]), numel_of(o[:len(o) - m]))


def _perm_of(n: Node, nd: int) -> list | None:
    """The permutation a permute/transpose/t node applies (output axis j reads input axis p[j])."""
    t = base_op(n)
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


def axis_map(n: Node) -> list | None:
    """How a step moves the data axes, or None when it is not a pure reordering.

    Returns σ: output data axis r is input data axis σ[r]. Reorderings are permute,
    transpose and t; and, as the identity, unsqueeze/squeeze (they add or drop size-1
    axes), clone, contiguous, alias, detach and an expand to the same shape.
    """
    x = n.args[0] if n.args else None
    i, o = shape_of(x) if isinstance(x, Node) else None, shape_of(n)
    if i is None or o is None:
        return None
    ai, ao = data_axes(i), data_axes(o)
    t = base_op(n)
    if t in NOOPS | SQUEEZES or (t == EXPAND and same_shape(i, o)):
        return list(range(len(ai))) if len(ai) == len(ao) else None
    if t in PERMUTES:
        p = _perm_of(n, len(i))
        rank = {a: r for r, a in enumerate(ai)}
        return [rank[a] for a in p if a in rank]
    return None


def is_identity(p) -> bool:
    return p == list(range(len(p)))


def is_swap2(p) -> bool:
    n = len(p)
    return n >= 2 and p == list(range(n - 2)) + [n - 1, n - 2]


# ----------------------------------------------------------------------------- dtypes
def lowest_precision(dtypes) -> torch.dtype | None:
    """The floating dtype with the fewest mantissa bits: bfloat16 < float16 < float32 < float64."""
    floats = [d for d in dtypes if isinstance(d, torch.dtype) and d.is_floating_point]
    return max(floats, key=lambda d: torch.finfo(d).eps, default=None)


def path_between(start: Node, end: Node, limit: int = 4096) -> list | None:
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


def path_dtypes(start: Node, end: Node) -> list:
    """The dtypes of every value on a path from `start` to `end`.

    q·kᵀ in float32, `p.half() @ v.half()`: [float32, ..., float16, float16].
    """
    path = path_between(start, end)
    return [dtype_of(n) for n in (path if path is not None else (start, end))]


# ----------------------------------------------------------------------------- order, aliasing, reachability
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


def live(n: Node, limit: int = 4096) -> bool:
    """Something the graph returns (or an op with side effects) is computed from `n`."""
    return V.reaches(n, lambda x: x.users, lambda x: x.op == "output" or (
        x.op == "call_function" and x.is_impure() and x is not n), limit)


def depends_on(x: Node, target: Node, limit: int = 4096) -> bool:
    """`x` is computed from `target` (a node before `target` in the graph never is)."""
    if not precedes(target, x):
        return False
    return V.reaches(x, lambda n: n.all_input_nodes, lambda n: n is target, limit)
