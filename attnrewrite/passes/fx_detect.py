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
transposed one (see fx_graph's "layouts").

The walks themselves — back along the score chain, forward from the softmax, the
operands peeled — are `fx_walk`'s; the graph helpers both use are `fx_graph`'s. This
module matches the rules, folds the steps into a site and describes it.

Each site records the lowest precision it computes in (`compute_dtype`): fp32 q and k
with `p.half() @ v.half()` compute P·v in fp16, which sets the exact check's tolerance.

The step kinds, the order they must come in, the einsum equations and the two walks are
the detectors' shared vocabulary (`vocab`); `fx_walk.FxKind` holds this graph kind's spellings.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node

from ..site import AttentionSite, NormalForm, dim_value
from .fx_graph import (CASTS, FUSED, NOOPS, PERMUTES, SOFTMAX, VIEWS, WHERES, aliases_self, aten, const_value,
                       depends_on, dtype_of, is_scalar, live, lowest_precision, module_path, numel_of,
                       path_between, path_dtypes, precedes, same_dim, same_shape, shape_of, val_of, written)
from .fx_walk import Operand, follow_probs, peel_kv_repeat, score_operands, value_operand, walk_scores
from .vocab import (ADD, FILL, NEAR_QUERY, NEAR_SCALE, SCALE, SOFTCAP, VIEW, NoMatch, check_order, default_scale,
                    mask_kind, miss, probs_read_elsewhere)


# ----------------------------------------------------------------------------- records
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


def _param_like(node: Node, params: set) -> bool:
    for _ in range(16):
        if node.op == "get_attr" or (node.op == "placeholder" and node.name in params):
            return True
        if node.op != "call_function" or node.target not in VIEWS | NOOPS | CASTS | PERMUTES:
            return False
        node = node.args[0]
    return False


# ----------------------------------------------------------------------------- hidden writes
def _check_no_hidden_write(prod: Node, pv: Node) -> None:
    """NoMatch when a value between the q·kᵀ and P·v products is written in place by an op
    off the path (through another name or a view) before the path reads it again::

        s3 = s.view(B * H, L, L);  s.masked_fill_(~m, -inf);  softmax(s3)

    The walks follow what each node reads, so such a write (here the mask) would be
    missed. A write after the last read (`p = softmax(s); s.zero_()`) changes nothing.
    """
    path = path_between(prod, pv)
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
    site.compute_dtype = lowest_precision([dtype_of(n) for n in (q.node, k.node, v.node)] + path_dtypes(prod, pv))
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
    site.compute_dtype = lowest_precision([dtype_of(n) for n in (q, k, v, out)])
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
        causal=fx.causal, mask=mask, dropout=fx.dropout_p, graph=fx,
        form=NormalForm(float(fx.scale), float(fx.softcap or 0.0), bool(fx.causal),
                        float(fx.dropout_p if fx.dropout_active else 0.0)))
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
