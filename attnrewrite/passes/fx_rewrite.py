"""Replace each site's subgraph by one call of its variant's custom op.

For a site, `emit_site` inserts, just before the P·v product, the nodes that build the
normal form and call the op::

    q4 = to4d(permute?(q'))          k4/v4 likewise (GQA kept un-repeated)
    bias = replay of the score chain's mask steps (where/add/mul, no scores)
    o4 = attnrewrite::<variant>_attention(q4, k4, v4, bias, scale, softcap, causal, p, ...)
    o  = from4d(o4)                  # the product's own shape, order and dtype

`rewrite_graph` then points every user of the product at `o` and removes what died.
`probe_graph` inserts the same nodes without rewiring, so one run of the original graph
also yields each site's normal-form inputs and the variant's output on them.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, TensorArgument
from torch.fx import Graph, GraphModule, Node

from ..site import NormalForm
from . import fx_graph as G
from .fx_detect import FxSite
from .fx_walk import Operand
from .vocab import NoMatch

aten = torch.ops.aten


class Emitter:
    """Inserts call_function nodes before `before`, with `meta["val"]` from fake tensors."""

    def __init__(self, graph: Graph, before: Node, provenance: Node):
        self.graph, self.before, self.prov = graph, before, provenance
        vals = [n.meta.get("val") for n in graph.nodes]
        self.fake_mode = torch._guards.detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])

    def __call__(self, target, *args, **kwargs) -> Node:
        with self.graph.inserting_before(self.before):
            n = self.graph.call_function(target, args, kwargs)
        fa, fk = torch.fx.node.map_arg((args, kwargs), lambda x: x.meta["val"])
        if self.fake_mode is not None:
            with self.fake_mode:
                n.meta["val"] = target(*fa, **fk)
        else:
            n.meta["val"] = target(*fa, **fk)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node"):
            if key in self.prov.meta:
                n.meta[key] = self.prov.meta[key]
        return n

    def size(self, dim, refs) -> int | Node:
        """A shape argument: the int, or a sym_size node reading the same symbol from `refs`."""
        if isinstance(dim, int):
            return dim
        fixed = dim.node.maybe_as_int() if isinstance(dim, torch.SymInt) else None
        if fixed is not None:                  # never int(dim): that would specialise the symbol
            return int(fixed)
        for ref in refs:
            for i, d in enumerate(G.shape_of(ref) or []):
                if isinstance(d, torch.SymInt) and str(d.node.expr) == str(dim.node.expr):
                    return self(aten.sym_size.int, ref, i)
        raise NoMatch(f"cannot rebuild symbolic size {dim}")

    def reshape(self, x: Node, shape, refs) -> Node:
        if G.same_shape(G.shape_of(x), list(shape)):
            return x
        if not x.meta["val"].is_contiguous():
            x = self(aten.clone.default, x, memory_format=torch.contiguous_format)
        return self(aten.view.default, x, [self.size(d, refs) for d in shape])


def _to4d(e: Emitter, x: Node, lead, refs) -> Node:
    n = len(lead)
    if n == 2:
        return x
    if n < 2:
        for _ in range(2 - n):
            x = e(aten.unsqueeze.default, x, 0)
        return x
    s = G.shape_of(x)
    return e.reshape(x, [G.numel_of(lead[:-1]), lead[-1], *s[-2:]], refs)


def _conform(e: Emitter, op: Operand, lead, refs, kv: bool) -> Node:
    """Operand → (B, H|Hkv, L, D) laid out on the canonical `lead`."""
    if kv and op.kv_root is not None and len(lead) == 2:
        return op.kv_root
    x = op.node if op.perm is None else e(aten.permute.default, op.node, op.perm)
    s = G.shape_of(x)
    xl, last2 = s[:-2], s[-2:]
    if not G.same_shape(xl, list(lead)):
        if G.same_dim(G.numel_of(xl), G.numel_of(lead)):          # leading axes regrouped
            x = e.reshape(x, [*lead, *last2], refs)
        else:                                               # broadcast (MQA key, batch 1, ...)
            while len(G.shape_of(x)) < len(lead) + 2:
                x = e(aten.unsqueeze.default, x, 0)
            xl = G.shape_of(x)[:-2]
            keep = kv and len(lead) == 2 and G.same_dim(xl[0], lead[0]) and G.same_dim(xl[1], 1)
            if not keep and not G.same_shape(xl, list(lead)):
                x = e(aten.expand.default, x, [e.size(d, refs) for d in [*lead, *last2]])
    return _to4d(e, x, lead, refs)


def _bias(e: Emitter, fx: FxSite, dtype) -> Node | None:
    """Replay the score chain's mask steps on no scores: the additive bias (or bool mask)."""
    if fx.mask is not None:
        return fx.mask
    b = None

    def const(v):
        return v if isinstance(v, Node) else e(aten.full.default, [], float(v), dtype=dtype)

    for st in fx.bias_steps:
        if st.kind == "scale":
            b = e(aten.mul.Tensor if st.how == "mul" else aten.div.Tensor, b, st.value)
        elif st.kind == "add":
            t, alpha = st.bias, st.coef
            term = const(t * alpha if not isinstance(t, Node) else t)
            if isinstance(t, Node) and alpha != 1:
                term = e(aten.mul.Tensor, term, alpha)
            b = term if b is None else e(aten.add.Tensor, b, term)
        elif st.kind == "fill":
            cond, val, where_true = st.cond, const(st.value), st.drops
            base = b if b is not None else const(0.0)
            b = e(aten.where.self, cond, val, base) if where_true else e(aten.where.self, cond, base, val)
        elif st.kind == "view":
            shape_in, node = st.shape_in, st.node
            if node.target == aten.expand.default:
                continue
            if not G.same_shape(G.shape_of(b), shape_in):
                b = e(aten.expand.default, b, [e.size(d, [node.args[0]]) for d in shape_in])
            if not b.meta["val"].is_contiguous():
                b = e(aten.clone.default, b, memory_format=torch.contiguous_format)
            b = e(G.IN_PLACE.get(node.target, node.target), b, *node.args[1:], **node.kwargs)   # s.unsqueeze_(1)
    return b


