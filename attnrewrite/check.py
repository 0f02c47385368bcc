"""Numeric checks: each rewritten site on its own captured inputs, and the whole program.

Per site, the original graph is run once with probe nodes added (fx_rewrite.probe_graph):
the variant op sees exactly the q/k/v/bias the original site saw, and its output is
compared with the original site's output. End to end, the original and rewritten
programs run on the same inputs and every floating output is compared.
Errors: rel_err = ‖a − b‖_F / ‖a‖_F (a = original), max_abs_err, cosine, all in float64.
"""
from __future__ import annotations

import math

import torch
import torch.utils._pytree as pytree

from .passes import fx_detect as D
from .passes.fx_rewrite import probe_graph


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    a, b = ref.detach().double().flatten(), got.detach().double().flatten()
    diff = a - b
    na = torch.linalg.vector_norm(a).item()
    nd = torch.linalg.vector_norm(diff).item()
    nb = torch.linalg.vector_norm(b).item()
    return {"max_abs_err": diff.abs().max().item() if diff.numel() else 0.0,
            "rel_err": nd / na if na > 0 else nd,
            "cosine": (a @ b).item() / (na * nb) if na > 0 and nb > 0 else (1.0 if nd == 0 else 0.0)}


def worst(stats: list[dict]) -> dict:
    if not stats:
        return {}
    return {"max_abs_err": max(s["max_abs_err"] for s in stats),
            "rel_err": max(s["rel_err"] for s in stats),
            "cosine": min(s["cosine"] for s in stats)}


class _Capture(torch.fx.Interpreter):
    def __init__(self, gm, wanted):
        super().__init__(gm)
        self.wanted, self.got = set(wanted), {}

    def run_node(self, n):
        r = super().run_node(n)
        if n in self.wanted:
            self.got[n] = r
        return r


def is_causal_mask(mask: torch.Tensor | None) -> bool:
    """True when every key after the (bottom-right) diagonal is removed, for every row."""
    if mask is None or mask.shape[-2] < 2:
        return False
    lq, lk = mask.shape[-2], mask.shape[-1]
    removed = ~mask if mask.dtype == torch.bool else mask <= D.MASK_FLOOR
    upper = torch.ones(lq, lk, dtype=torch.bool).triu(lk - lq + 1)
    if not upper.any():
        return False
    removed = removed.expand(*removed.shape[:-2], lq, lk)
    return bool(removed[..., upper].all()) and not bool(removed[..., ~upper].all())


def capture(ep, variant, choose, inputs: list):
    """Run the probe graph on every input set: (sites, {site id: [{name: tensor} per input set]}).

    Per site the names are q, k, v, mask (the normal form the op sees), out (the variant's
    output on them) and orig (the original site's output).
    """
    gm, sites, _, probes = probe_graph(ep, variant, choose)
    wanted = [n for p in probes.values() for n in p.values() if n is not None]
    got: dict[int, list] = {i: [] for i in probes}
    for args, kwargs in inputs:
        cap = _Capture(gm, wanted)
        flat = ep._graph_module_flat_inputs(args, kwargs)
        with torch.no_grad():
            cap.run(*flat, enable_io_processing=False)
        for sid, nodes in probes.items():
            got[sid].append({k: cap.got.get(n) for k, n in nodes.items() if n is not None})
    return sites, got


def check_sites(ep, variant, choose, inputs: list):
    """Fill each chosen site's `check` field (errors over all input sets, diagnostics on the first).

    Returns the sites (detected again on the probe's copy, same ids as in the rewrite).
    """
    sites, got = capture(ep, variant, choose, inputs)
    for site in sites:
        runs = got.get(site.id)
        if not runs:
            continue
        first = runs[0]
        site.causal = site.causal or is_causal_mask(first.get("mask"))
        if site.scale == "dynamic":
            site.add_reason("scale computed in the graph")
        fx = site.graph
        if fx.dropout_active:
            site.check = {"unchecked": "dropout active"}
            continue
        options = choose(site) or {}
        diag = variant.diagnostics(first["q"], first["k"], first["v"], first.get("mask"), float(fx.scale),
                                   float(fx.softcap), bool(fx.causal), options)
        site.check = {**worst([compare(r["orig"], r["out"]) for r in runs]), "diagnostics": diag}
    return sites


def outputs_of(ep, args, kwargs) -> list[tuple[str, torch.Tensor]]:
    with torch.no_grad():
        out = ep.module()(*args, **kwargs)
    leaves, _ = pytree.tree_flatten_with_path(out)
    return [(pytree.keystr(path) or "output", t) for path, t in leaves
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def check_end_to_end(ep_orig, ep_new, inputs: list, tolerance: float | None) -> dict:
    by_name: dict[str, list] = {}
    for args, kwargs in inputs:
        for (name, a), (_, b) in zip(outputs_of(ep_orig, args, kwargs), outputs_of(ep_new, args, kwargs)):
            by_name.setdefault(name, []).append(compare(a, b))
    outs = [{"name": n, **worst(s)} for n, s in by_name.items()]
    rel = max((o["rel_err"] for o in outs), default=0.0)
    passed = None if tolerance is None else bool(rel <= tolerance) and not math.isnan(rel)
    return {"outputs": outs, "rel_err": rel, "tolerance": tolerance, "passed": passed}


def default_tolerance(variant_name: str, sites) -> float | None:
    if variant_name != "exact":
        return None
    half = any(str(s.dtype) in ("float16", "bfloat16") for s in sites)
    return 1e-2 if half else 1e-4
