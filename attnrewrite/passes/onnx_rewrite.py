"""Rewrite ONNX attention sites into standard ONNX ops, one variant lowering per site.

For every selected site the pass

1. builds the site's normal form from the graph — q (B, H, Lq, D), k/v (B, Hkv, Lk, D),
   one mask (boolean: True = attend, or additive), scale, soft-cap, causal —
   (`onnx_normal.normal_form`: a few Transpose/Reshape/Unsqueeze/Where nodes, often none);
2. calls the variant's `onnx_lower(builder, site, q, k, v, mask, options)`, which emits
   the variant's ops and returns the (B, H, Lq, Dv) output value
   (`attnrewrite/variants/<name>.py` holds it; a variant without one keeps the site);
3. maps the output back to the site's layout under the site's own output name and
   splices the new nodes where the old product/op was; dead nodes are swept.

Before (dynamo export)::

    Mul(q, √s) ─┐
    Reshape→Transpose→Reshape(k) → Mul(·, √s) ─ MatMul ─ Add(Where(m, 0, -inf)) ─ Softmax
      ─ Where(IsNaN) ─ MatMul(·, v) → out

After (`exact`, opset ≥ 23)::

    Attention(q, k, v, m, scale=s) → out

The model's opset and IR version are kept: below opset 23 the exact lowering is the
decomposed form again (canonical: one MatMul, one scale, one mask, a NaN-safe softmax).
Plain onnx protobuf + onnx.helper: the edits are local, and nothing else is needed. The graph
indexes, the node `Builder`, constant folding and the dead-node sweep are `onnx_graph`'s; the
normal form and the way back from it (`finish`, `unfinish`) are `onnx_normal`'s.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..site import MASK_FLOOR, AttentionSite, NormalForm
from .onnx_graph import Builder, Graph, constant, subgraph_inputs, subgraph_made, sweep
from .onnx_normal import Unsupported, finish, normal_form, unfinish


# ---------------------------------------------------------------- scale

def scalar_scale(site: AttentionSite) -> float | None:
    """The site's scalar scale (NormalForm.scale); for a "per-head" site the scalar part (its
    tensor goes to q in `normal_form`)."""
    return NormalForm.of(site).scale


def resolve_scale(b: Builder, site: AttentionSite) -> float:
    scale = scalar_scale(site)
    if scale is not None:
        return float(scale)
    raise Unsupported("default scale with an unknown head_dim")


# ---------------------------------------------------------------- shared lowering helpers

def repeat_kv(b: Builder, x: str, heads: int, kv_heads: int) -> str:
    """(B, Hkv, L, D) → (B, H, L, D), head h reading kv head h // (H // Hkv)."""
    if heads == kv_heads:
        return x
    n = heads // kv_heads
    e = b.op("Expand", b.op("Unsqueeze", x, b.ints(2)), b.ints(1, 1, n, 1, 1))
    shape = b.op("Concat", b.shape_of(x, 0, 1), b.ints(heads), b.shape_of(x, 2, 4), axis=0,
                 dtype=TensorProto.INT64)
    return b.op("Reshape", e, shape)


def causal_keep(b: Builder, q: str, k: str) -> str:
    """Boolean (Lq, Lk): key j visible to query i iff j <= i + Lk - Lq (bottom-right)."""
    i64 = TensorProto.INT64
    lq = b.op("Squeeze", b.shape_of(q, 2, 3), b.ints(0))
    lk = b.op("Squeeze", b.shape_of(k, 2, 3), b.ints(0))
    zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    i = b.op("Unsqueeze", b.op("Range", zero, lq, one, dtype=i64), b.ints(1))
    j = b.op("Range", zero, lk, one, dtype=i64)
    return b.op("LessOrEqual", j, b.op("Add", i, b.op("Sub", lk, lq)), dtype=TensorProto.BOOL)


def with_causal(b: Builder, q: str, k: str, mask: str | None) -> str:
    """`mask` with the causal mask folded in (boolean stays boolean)."""
    keep = causal_keep(b, q, k)
    if mask is None:
        return keep
    if b.dtype(mask) == TensorProto.BOOL:
        return b.op("And", mask, keep)
    return b.op("Add", mask, b.op("Where", keep, b.scalar_like(0.0, mask), b.scalar_like(-math.inf, mask)))