def _conform_mask(e: Emitter, m: Node, lead, refs) -> Node:
    while len(G.shape_of(m)) < len(lead) + 2:
        m = e(aten.unsqueeze.default, m, 0)
    if len(lead) > 2:
        s = G.shape_of(m)
        full = [*lead, *s[-2:]]
        if not G.same_shape(s, full):
            m = e(aten.expand.default, m, [e.size(d, refs) for d in full])
    return _to4d(e, m, lead, refs)


def emit_normal_form(e: Emitter, fx: FxSite) -> tuple[Node, Node, Node, Node | None]:
    """Insert the nodes building the site's q4, k4, v4 and bias (graph-computed scales folded
    into q: softmax((t·q)·kᵀ) is softmax(t·(q·kᵀ)) for a scalar or a per-head tensor t)."""
    lead = list(fx.lead)
    refs = [fx.anchor, fx.anchor.args[0], fx.q.node, fx.k.node, fx.v.node, fx.out]
    q = _conform(e, fx.q, lead, refs, kv=False)
    k = _conform(e, fx.k, lead, refs, kv=True)
    if G.same_shape(list(fx.pv_lead), lead):
        v = _conform(e, fx.v, lead, refs, kv=True)
    else:
        v = _conform(e, fx.v, fx.pv_lead, refs, kv=False)
        v = e.reshape(v, [*fx.pv_lead, *G.shape_of(v)[-2:]], refs) if len(fx.pv_lead) != 2 else v
        v = _conform(e, Operand(v), lead, refs, kv=False)
    for node, how in fx.scale_nodes:          # a per-head tensor is laid out as the scores: (B, H, 1, 1)
        if not G.is_scalar(node):
            node = _conform_mask(e, node, lead, refs)
            if node.meta["val"].dtype != q.meta["val"].dtype:
                node = e(aten._to_copy.default, node, dtype=q.meta["val"].dtype)
        q = e(aten.mul.Tensor if how == "mul" else aten.div.Tensor, q, node)
    dt = q.meta["val"].dtype
    for t in (k, v):
        dt = torch.promote_types(dt, t.meta["val"].dtype)
    q, k, v = [t if t.meta["val"].dtype == dt else e(aten._to_copy.default, t, dtype=dt) for t in (q, k, v)]
    sdt = G.val_of(fx.anchor.args[0]).dtype if fx.anchor.target in G.SOFTMAX else dt
    mask = _bias(e, fx, sdt)
    if mask is not None:
        mask = _conform_mask(e, mask, lead, refs)
    return q, k, v, mask


