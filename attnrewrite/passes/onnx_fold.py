"""Fold calibrated output maps into the output projection that follows them (ONNX).

A calibrated site's lowering ends in `MatMul(y, X)` with X a (1, H, Dv, Dv) constant: each
head's output times its own map. When the site's output then reaches the model's output
projection only by merging heads — `Transpose(perm 0,2,1,3)`, `Reshape` to (B, L, H·Dv),
`MatMul(·, W)` with W an initializer (H·Dv × out) used by that MatMul alone — the map can
live in W instead: y W = Σ_h (o_h X_h) W_h = Σ_h o_h (X_h W_h), so W's row block h becomes
X_h W_h and the per-head MatMul goes. The model then costs what it did before calibration.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .onnx_graph import Graph


def _only_consumer(g: Graph, name: str):
    users = g.users.get(name, [])
    return users[0] if len(users) == 1 and name not in g.outputs else None


def fold_out_maps(model: onnx.ModelProto, maps: dict, base_dir: Path | None = None) -> dict:
    """Fold the maps of `maps` ({site id: out_map floats}) into their output projections,
    editing `model` in place; returns {site id: weight name} for the folded sites."""
    graph = Graph(model)                       # producers, users, initializers, constants
    inits, g = graph.inits, model.graph
    folded, drop = {}, []
    for n in g.node:
        if n.op_type != "MatMul" or not n.name.startswith("attnrewrite/") or n.input[1] not in inits:
            continue
        x = numpy_helper.to_array(inits[n.input[1]])
        if x.ndim != 4 or x.shape[0] != 1 or x.shape[2] != x.shape[3]:
            continue
        sid = next((s for s, m in maps.items() if len(m) == x.size and
                    np.array_equal(np.asarray(m, dtype=x.dtype).reshape(x.shape), x)), None)
        if sid is None:
            continue
        _, h, dv, _ = x.shape
        t = _only_consumer(graph, n.output[0])
        if t is None or t.op_type != "Transpose" or [a.ints for a in t.attribute if a.name == "perm"] != [[0, 2, 1, 3]]:
            continue
        r = _only_consumer(graph, t.output[0])
        shape = graph.const(r.input[1]) if r is not None and r.op_type == "Reshape" else None
        shape = shape.tolist() if shape is not None else None
        if shape is None or len(shape) != 3 or shape[-1] not in (-1, h * dv) or -1 in shape[:2]:
            continue
        mm = _only_consumer(graph, r.output[0])
        if mm is None or mm.op_type != "MatMul" or mm.input[0] != r.output[0] or mm.input[1] not in inits:
            continue
        w_name = mm.input[1]
        if len(graph.users.get(w_name, [])) != 1:
            continue                                  # a shared weight: folding would change its other uses
        w_t = inits[w_name]
        w = numpy_helper.to_array(w_t, str(base_dir) if base_dir else "")
        if w.shape[0] != h * dv:
            continue
        blocks = w.astype(np.float64).reshape(h, dv, -1)
        new = np.einsum("hde,heo->hdo", x[0].astype(np.float64), blocks).reshape(w.shape).astype(w.dtype)
        w_t.CopyFrom(numpy_helper.from_array(new, w_name))        # inline now; saved with the others
        for user in graph.users.get(n.output[0], []):                # the per-head MatMul goes
            user.input[:] = [n.input[0] if i == n.output[0] else i for i in user.input]
        drop.append(n)
        folded[sid] = w_name
    for n in drop:
        g.node.remove(n)
    unused = {n.input[1] for n in drop}
    kept = [t for t in g.initializer if t.name not in unused]
    del g.initializer[:]
    g.initializer.extend(kept)
    return folded