def full_query_rows(b: Builder, mask: str, q: str) -> str:
    """`mask` broadcast to Lq rows on axis -2 (onnxruntime's Attention does not broadcast it)."""
    shape = b.g.shape(mask)
    lq = b.g.shape(q)
    if shape and lq and len(shape) >= 2 and shape[-2] is not None and shape[-2] == lq[2] != 1:
        return mask
    rows = b.op("Concat", b.ints(1, 1), b.shape_of(q, 2, 3), b.ints(1), axis=0, dtype=TensorProto.INT64)
    return b.op("Expand", mask, rows)


def decomposed_scores(b: Builder, site: AttentionSite, q: str, k: str, mask: str | None, causal: bool) -> str:
    """softcap(scale·q·kᵀ) + mask, in q's dtype, (B, H, Lq, Lk); k already has H heads.

    The scale multiplies q (Lq·D values), not the scores (Lq·Lk)."""
    scale = resolve_scale(b, site)
    if scale != 1.0:                          # (T5 scales nothing)
        q = b.op("Mul", q, b.scalar_like(scale, q))
    s = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2]))
    if site.softcap:
        cap = b.scalar_like(float(site.softcap), q)
        s = b.op("Mul", b.op("Tanh", b.op("Div", s, cap)), cap)
    if causal:
        mask = with_causal(b, q, k, mask)
    if mask is not None:                    # a boolean mask becomes a bias at its own (broadcast) size
        if b.dtype(mask) == TensorProto.BOOL:
            mask = b.op("Where", mask, b.scalar_like(0.0, q), b.scalar_like(-math.inf, q))
        s = b.op("Add", s, b.cast(mask, b.dtype(q)))
    return s


def safe_softmax(b: Builder, s: str) -> str:
    """Softmax over the key axis; a row with no visible key gives zeros, not NaN."""
    p = b.op("Softmax", s, axis=-1 if b.opset >= 13 else 3)
    return b.op("Where", b.op("IsNaN", p, dtype=TensorProto.BOOL), b.scalar_like(0.0, p), p)


def _removed(a: np.ndarray) -> np.ndarray:
    """Where a mask removes the key: False (boolean) or at/below MASK_FLOOR (additive)."""
    return ~a if a.dtype == np.bool_ else a <= MASK_FLOOR


def constant_causal(b: Builder, mask: str | None) -> str | None:
    """How a constant mask spells exactly the bottom-right causal pattern, else None.

    "inf": False or -inf above the diagonal; "finite": a finite fill at or below MASK_FLOOR
    there (dynamo's finfo.min). Either way every other entry is True or exactly 0, so the mask
    can be dropped for the causal flag wherever a removed key weighs exactly 0 (every row
    keeps its diagonal key). Checked a block of rows at a time.
    """
    a = constant(b, mask)
    if a is None or a.ndim < 2 or a.shape[-2] < 2:
        return None
    lq, lk = a.shape[-2:]
    if lk - lq + 1 >= lk or lq > lk:                 # nothing above the diagonal, or rows with no key
        return None
    j = np.arange(lk)
    finite = False
    for r0 in range(0, lq, 1024):
        rows = a[..., r0:r0 + 1024, :]
        upper = j[None, :] > np.arange(r0, r0 + rows.shape[-2])[:, None] + (lk - lq)
        kept = rows if rows.dtype == np.bool_ else rows == 0
        if not (_removed(rows)[..., upper].all() and kept[..., ~upper].all()):
            return None
        finite |= rows.dtype != np.bool_ and bool(np.isfinite(rows[..., upper]).any())
    return "finite" if finite else "inf"