def emit_site(graph: Graph, fx: FxSite, variant, options: dict, site) -> dict:
    """Insert the normal form and the variant op for one site; returns the new nodes.

    With active dropout the op also gets `dropout_seed`, a random int64 drawn in the graph,
    so its backward replays the forward's dropout mask.
    """
    e = Emitter(graph, fx.out, fx.anchor)
    lead = list(fx.lead)
    refs = [fx.anchor, fx.anchor.args[0], fx.q.node, fx.k.node, fx.v.node, fx.out]
    q, k, v, mask = emit_normal_form(e, fx)
    form = NormalForm.of(site)
    dropout = form.dropout_p
    args = (q, k, v, mask, form.scale, form.softcap, form.causal, dropout, *variant.op_args(site, options))
    extra = {"dropout_seed": e(aten.randint.low, 0, 1 << 62, [])} if dropout else {}
    if options.get("out_map"):                 # a calibrated per-head output map
        extra["out_map"] = list(options["out_map"])
    o4 = e(variant.op, *args, **extra)
    # back to the product's own layout
    ov = G.val_of(fx.out)
    plead = list(fx.pv_lead)
    o = o4
    if len(lead) != 2 or not G.same_shape(plead, lead):
        o = e.reshape(o, [*lead, *G.shape_of(o)[-2:]], refs) if len(lead) != 2 else o
        o = e.reshape(o, [*plead, *G.shape_of(o)[-2:]], refs + [fx.out])
    if fx.out_perm is not None:
        o = e(aten.permute.default, o, fx.out_perm)
    if not G.same_shape(G.shape_of(o), list(ov.shape)):
        o = e.reshape(o, list(ov.shape), refs + [fx.out])
    if o.meta["val"].dtype != ov.dtype:
        o = e(aten._to_copy.default, o, dtype=ov.dtype)
    return {"q": q, "k": k, "v": v, "mask": mask, "op": o4, "out": o}


def remap(obj, mapping: dict):
    """`obj` with every Node replaced by mapping[node], through dataclasses and containers."""
    if isinstance(obj, Node):
        return mapping.get(obj, obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: remap(getattr(obj, f.name), mapping)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):             # a score-chain step (vocab)
        return type(obj)(*(remap(x, mapping) for x in obj))
    if isinstance(obj, (list, tuple, set)):
        return type(obj)(remap(x, mapping) for x in obj)
    if isinstance(obj, dict):
        return {k: remap(v, mapping) for k, v in obj.items()}
    return obj


def copy_with_sites(gm: GraphModule, sites) -> tuple[GraphModule, dict]:
    """A copy of `gm` and, per site id, the site's FxSite pointing into the copy."""
    g = Graph()
    val_map: dict = {}
    g.output(g.graph_copy(gm.graph, val_map))
    return GraphModule(gm, g), {s.id: remap(s.graph, val_map) for s in sites}


_ASSERTS = {aten._assert_tensor_metadata.default}


def _may_alias(n: Node) -> bool:
    """`n`'s result may share memory with its first argument (a view, an in-place op, a no-op cast)."""
    return G.aliases_self(n) or n.target in G.VIEWS | G.PERMUTES | G.NOOPS | G.CASTS


def _unobserved(m, writer: Node) -> bool:
    """Nobody but `writer` can see a write into `m`.

    `m` must be a fresh tensor (an op that never aliases its inputs, fx_graph.FRESH), or
    reach one through in-place steps and views, each read by the next (mm → mul_ →
    masked_fill_, the writer). Other readers may only read it before the write and make
    their own copy (`s.sum(-1)` before `s.masked_fill_`); one reading it after the write,
    or holding a view of it that is read (`flat = s.view(...)` taken before), sees the write.
    """
    for _ in range(64):
        if not isinstance(m, Node) or m.op != "call_function":
            return False
        for u in m.users:
            if u is writer or (u.op == "call_function" and not u.users and not u.is_impure()):
                continue      # the writer itself, or a dead reader (a view nobody reads)
            if u.op != "call_function" or _may_alias(u) or not G.precedes(u, writer):
                return False
        if m.target in G.FRESH:
            return True
        if not G.aliases_self(m):
            return False
        writer, m = m, m.args[0]
    return False


def _removable(n: Node) -> bool:
    """A dead node whose removal changes nothing but the work done.

    Beyond pure ops: random ops (dropout, sdpa's dropout_p: their outputs are unread),
    and an in-place op (Falcon's `scores.div_(c)`, CompVis' `scores.masked_fill_(~m, -inf)`)
    whose every written input no one else can observe (`_unobserved`). An in-place op on
    scores someone else reads (returned, or through an alias) stays, and so does its write.
    """
    if not n.is_impure(impure_random=False):
        return True
    if n.target in _ASSERTS:
        return False
    written = G.written(n)
    return bool(written) and all(_unobserved(m, n) for m in written)


