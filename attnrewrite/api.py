"""The Python entry points: detect() and rewrite() over any supported object."""
from __future__ import annotations

import fnmatch
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


def validate_options(variant: str, options: dict) -> dict:
    if variant not in VARIANTS:
        raise InputError(f"unknown variant '{variant}' (choose from {', '.join(sorted(VARIANTS))})")
    known = VARIANTS[variant].PARAMS
    out = dict(known)
    for key, value in options.items():
        if key not in known:
            names = ", ".join(sorted(known)) or "none"
            raise InputError(f"unknown option '{key}' for variant {variant} (known: {names})")
        out[key] = value
    return out


def detect(obj, example_inputs=None) -> list[AttentionSite]:
    """Every attention site in `obj` (ExportedProgram, GraphModule, nn.Module + inputs, path)."""
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
    t0 = time.perf_counter()
    prog, inputs = as_program(obj, example_inputs)
    if isinstance(prog, torch.fx.GraphModule):
        raise InputError("rewrite() takes an ExportedProgram, an nn.Module with inputs, or a path")
    inputs, kind = inputs_for(prog, inputs)
    return rewrite_loaded(prog, inputs, kind, variant, options, sites=sites, check=check,
                          tolerance=tolerance, timings={"load_s": time.perf_counter() - t0})


def rewrite_loaded(ep, inputs: Inputs, inputs_kind: str, variant: str, options: dict, *, sites=None,
                   check=True, tolerance=None, timings=None, model="", fmt="pt2") -> Result:
    timings = dict(timings or {})
    opts = validate_options(variant, options)
    sel = parse_selection(sites)
    mod = VARIANTS[variant]
    choose = (lambda s: opts if selected(s, sel) else None)
    t = time.perf_counter()
    found, _ = fx_detect.find_sites(ep.graph, params_of(ep), constants_of(ep))
    timings["detect_s"] = time.perf_counter() - t
    if not found:
        raise InputError("no attention found (run with --list --verbose to see why each softmax was not matched)")
    t = time.perf_counter()
    new_ep, new_sites = rewrite_program(ep, mod, choose)
    timings["rewrite_s"] = time.perf_counter() - t
    for s in new_sites:
        if s.status != "rewritten":
            s.status = "unselected"
    check_block = None
    if check:
        t = time.perf_counter()
        checked = {s.id: s for s in checks.check_sites(ep, mod, choose, inputs)}
        for s in new_sites:
            c = checked.get(s.id)
            if c is not None:
                s.check, s.causal, s.reason = c.check, c.causal, c.reason or s.reason
        tol = tolerance if tolerance is not None else checks.default_tolerance(variant, new_sites)
        check_block = checks.check_end_to_end(ep, new_ep, inputs, tol)
        timings["check_s"] = time.perf_counter() - t
    report = build_report(model=model, fmt=fmt, variant=variant, options=opts, inputs_kind=inputs_kind,
                          sites=new_sites, check=check_block, timings=timings)
    return Result(program=new_ep, sites=new_sites, report=report)