def rows_can_die(b: Builder, site: AttentionSite, mask: str | None, causal: bool) -> bool:
    """Whether some query row may see no key at all (a plain softmax would give NaN there).

    No: no mask and not causal; causal with no more queries than keys; a constant mask with
    a kept key in every row (and no causal flag on top). Yes otherwise: a mask known only at
    run time may remove every key of a row.
    """
    if mask is not None:
        a = constant(b, mask)
        if a is None or causal:
            return True
        return bool((_removed(a) & ~np.isfinite(a) if a.dtype != np.bool_ else _removed(a)).all(-1).any())
    if not causal:
        return False
    lq, lk = site.q_len, site.kv_len
    if lq is not None and lq == lk:
        return False
    return not (isinstance(lq, int) and isinstance(lk, int) and lq <= lk)


def zero_nan_rows(b: Builder, y: str) -> str:
    """y with NaN entries set to 0: the (B, H, Lq, Dv) output of a row with no visible key
    (its softmax is NaN), at the cost of one pass over the output, not over the scores."""
    return b.op("Where", b.op("IsNaN", y, dtype=TensorProto.BOOL), b.scalar_like(0.0, y), y)


# ---------------------------------------------------------------- the pass

def lower_site(b: Builder, site: AttentionSite, variant, options: dict) -> str:
    """The new value computing the site's output (in the site's layout)."""
    lower = variant.onnx_lower
    if lower is None:
        raise Unsupported(f"no ONNX lowering for {variant.name} yet")
    q, k, v, mask = normal_form(b, site)
    # the flag the lowering must apply: causal masks found in the graph are already in `mask`
    y = lower(b, replace(site, causal=NormalForm.of(site).causal), q, k, v, mask, options)
    if options.get("out_map"):                 # a calibrated per-head Dv×Dv output map: y·X_h per head
        if not isinstance(site.heads, int):
            raise Unsupported("a calibrated output map needs a known head count")
        dv = int(round(math.sqrt(len(options["out_map"]) / site.heads)))
        x = np.asarray(options["out_map"], dtype=np.float64).reshape(1, site.heads, dv, dv)
        y = b.op("MatMul", y, b.const(x, b.dtype(y)))
    return finish(b, site, y)