def _erase_dead(graph: Graph, node: Node) -> None:
    stack = [node]
    while stack:
        n = stack.pop()
        if n.graph is not graph or n.op != "call_function":
            continue
        if any(u.target not in _ASSERTS for u in n.users) or not _removable(n):
            continue
        for u in list(n.users):            # metadata asserts on a tensor no longer computed
            graph.erase_node(u)
        ins = n.all_input_nodes
        graph.erase_node(n)
        stack.extend(ins)


def rewrite_graph(gm: GraphModule, sites, variant, choice: dict) -> GraphModule:
    """A copy of `gm` with each site in `choice` ({site id: options}) rewritten into `variant`'s op.

    `sites` were detected on `gm` itself. Sites are rewritten last first: a later site may
    read an earlier one's output, and rewiring the earlier one then reaches the new nodes too.
    """
    new, fxs = copy_with_sites(gm, sites)
    for site in reversed(sites):
        options = choice.get(site.id)
        if options is None:
            continue
        fx = fxs[site.id]
        nodes = emit_site(new.graph, fx, variant, options, site)
        nodes["op"].meta[SITE_KEY] = site.id
        fx.out.replace_all_uses_with(nodes["out"])
        _erase_dead(new.graph, fx.out)
        for n in fx.dead_readers:          # e.g. need_weights=True weights nobody reads
            _erase_dead(new.graph, n)
    new.graph.lint()
    new.recompile()
    return new


SITE_KEY = "attnrewrite_site"          # node.meta key: the site id an emitted variant op stands for
_FOLD_KEEP_LAYOUT = (aten.clone.default, aten.contiguous.default, aten.alias.default)
_FOLD_RESHAPE = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _static(shape) -> list | None:
    return [int(d) for d in shape] if all(isinstance(d, int) for d in shape) else None


def _merged_heads_user(op: Node) -> Node | None:
    """The node holding `op`'s (B, H, L, Dv) output as (B, L, H·Dv), heads major: reached
    (after no-op copies and reshapes) by swapping axes 1 and 2, then (after layout-only copies) one reshape merging the last two.
    Every node on the way must have `op`'s output as its only use. None otherwise."""
    shape = _static(op.meta["val"].shape)
    if shape is None or len(shape) != 4 or len(op.users) != 1:
        return None
    b, h, l, dv = shape
    cur = next(iter(op.users))
    while len(cur.users) == 1 and (cur.target in _FOLD_KEEP_LAYOUT or (
            cur.target in _FOLD_RESHAPE and _static(cur.meta["val"].shape) == shape)):   # no-op copies and reshapes
        cur = next(iter(cur.users))
    swap = (cur.target == aten.transpose.int and sorted(a % 4 for a in cur.args[1:3]) == [1, 2]) or \
           (cur.target == aten.permute.default and [a % 4 for a in cur.args[1]] == [0, 2, 1, 3])
    if not swap:
        return None
    while len(cur.users) == 1 and next(iter(cur.users)).target in _FOLD_KEEP_LAYOUT:
        cur = next(iter(cur.users))
    if len(cur.users) != 1:
        return None
    merge = next(iter(cur.users))
    out = _static(merge.meta["val"].shape) if "val" in merge.meta else None
    if merge.target not in _FOLD_RESHAPE or out != [b, l, h * dv]:
        return None
    return merge


def fold_out_maps(gm: GraphModule, weights: dict) -> dict:
    """Fold calibrated output maps into the output projection that follows each op.

    For a variant op with an `out_map` (per head h: out_h ← out_h X_h) whose output reaches
    `aten.linear(x, W, b)` only through the head merge (`_merged_heads_user`), with W a
    parameter (`weights`: placeholder name -> tensor) used by that linear alone:
    y = Σ_h out_h X_h W_hᵀ = Σ_h out_h (W_h X_hᵀ)ᵀ, so W's column block h becomes W_h X_hᵀ and
    the op drops its map — the correction then costs nothing at run time.
    Edits `gm` in place; returns {site id: (placeholder name, new weight)} for the folded ones.
    """
    folded = {}
    for op in list(gm.graph.nodes):
        out_map = op.kwargs.get("out_map") if op.op == "call_function" else None
        if not out_map:
            continue
        merge = _merged_heads_user(op)
        while merge is not None and len(merge.users) == 1 and next(iter(merge.users)).target in _FOLD_KEEP_LAYOUT:
            merge = next(iter(merge.users))
        if merge is None or len(merge.users) != 1:
            continue
        lin = next(iter(merge.users))
        if lin.target != aten.linear.default or lin.args[0] is not merge:
            continue
        w = lin.args[1]
        if not (isinstance(w, Node) and w.op == "placeholder" and w.name in weights and len(w.users) == 1):
            continue
        _, h, _, dv = op.meta["val"].shape
        weight = weights[w.name]
        x = torch.tensor(out_map, dtype=torch.float64).view(h, dv, dv)
        blocks = weight.detach().double().view(weight.shape[0], h, dv)
        new = torch.einsum("ohd,hed->ohe", blocks, x).reshape(weight.shape).to(weight.dtype)   # W_h X_hᵀ
        op.kwargs = {k: v for k, v in op.kwargs.items() if k != "out_map"}
        folded[op.meta.get(SITE_KEY)] = (w.name, new)
    if folded:
        gm.recompile()
    return folded


