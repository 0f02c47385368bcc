"""Rewrite ONNX attention sites into standard ONNX ops, one variant lowering per site.

For every selected site the pass

1. builds the site's normal form from the graph — q (B, H, Lq, D), k/v (B, Hkv, Lk, D),
   one mask (boolean: True = attend, or additive), scale, soft-cap, causal —
   (`normal_form`: a few Transpose/Reshape/Unsqueeze/Where nodes, often none);
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
Plain onnx protobuf + onnx.helper: the edits are local, and nothing else is needed.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..site import AttentionSite
from .onnx_detect import Graph, OnnxSite

MIN_OPSET = 13           # Unsqueeze/Squeeze/Slice with axes as inputs


class Unsupported(Exception):
    """The site cannot be lowered; it is kept as it is with this reason."""


class Builder:
    """Emits nodes and constants for one graph; every name is fresh; tracks dtypes."""

    def __init__(self, g: Graph, prefix: str = "attnrewrite"):
        self.g, self.prefix = g, prefix
        self.opset = g.opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.types: dict[str, int] = {}
        self._n = 0
        self._taken = set(g.producer) | set(g.inits) | {i.name for i in g.graph.input}

    def fresh(self, hint: str) -> str:
        while True:
            self._n += 1
            name = f"{self.prefix}/{hint}_{self._n}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def dtype(self, name: str) -> int:
        return self.types.get(name) or self.g.elem_type(name)

    def op(self, op_type: str, *inputs, domain: str = "", dtype: int | None = None, **attrs) -> str:
        """One node with one output; returns the output's name."""
        out = self.fresh(op_type)
        self.nodes.append(helper.make_node(op_type, [i or "" for i in inputs], [out],
                                           name=self.fresh(op_type + "_node"), domain=domain, **attrs))
        if dtype is None:                     # most ops keep their first input's type
            dtype = self.dtype(inputs[1] if op_type == "Where" else inputs[0]) if inputs else 0
        self.types[out] = dtype
        return out

    def const(self, value, dtype: int | None = None) -> str:
        arr = np.asarray(value, dtype=helper.tensor_dtype_to_np_dtype(dtype) if dtype else None)
        name = self.fresh("const")
        self.inits.append(numpy_helper.from_array(arr, name))
        self.types[name] = helper.np_dtype_to_tensor_dtype(arr.dtype)
        return name

    def ints(self, *values) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def scalar_like(self, value: float, like: str) -> str:
        return self.const(np.array(value), self.dtype(like))

    def transpose(self, x: str, perm) -> str:
        return x if perm is None else self.op("Transpose", x, perm=list(perm))

    def shape_of(self, x: str, start: int, end: int) -> str:
        return self.op("Slice", self.op("Shape", x, dtype=TensorProto.INT64), self.ints(start),
                       self.ints(end), dtype=TensorProto.INT64)

    def cast(self, x: str, to: int) -> str:
        return x if self.dtype(x) == to else self.op("Cast", x, to=to, dtype=to)


# ---------------------------------------------------------------- normal form

def _heads_split(b: Builder, x: str, heads: int, bias=None) -> str:
    """(B, L, H·D) [+ bias] → (B, H, L, D)."""
    if bias is not None:
        x = b.op("Add", x, bias)
    return b.op("Transpose", b.op("Reshape", x, b.ints(0, 0, heads, -1)), perm=[0, 2, 1, 3])


def _slices(b: Builder, x: str, sizes: list[int], axis: int) -> list[str]:
    """Consecutive slices of `sizes` along `axis` (packed q|k|v biases or projections)."""
    out, start = [], 0
    for n in sizes:
        out.append(b.op("Slice", x, b.ints(start), b.ints(start + n), b.ints(axis)))
        start += n
    return out


def _hidden(g: Graph, name: str):
    s = g.shape(name)
    return s[-1] if s and isinstance(s[-1], int) else None