def rewrite_model(model: onnx.ModelProto, sites: list[AttentionSite], variant, choice: dict,
                  inferred: onnx.ModelProto | None = None) -> tuple[onnx.ModelProto, dict]:
    """(a new ModelProto with every site in `choice` lowered, {site id: reason} for those kept).

    `choice` maps a site id to its options; a site whose lowering is unsupported is left
    as it is and its reason returned.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = Graph(out, inferred)
    b = Builder(g)
    plans = []                                        # (index of the replaced node, nodes, site)
    kept = {}
    index = {n.name: i for i, n in enumerate(out.graph.node)}
    for site in sites:
        opts = choice.get(site.id)
        if opts is None:
            continue
        if site.graph.keep:
            kept[site.id] = site.graph.keep
            continue
        start = len(b.nodes)
        try:
            y = lower_site(b, site, variant, opts)
        except Unsupported as e:
            del b.nodes[start:]
            kept[site.id] = str(e)
            continue
        _rename_output(b, y, site.graph.out)
        plans.append((index[site.graph.out_node], b.nodes[start:], site))
    nodes = list(out.graph.node)
    for i, new, _ in sorted(plans, key=lambda p: -p[0]):
        nodes[i:i + 1] = new
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(b.inits)
    _ensure_domains(out, [n for _, new, _ in plans for n in new])
    if b.opset > g.opset:                             # a lowering asked for a newer op (`Attention`)
        for o in out.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = b.opset
        out.ir_version = max(out.ir_version, helper.find_min_ir_version_for(list(out.opset_import)))
    sweep(out)
    return out, kept


def _rename_output(b: Builder, y: str, name: str) -> None:
    """Make the last node producing `y` write `name` instead (the site's output name)."""
    for n in reversed(b.nodes):
        for i, o in enumerate(n.output):
            if o == y:
                n.output[i] = name
                return
    b.nodes.append(helper.make_node("Identity", [y], [name], name=b.fresh("Identity_node")))


def _ensure_domains(model: onnx.ModelProto, nodes) -> None:
    have = {o.domain for o in model.opset_import}
    for n in nodes:
        if n.domain and n.domain not in have:
            model.opset_import.append(helper.make_opsetid(n.domain, 1))
            have.add(n.domain)


def probe_model(model: onnx.ModelProto, sites: list[AttentionSite], inferred=None):
    """A copy whose extra outputs are each site's normal-form q/k/v/mask and output.

    Returns (model, {site id: {"q", "k", "v", "mask", "out": output name}}).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = Graph(out, inferred)
    b = Builder(g, prefix="attnrewrite_probe")
    index = {n.name: i for i, n in enumerate(out.graph.node)}
    plans, probes, outputs = [], {}, []
    have = {o.name for o in out.graph.output}
    for site in sites:
        start = len(b.nodes)
        try:
            q, k, v, mask = normal_form(b, site)
        except Unsupported:
            del b.nodes[start:]
            continue
        names = {"q": q, "k": k, "v": v, "mask": mask, "out": unfinish(b, site, site.graph.out)}
        probes[site.id] = names
        plans.append((index[site.graph.out_node], b.nodes[start:]))
        for name in names.values():
            if name and name not in have:
                have.add(name)
                dt = b.dtype(name) or g.elem_type(name) or TensorProto.FLOAT
                outputs.append(helper.make_tensor_value_info(name, dt, None))
    nodes = list(out.graph.node)
    for i, new in sorted(plans, key=lambda p: -p[0]):
        nodes[i + 1:i + 1] = new                      # after the site's node: only outputs read them
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(b.inits)
    out.graph.output.extend(outputs)
    return out, probes


# ---------------------------------------------------------------- what the rewrite changed

def _node_key(n) -> tuple:
    return n.name, n.op_type, n.domain, tuple(n.input), tuple(n.output)


def changed_subgraph(original: onnx.ModelProto, rewritten: onnx.ModelProto,
                     inferred: onnx.ModelProto | None = None) -> onnx.ModelProto | None:
    """The nodes the rewrite added, as a model of their own — what a full (type and shape)
    check of the rewrite looks at; None when nothing was added or a value they read or
    give back has an unknown element type.

    Inputs: every value the new nodes read and do not compute (q, k, v, masks, weights),
    typed from the original graph (inference, else its structure). Outputs: the values
    the rest of the graph reads from them, typed as the original graph had them, so a
    lowering that returns the wrong element type or rank fails the check. Nodes the
    model already had — com.microsoft contrib ops, onnxruntime's own ops in the standard
    domain — are not part of it.
    """
    old = {_node_key(n) for n in original.graph.node}
    nodes = [n for n in rewritten.graph.node if _node_key(n) not in old]
    if not nodes:
        return None
    old_inits = {t.name for t in original.graph.initializer}
    inits = [t for t in rewritten.graph.initializer if t.name not in old_inits]
    made = {o for n in nodes for o in n.output if o} | {t.name for t in inits}
    made |= {x for n in nodes for x in subgraph_made(n)}
    src = Graph(rewritten, inferred)          # original values keep their inferred types
    before = Graph(original, inferred)

    def info(name: str, g: Graph):
        dt = g.elem_type(name)
        if not dt:
            return None
        s = g.shape(name)
        return helper.make_tensor_value_info(name, dt, None if s is None else
                                             [d if isinstance(d, int) else None for d in s])

    inputs, seen = [], set()
    for n in nodes:
        for i in [*n.input, *sorted(subgraph_inputs(n))]:          # (an If branch reads outer values)
            if i and i not in made and i not in seen:
                seen.add(i)
                vi = info(i, src)
                if vi is None:
                    return None
                inputs.append(vi)
    read_outside = {i for n in rewritten.graph.node if _node_key(n) in old for i in n.input}
    read_outside |= {o.name for o in rewritten.graph.output}
    outputs = []
    for n in nodes:
        for o in n.output:
            if o and o in read_outside:
                vi = info(o, before)
                vi = vi if vi is not None else info(o, src)
                if vi is None:                # no type to hold it to: the structural check only
                    return None
                outputs.append(vi)
    if not outputs:
        return None
    if rewritten.ir_version < 4:              # initializers were graph inputs then
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    g = helper.make_graph(nodes, "attnrewrite-changed", inputs, outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=list(rewritten.opset_import))
    m.ir_version = rewritten.ir_version
    return m
