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


def _only_consumer(consumers: dict, name: str, graph_outputs: set):
    users = consumers.get(name, [])
    return users[0] if len(users) == 1 and name not in graph_outputs else None


def _const_ints(inits: dict, producers: dict, name: str):
    if name in inits:
        return numpy_helper.to_array(inits[name]).tolist()
    n = producers.get(name)
    if n is not None and n.op_type == "Constant":
        return numpy_helper.to_array(n.attribute[0].t).tolist()
    return None


def fold_out_maps(model: onnx.ModelProto, maps: dict, base_dir: Path | None = None) -> dict:
    """Fold the maps of `maps` ({site id: out_map floats}) into their output projections,
    editing `model` in place; returns {site id: weight name} for the folded sites."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
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
        t = _only_consumer(consumers, n.output[0], outputs)
        if t is None or t.op_type != "Transpose" or [a.ints for a in t.attribute if a.name == "perm"] != [[0, 2, 1, 3]]:
            continue
        r = _only_consumer(consumers, t.output[0], outputs)
        shape = _const_ints(inits, producers, r.input[1]) if r is not None and r.op_type == "Reshape" else None
        if shape is None or len(shape) != 3 or shape[-1] not in (-1, h * dv) or -1 in shape[:2]:
            continue
        mm = _only_consumer(consumers, r.output[0], outputs)
        if mm is None or mm.op_type != "MatMul" or mm.input[0] != r.output[0] or mm.input[1] not in inits:
            continue
        w_name = mm.input[1]
        if len(consumers.get(w_name, [])) != 1:
            continue                                  # a shared weight: folding would change its other uses
        w_t = inits[w_name]
        w = numpy_helper.to_array(w_t, str(base_dir) if base_dir else "")
        if w.shape[0] != h * dv:
            continue
        blocks = w.astype(np.float64).reshape(h, dv, -1)
        new = np.einsum("hde,heo->hdo", x[0].astype(np.float64), blocks).reshape(w.shape).astype(w.dtype)
        w_t.CopyFrom(numpy_helper.from_array(new, w_name))        # inline now; saved with the others
        for user in consumers.get(n.output[0], []):                # the per-head MatMul goes
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