def _combine_mask(b: Builder, keeps: list, biases: list, like: str):
    """One mask for the normal form: boolean when only boolean masks, else additive."""
    keeps = [k if keep else b.op("Not", k) for k, keep in keeps]
    keep = None
    for k in keeps:
        k = b.cast(k, TensorProto.BOOL)
        keep = k if keep is None else b.op("And", keep, k)
    if not biases:
        return keep
    dt = b.dtype(like)
    total = None
    for v, coef in biases:
        v = b.cast(v, dt)
        if coef != 1.0:
            v = b.op("Mul", v, b.scalar_like(coef, v))
        total = v if total is None else b.op("Add", total, v)
    if keep is not None:
        total = b.op("Add", total, b.op("Where", keep, b.scalar_like(0.0, like), b.scalar_like(-math.inf, like)))
    return total


def normal_form(b: Builder, site: AttentionSite):
    """(q, k, v, mask) values for `site` in the normal form; emits the nodes it needs."""
    s: OnnxSite = site.graph
    g = b.g
    if g.opset < MIN_OPSET:
        raise Unsupported(f"opset {g.opset} < {MIN_OPSET}")
    if s.kind in ("decomposed", "attention"):
        q, k, v = s.q, s.k, s.v
        if s.kind == "attention" and s.rank == 3:
            hq, hkv = s.attrs.get("q_num_heads"), s.attrs.get("kv_num_heads")
            q, k, v = _heads_split(b, q, hq), _heads_split(b, k, hkv), _heads_split(b, v, hkv)
        else:
            q, k, v = b.transpose(q, s.q_perm), b.transpose(k, s.k_perm), b.transpose(v, s.v_perm)
            if s.rank == 3:
                q, k, v = (b.op("Unsqueeze", x, b.ints(0)) for x in (q, k, v))
        return q, k, v, _combine_mask(b, s.keeps, s.biases, q)
    n = s.inputs
    h, hkv = s.heads, s.kv_heads
    if s.kind == "msattention":
        w = g.shape(n[1])
        sizes = s.attrs.get("qkv_hidden_sizes") or ([w[1] // 3] * 3 if w and isinstance(w[1], int) else None)
        if not sizes:
            raise Unsupported("cannot read the q/k/v hidden sizes")
        qkv = b.op("MatMul", n[0], n[1])
        if _present_in(n, 2):
            qkv = b.op("Add", qkv, n[2])
        q, k, v = (_heads_split(b, x, h) for x in _slices(b, qkv, sizes, -1))
    else:
        qb = kb = vb = None
        if s.kind == "mha" and _present_in(n, 3):
            hq, hk = _hidden(g, n[0]), _hidden(g, n[1]) if g.rank(n[1]) == 3 else None
            hv = _hidden(g, n[2]) if g.rank(n[2]) == 3 else None
            if hq is None or (g.rank(n[1]) == 3 and (hk is None or hv is None)):
                raise Unsupported("bias with unknown hidden sizes")
            if g.rank(n[1]) == 4:
                raise Unsupported("bias with (B, H, L, D) key/value")
            qb, kb, vb = _slices(b, n[3], [hq, hk, hv], 0)
        q = _heads_split(b, n[0], h, qb)
        if g.rank(n[1]) == 4:
            k, v = n[1], n[2]
        else:
            k, v = _heads_split(b, n[1], hkv, kb), _heads_split(b, n[2], hkv, vb)
    # masks of the contrib ops
    keeps, biases = [], []
    pad = {"msattention": 3, "mha": 4}.get(s.kind)
    if pad is not None and _present_in(n, pad):          # (B, Lk) 0/1 key padding
        keep = b.op("Unsqueeze", b.cast(n[pad], TensorProto.BOOL), b.ints(1, 2))
        keeps.append((keep, True))
    if s.kind == "gqa":                                   # keys j <= seqlens_k[b] are valid
        lk = b.shape_of(k, 2, 3)
        j = b.op("Range", b.const(np.array(0, np.int64)), b.op("Squeeze", lk, b.ints(0)),
                 b.const(np.array(1, np.int64)), dtype=TensorProto.INT64)
        total = b.op("Unsqueeze", b.cast(n[5], TensorProto.INT64), b.ints(1, 2, 3))
        keeps.append((b.op("LessOrEqual", j, total, dtype=TensorProto.BOOL), True))
    bias_i = {"msattention": 5, "mha": 5, "gqa": 10}[s.kind]
    if _present_in(n, bias_i):
        biases.append((n[bias_i], 1.0))
    return q, k, v, _combine_mask(b, keeps, biases, q)


def _present_in(inputs: list, i: int) -> bool:
    return len(inputs) > i and bool(inputs[i])


def resolve_scale(b: Builder, site: AttentionSite) -> float:
    if site.scale is not None:
        return float(site.scale)
    raise Unsupported("default scale with an unknown head_dim")


def finish(b: Builder, site: AttentionSite, y: str) -> str:
    """Map the (B, H, Lq, Dv) output back to the site's own layout."""
    s: OnnxSite = site.graph
    if s.kind == "decomposed":
        y = b.transpose(y, s.out_perm)
        return b.op("Squeeze", y, b.ints(0)) if s.rank == 3 else y
    if s.kind == "attention" and s.rank == 4:
        return y
    return b.op("Reshape", b.op("Transpose", y, perm=[0, 2, 1, 3]), b.ints(0, 0, -1))


def unfinish(b: Builder, site: AttentionSite, out: str) -> str:
    """The site's output value seen in the normal form's (B, H, Lq, Dv) layout."""
    s: OnnxSite = site.graph
    if s.kind == "decomposed":
        y = b.op("Unsqueeze", out, b.ints(0)) if s.rank == 3 else out
        return b.transpose(y, None if s.out_perm is None else list(np.argsort(s.out_perm)))
    if s.kind == "attention" and s.rank == 4:
        return out
    return _heads_split(b, out, s.heads if s.kind != "attention" else s.attrs.get("q_num_heads"))


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
    """softcap(scale·q·kᵀ) + mask, in q's dtype, (B, H, Lq, Lk); k already has H heads."""
    s = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2]))
    s = b.op("Mul", s, b.scalar_like(resolve_scale(b, site), q))
    if site.softcap:
        cap = b.scalar_like(float(site.softcap), q)
        s = b.op("Mul", b.op("Tanh", b.op("Div", s, cap)), cap)
    if causal:
        mask = with_causal(b, q, k, mask)
    if mask is not None:
        if b.dtype(mask) == TensorProto.BOOL:
            s = b.op("Where", mask, s, b.scalar_like(-math.inf, q))
        else:
            s = b.op("Add", s, b.cast(mask, b.dtype(q)))
    return s


