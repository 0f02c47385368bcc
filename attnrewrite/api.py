"""The Python entry points: detect() and rewrite() over any supported object."""
from __future__ import annotations

import fnmatch
import math
import os
import time
from dataclasses import dataclass

import torch

from . import check as checks
from .loading import InputError, Inputs, export, inputs_for, normalise_inputs
from .loading import example_inputs as program_example_inputs
from .passes import fx_detect
from .passes.fx_rewrite import params_of, constants_of, rewrite_program
from .report import build_report
from .site import AttentionSite
from .variants import VARIANTS
from .variants.base import Param, parse_params


@dataclass
class Result:
    program: torch.export.ExportedProgram
    sites: list[AttentionSite]
    report: dict


def as_program(obj, example_inputs_=None):
    """(ExportedProgram | GraphModule, inputs or None) for what the user handed us."""
    inputs = normalise_inputs(example_inputs_) if example_inputs_ is not None else None
    if isinstance(obj, torch.export.ExportedProgram):
        return obj, inputs
    if isinstance(obj, torch.fx.GraphModule):
        return obj, inputs
    if isinstance(obj, torch.nn.Module):
        if inputs is None:
            raise InputError("an nn.Module needs example_inputs to be exported")
        args, kwargs = inputs[0]
        return export(obj, args, kwargs), inputs
    if isinstance(obj, (str, bytes)) or hasattr(obj, "__fspath__"):
        from .loading import load
        ep, inp, _, _ = load(str(obj), inputs, trust=False)
        return ep, inp
    raise InputError(f"cannot detect attention in a {type(obj).__name__}")




def parse_selection(sel) -> list[str] | None:
    if sel is None:
        return None
    if isinstance(sel, str):
        sel = [s for s in sel.split(",") if s.strip()]
    return [str(s).strip() for s in sel]


def selected(site: AttentionSite, sel: list[str] | None) -> bool:
    if sel is None:
        return True
    for s in sel:
        if s.isdigit() and int(s) == site.id:
            return True
        a, dash, b = s.partition("-")
        if dash and a.isdigit() and b.isdigit() and int(a) <= site.id <= int(b):
            return True
        if fnmatch.fnmatchcase(site.name, s) or s == site.name:
            return True
    return False


def variant_module(variant: str):
    name = variant.replace("-", "_")
    if name not in VARIANTS:
        names = ", ".join(sorted(v.replace("_", "-") for v in VARIANTS))
        raise InputError(f"unknown variant '{variant}' (choose from {names})")
    return VARIANTS[name]


def validate_options(variant: str, options: dict, tolerance: float | None = None) -> dict:
    """The variant's defaults overlaid with `options`, each checked; InputError on a bad one.

    `auto=true` (variants with an auto ladder) needs a tolerance: it picks per-site parameters.
    """
    mod = variant_module(variant)
    params = dict(mod.PARAMS)
    if getattr(mod, "auto_ladder", None) is not None:
        params["auto"] = Param(False, bool, "pick the cheapest per-site parameters within --tolerance")
    try:
        opts = parse_params(variant, params, options)
    except ValueError as e:
        raise InputError(str(e)) from None
    if opts.get("auto") and tolerance is None:
        raise InputError("--set auto=true needs --tolerance T (the end-to-end rel_err to stay within)")
    return opts


def _is_onnx(obj) -> bool:
    """An onnx.ModelProto or a path ending in .onnx (handled by attnrewrite.onnx_flow)."""
    if type(obj).__name__ == "ModelProto" and type(obj).__module__.startswith("onnx"):
        return True
    return isinstance(obj, (str, os.PathLike)) and str(obj).lower().endswith(".onnx")


def detect(obj, example_inputs=None) -> list[AttentionSite]:
    """Every attention site in `obj` (ExportedProgram, GraphModule, nn.Module + inputs, path)."""
    if _is_onnx(obj):
        from . import onnx_flow
        return onnx_flow.detect(obj, example_inputs)
    prog, inputs = as_program(obj, example_inputs)
    if isinstance(prog, torch.fx.GraphModule):
        return fx_detect.find_sites(prog.graph)[0]
    sites, _ = fx_detect.find_sites(prog.graph, params_of(prog), constants_of(prog))
    if inputs or program_example_inputs(prog):
        sites = checks.check_sites(prog, VARIANTS["exact"], lambda s: {}, inputs_for(prog, inputs)[0])
        for s in sites:
            s.check = None
    return sites


def rewrite(obj, variant: str = "exact", example_inputs=None, check: bool = True, sites=None,
            tolerance: float | None = None, **options) -> Result:
    """Rewrite the selected sites of `obj` into `variant`; check the numbers unless check=False."""
    if _is_onnx(obj):
        from . import onnx_flow
        return onnx_flow.rewrite(obj, variant, example_inputs, check=check, sites=sites,
                                 tolerance=tolerance, **options)
    t0 = time.perf_counter()
    prog, inputs = as_program(obj, example_inputs)
    if isinstance(prog, torch.fx.GraphModule):
        raise InputError("rewrite() takes an ExportedProgram, an nn.Module with inputs, or a path")
    inputs, kind = inputs_for(prog, inputs)
    return rewrite_loaded(prog, inputs, kind, variant, options, sites=sites, check=check,
                          tolerance=tolerance, timings={"load_s": time.perf_counter() - t0})