def program_with_graph(ep: ExportedProgram, gm: GraphModule, weights: dict | None = None) -> ExportedProgram:
    """`ep` with its graph replaced by `gm` (same inputs, outputs renamed where they moved);
    `weights` ({placeholder name: tensor}) replace those parameters in a copy of the state dict."""
    out_names = [a.name if isinstance(a, Node) else None for a in gm.graph.output_node().args[0]]
    sig = copy.deepcopy(ep.graph_signature)
    for spec, name in zip(sig.output_specs, out_names):
        if isinstance(spec.arg, TensorArgument) and name is not None:
            spec.arg = TensorArgument(name=name)
    return ExportedProgram(root=gm, graph=gm.graph, graph_signature=ExportGraphSignature(
        input_specs=sig.input_specs, output_specs=sig.output_specs), state_dict=_state_dict(ep, weights),
        range_constraints=ep.range_constraints, module_call_graph=copy.deepcopy(ep.module_call_graph),
        example_inputs=ep.example_inputs, constants=ep.constants, verifiers=[ep.verifier])


def _state_dict(ep: ExportedProgram, weights: dict | None) -> dict:
    if not weights:
        return ep.state_dict
    state = dict(ep.state_dict)
    for name, tensor in weights.items():
        key = ep.graph_signature.inputs_to_parameters[name]
        old = state[key]
        state[key] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad) \
            if isinstance(old, torch.nn.Parameter) else tensor
    return state


def parameter_tensors(ep: ExportedProgram) -> dict:
    """{placeholder name: tensor} for the program's parameters."""
    return {name: ep.state_dict[key] for name, key in ep.graph_signature.inputs_to_parameters.items()}


def params_of(ep: ExportedProgram) -> set:
    s = ep.graph_signature
    return set(s.inputs_to_parameters) | set(s.inputs_to_buffers) | set(s.inputs_to_lifted_tensor_constants)


def constants_of(ep: ExportedProgram) -> dict:
    s = ep.graph_signature
    out = {}
    for name, target in s.inputs_to_lifted_tensor_constants.items():
        out[name] = ep.constants.get(target)
    for name, target in s.inputs_to_buffers.items():
        t = ep.state_dict.get(target, ep.constants.get(target))
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            out[name] = t
    return out


def probe_graph(gm: GraphModule, sites) -> tuple[GraphModule, dict]:
    """A copy of `gm` that also computes each site's normal form, unused by the graph.

    Returns (copy, {site id: {"q", "k", "v", "mask", "out": node}}): one run of the copy
    yields what each site saw and what it produced.
    """
    new, fxs = copy_with_sites(gm, sites)
    probes = {}
    for site in sites:
        fx = fxs[site.id]
        q, k, v, mask = emit_normal_form(Emitter(new.graph, fx.out, fx.anchor), fx)
        out = _output_in_normal_form(Emitter(new.graph, fx.out.next, fx.anchor), fx, q, v)
        probes[site.id] = {"q": q, "k": k, "v": v, "mask": mask, "out": out}
    new.recompile()
    return new, probes


def _output_in_normal_form(e: Emitter, fx: FxSite, q4: Node, v4: Node) -> Node:
    """The site's own output seen in the (B, H, Lq, Dv) layout: emit_site's mapping, undone."""
    lead, plead = list(fx.lead), list(fx.pv_lead)
    refs = [q4, v4, fx.out, fx.anchor, fx.q.node, fx.v.node]
    tail = [G.shape_of(q4)[-2], G.shape_of(v4)[-1]]
    full = [*plead, *tail]
    o = fx.out
    if fx.out_perm is not None:
        o = e.reshape(o, [full[i] for i in fx.out_perm], refs)
        o = e(aten.permute.default, o, [fx.out_perm.index(i) for i in range(len(fx.out_perm))])
    o = e.reshape(o, full, refs)
    if not G.same_shape(plead, lead):
        o = e.reshape(o, [*lead, *tail], refs)
    return _to4d(e, o, lead, refs)