def safe_softmax(b: Builder, s: str) -> str:
    """Softmax over the key axis; a row with no visible key gives zeros, not NaN."""
    p = b.op("Softmax", s, axis=-1 if b.opset >= 13 else 3)
    return b.op("Where", b.op("IsNaN", p, dtype=TensorProto.BOOL), b.scalar_like(0.0, p), p)


# ---------------------------------------------------------------- the pass

def lower_site(b: Builder, site: AttentionSite, variant, options: dict) -> str:
    """The new value computing the site's output (in the site's layout)."""
    lower = getattr(variant, "onnx_lower", None)
    if lower is None:
        raise Unsupported(f"no ONNX lowering for {variant.NAME} yet")
    q, k, v, mask = normal_form(b, site)
    # the flag the lowering must apply: causal masks found in the graph are already in `mask`
    y = lower(b, replace(site, causal=site.graph.causal), q, k, v, mask, options)
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


def _subgraph_inputs(node) -> set:
    names = set()
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in sub.node:
                names.update(n.input)
                names |= _subgraph_inputs(n)
    return names


def sweep(model: onnx.ModelProto) -> None:
    """Remove nodes and initializers nothing reaches from the graph outputs."""
    g = model.graph
    live = {o.name for o in g.output}
    keep = []
    for n in reversed(g.node):
        if any(o in live for o in n.output if o):
            keep.append(n)
            live.update(i for i in n.input if i)
            live |= _subgraph_inputs(n)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in live]
    del g.initializer[:]
    g.initializer.extend(inits)
    vi = [v for v in g.value_info if v.name in live]
    del g.value_info[:]
    g.value_info.extend(vi)


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