def _sample(site, run: dict) -> dict:
    fx = site.graph
    return {"q": run["q"], "k": run["k"], "v": run["v"], "mask": run.get("mask"), "scale": float(fx.scale),
            "softcap": float(fx.softcap), "causal": bool(fx.causal),
            "dropout_p": float(fx.dropout_p if fx.dropout_active else 0.0)}


def plan_sites(ep, mod, opts: dict, sel, inputs: Inputs):
    """Per-site options for the selected sites ({id: options}) and the kept ones ({id: reason}).

    A variant with `prepare` sees each site's captured normal form on every input set and
    returns the site's options (rewrite-time state filled in) or why the site stays exact.
    """
    site_opts = {k: v for k, v in opts.items() if k != "auto"}
    prepare = getattr(mod, "prepare", None)
    if prepare is None:
        return (lambda s: dict(site_opts) if selected(s, sel) else None), {}
    sites, runs = checks.capture(ep, VARIANTS["exact"], lambda s: {} if selected(s, sel) else None, inputs)
    planned, kept = {}, {}
    for site in sites:
        if site.id not in runs:
            continue
        r = prepare(site, [_sample(site, run) for run in runs[site.id]], dict(site_opts))
        if isinstance(r, str):
            kept[site.id] = r
        else:
            planned[site.id] = r
    return planned, kept


def auto_tune(ep, mod, planned: dict, inputs: Inputs, tolerance: float, sites) -> dict:
    """Cheapest per-site parameters that keep the end-to-end rel_err within `tolerance`.

    Each site alone: the first rung of its ladder whose error (that site rewritten, the rest
    exact) is within tolerance / #sites. Then all together; while over the tolerance, the site
    with the largest solo error moves one rung up.
    """
    by_id = {s.id: s for s in sites}
    ref = [checks.outputs_of(ep, a, kw) for a, kw in inputs]

    def error(choice: dict) -> float:
        new_ep, _ = rewrite_program(ep, mod, lambda s: choice.get(s.id))
        errs = []
        for (a, kw), r in zip(inputs, ref):
            errs += [checks.compare(x, y)["rel_err"] for (_, x), (_, y) in zip(r, checks.outputs_of(new_ep, a, kw))]
        e = max(errs, default=0.0)
        return math.inf if math.isnan(e) else e

    ladders, rung, solo = {}, {}, {}
    budget = tolerance / max(len(planned), 1)
    for sid, opts in planned.items():
        ladders[sid] = [{**opts, **step} for step in mod.auto_ladder(by_id[sid], opts)] or [opts]
        rung[sid] = len(ladders[sid]) - 1
        for i, cand in enumerate(ladders[sid]):
            e = error({sid: cand})
            solo[sid] = e
            if e <= budget:
                rung[sid] = i
                break
    while True:
        choice = {sid: ladders[sid][rung[sid]] for sid in planned}
        if error(choice) <= tolerance:
            return choice
        movable = [sid for sid in planned if rung[sid] < len(ladders[sid]) - 1]
        if not movable:
            return choice
        sid = max(movable, key=lambda i: solo[i])
        rung[sid] += 1
        solo[sid] = error({sid: ladders[sid][rung[sid]]})


def rewrite_loaded(ep, inputs: Inputs, inputs_kind: str, variant: str, options: dict, *, sites=None,
                   check=True, tolerance=None, timings=None, model="", fmt="pt2") -> Result:
    timings = dict(timings or {})
    opts = validate_options(variant, options, tolerance)
    sel = parse_selection(sites)
    mod = variant_module(variant)
    t = time.perf_counter()
    found, _ = fx_detect.find_sites(ep.graph, params_of(ep), constants_of(ep))
    timings["detect_s"] = time.perf_counter() - t
    if not found:
        raise InputError("no attention found (run with --list --verbose to see why each softmax was not matched)")
    t = time.perf_counter()
    planned, kept = plan_sites(ep, mod, opts, sel, inputs)
    if callable(planned):
        choose = planned
    else:
        if opts.get("auto"):
            planned = auto_tune(ep, mod, planned, inputs, tolerance, found)
        choose = (lambda s: planned.get(s.id))
    new_ep, new_sites = rewrite_program(ep, mod, choose)
    timings["rewrite_s"] = time.perf_counter() - t
    for s in new_sites:
        if s.id in kept:
            s.status = "kept"
            s.add_reason(kept[s.id])
        elif s.status != "rewritten":
            s.status = "unselected"
    check_block = None
    if check:
        t = time.perf_counter()
        checked = {s.id: s for s in checks.check_sites(ep, mod, choose, inputs)}
        for s in new_sites:
            c = checked.get(s.id)
            if c is not None:
                s.causal = c.causal
                if c.reason and c.reason not in s.reason:
                    s.add_reason(c.reason)
                if s.status == "rewritten":
                    s.check = c.check
        tol = tolerance if tolerance is not None else checks.default_tolerance(mod.NAME, new_sites)
        check_block = checks.check_end_to_end(ep, new_ep, inputs, tol)
        timings["check_s"] = time.perf_counter() - t
    report = build_report(model=model, fmt=fmt, variant=variant, options=opts, inputs_kind=inputs_kind,
                          sites=new_sites, check=check_block, timings=timings)
    return Result(program=new_ep, sites=new_sites, report=report)
