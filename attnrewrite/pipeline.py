"""load → detect → plan → rewrite → check → report, written once for every front end.

    fe = open_model("model.pt2")                  # or .onnx, a factory, an nn.Module, a GraphModule
    result = rewrite(fe, "sparse", {"mode": "window"}, tolerance=0.02)
    fe.save(result.program, path)

Detection runs once per call; the sites found are carried through planning, rewriting
and checking. This module is the only place a site's `status` is set:

    unselected   --sites did not select it
    kept         the front end or the variant cannot represent it (reason given)
    rewritten    replaced by the variant's op (options recorded)
    detected     found, nothing asked (listing)
"""
from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import math
import time
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .calibrate import fit_out_map
from .cost import site_cost
from .check import default_tolerance, end_to_end, is_causal_mask, site_check, time_site, total_time
from .frontends.base import FrontEnd
from .frontends.dynamo import DynamoFrontEnd
from .frontends.export import ExportFrontEnd, normalise_inputs
from .frontends.onnx import OnnxFrontEnd, is_onnx
from . import kernels
from .io import InputError
from .report import build_report
from .site import AttentionSite
from . import variants
from .variants import impl
from .variants.base import Param, parse_params

# How an error names what the user can change: the command's flags, or — inside `python_words()`, which
# api.rewrite and the compile backend open — the Python keywords they take.
CLI_WORDS = {"auto": "--set auto=true", "tolerance": "--tolerance T", "value": "a --set value",
             "inputs": "pass --inputs", "why": "run with --list --verbose to see why each softmax was not matched"}
PYTHON_WORDS = {"auto": "auto=True", "tolerance": "tolerance=T", "value": "an option value",
                "inputs": "pass example_inputs",
                "why": "attnrewrite.pipeline.detect(attnrewrite.pipeline.open_model(obj, example_inputs)) also returns "
                       "why each softmax was not matched"}
_words: contextvars.ContextVar = contextvars.ContextVar("attnrewrite_words", default=CLI_WORDS)


@contextlib.contextmanager
def python_words():
    """Within, errors name options as a Python caller passes them (`auto=True`, `tolerance=T`), not as flags."""
    token = _words.set(PYTHON_WORDS)
    try:
        yield
    finally:
        _words.reset(token)


def words() -> dict:
    """The words errors use for options right now (CLI_WORDS unless inside python_words())."""
    return _words.get()


@dataclass
class Result:
    program: object                  # ExportedProgram | onnx.ModelProto | GraphModule
    sites: list[AttentionSite]
    report: dict


# ---------------------------------------------------------------- front ends

def open_model(model, inputs=None, *, trust: bool = False) -> FrontEnd:
    """The front end for `model`: a path (.pt2/.pt/.onnx), `pkg.module:factory`, None (the
    built-in demo), an ExportedProgram, an nn.Module (needs inputs), an onnx.ModelProto, or a
    torch.compile GraphModule (inputs: its example inputs)."""
    if is_onnx(model):
        return OnnxFrontEnd.open(model, inputs)
    if isinstance(model, torch.fx.GraphModule):
        if inputs is None:
            raise InputError("a GraphModule needs its example inputs")
        return DynamoFrontEnd(model, list(inputs))
    if isinstance(model, (torch.export.ExportedProgram, torch.nn.Module)) or model is None \
            or isinstance(model, str) or hasattr(model, "__fspath__"):
        return ExportFrontEnd.open(model if not hasattr(model, "__fspath__") else str(model),
                                   normalise_inputs(inputs) if inputs is not None else None, trust=trust)
    raise InputError(f"cannot find attention in a {type(model).__name__}")


# ---------------------------------------------------------------- options and selection

def variant_module(variant):
    """The Variant object `variant` names (or is); InputError for an unknown name."""
    try:
        return variants.resolve(variant)
    except ValueError as e:
        raise InputError(str(e)) from None


def validate_options(variant, options: dict, tolerance: float | None = None) -> dict:
    """The variant's defaults overlaid with `options`, each checked; InputError on a bad one.

    `auto=true` (variants with an auto ladder) needs a tolerance: it picks per-site parameters.
    """
    mod = variant_module(variant)
    params = dict(mod.params)
    if mod.auto_ladder is not None:
        params["auto"] = Param(False, bool, "pick the cheapest per-site parameters within --tolerance")
    try:
        opts = parse_params(mod.name, params, options)
    except (ValueError, TypeError, OverflowError) as e:      # OverflowError: int(inf)
        raise InputError(str(e) or f"{words()['value']} for {mod.name} is out of range") from None
    for key, value in opts.items():                # what reaches an op must fit its type (int64, finite)
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, float) and not math.isfinite(v):
                raise InputError(f"{key}={v} is not a finite number")
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 1 << 63:
                raise InputError(f"{key}={v:.3g} does not fit a 64-bit integer")
    conflict = mod.inapplicable(options, opts) if mod.inapplicable is not None else None
    if conflict:                                   # an option the chosen mode would silently ignore
        raise InputError(conflict)
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance)
                                      and tolerance >= 0):
        raise InputError(f"tolerance {tolerance} must be a finite number ≥ 0")
    if opts.get("auto") and tolerance is None:
        raise InputError(f"{words()['auto']} needs {words()['tolerance']} (the end-to-end rel_err to stay within)")
    return opts


def parse_selection(sel) -> list[str] | None:
    if sel is None:
        return None
    if isinstance(sel, str):
        sel = [s for s in sel.split(",") if s.strip()]
    return [str(s).strip() for s in sel]


def selected(site: AttentionSite, sel: list[str] | None) -> bool:
    """Whether `--sites` picks the site: an id, a range `a-b`, a name or a glob over names."""
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


# ---------------------------------------------------------------- detect

def fill_causal(sites, captured: dict) -> None:
    """Mark sites whose captured mask removes every key above the diagonal (materialised causal masks)."""
    for s in sites:
        runs = captured.get(s.id)
        if runs:
            s.causal = bool(s.causal or is_causal_mask(runs[0].get("mask")))


def _detect(fe: FrontEnd, timings: dict) -> tuple[list[AttentionSite], list, dict]:
    """(sites, unmatched, captured): causal filled in from the inputs when the model runs on them."""
    t = time.perf_counter()
    sites, unmatched = fe.find_sites()
    timings["detect_s"] = time.perf_counter() - t
    captured = {}
    if sites and fe.inputs:
        try:
            captured = fe.capture(sites, fe.inputs)
        except InputError:                   # the model does not run on these inputs: list what the graph says
            pass
    fill_causal(sites, captured)
    return sites, unmatched, captured


def detect(fe: FrontEnd, *, timings: dict | None = None) -> tuple[list[AttentionSite], list]:
    """(sites, unmatched): every site, causal filled in from the inputs when there are any."""
    sites, unmatched, _ = _detect(fe, timings if timings is not None else {})
    return sites, unmatched


def listing(fe: FrontEnd, *, timings: dict | None = None) -> tuple[dict, list]:
    """(report, unmatched) for `--list`."""
    timings = dict(timings or {})
    sites, unmatched, captured = _detect(fe, timings)
    report = build_report(model=fe.name, fmt=fe.fmt, variant=None, options={}, inputs_kind=fe.inputs_kind,
                          sites=sites, timings=timings, cost=costs(sites, variants.BASELINE, {}, captured))
    return report, unmatched


SIZE_FIELDS = ("batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim")


def symbolic_sizes(sites, captured: dict) -> dict:
    """Values for the symbolic sizes the sites report ("s0" → 24), read from the shapes each
    site saw on the first captured input set; a site without a capture stays unpriced."""
    out = {}
    for s in sites:
        runs = captured.get(s.id)
        if not runs:
            continue
        q, k = runs[0]["q"], runs[0]["k"]
        values = (q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3])
        for field, value in zip(SIZE_FIELDS, values):
            if isinstance(getattr(s, field), str):
                out[getattr(s, field)] = int(value)
    return out


def costs(sites, variant, planned: dict, captured: dict) -> dict:
    """The report's cost block: per site before (variants.BASELINE: the original graph's attention)
    and after (the variant, where rewritten)."""
    sizes = symbolic_sizes(sites, captured)
    per_site, totals = {}, {"before": [], "after": []}
    for s in sites:
        before = site_cost(s, variants.BASELINE, {}, sizes)
        after = site_cost(s, variant, planned[s.id], sizes) if s.id in planned and s.status == "rewritten" \
            else before
        if before is None or after is None:
            continue
        per_site[s.id] = {"before": _brief_cost(before), "after": _brief_cost(after)}
        totals["before"].append(per_site[s.id]["before"])
        totals["after"].append(per_site[s.id]["after"])
    total = {k: {key: (max if key == "peak_extra_bytes" else sum)(c[key] for c in v) if v else 0
                 for key in COST_KEYS} for k, v in totals.items()}
    return {"sites": per_site, "total": total}


COST_KEYS = ("flops", "bytes", "peak_extra_bytes", "depth")


def _brief_cost(c: dict) -> dict:
    return {k: c[k] for k in COST_KEYS}


# ---------------------------------------------------------------- plan

def samples(fe: FrontEnd, site: AttentionSite, runs: list[dict]) -> list[dict]:
    """The captured normal form as a variant's `prepare` reads it."""
    sc = fe.scalars(site)
    return [{"q": r["q"], "k": r["k"], "v": r["v"], "mask": r["mask"], **sc} for r in runs]


def needs_samples(mod, site: AttentionSite, options: dict) -> bool:
    """Whether planning `site` under `mod` reads its captured values: a variant with `prepare`
    does for a masked site (only the values tell a materialised causal mask: fill_causal) and
    wherever its `needs_samples(site, options)` does not say the site record is enough."""
    if mod.prepare is None:
        return False
    hook = mod.needs_samples
    return hook is None or site.mask != "none" or bool(hook(site, options))


def plan(fe: FrontEnd, sites, mod, opts: dict, sel, captured: dict) -> tuple[dict, dict, set]:
    """({id: options} to rewrite, {id: reason} kept, {ids} unselected).

    A variant with `prepare` sees each site's captured normal form on every input set and
    returns the site's options (rewrite-time state filled in) or why the site stays as it is;
    a site its `needs_samples(site, options)` says needs no values is prepared on none.
    A variant with `share_budget(planned, {id: (site, samples)})` then adjusts the planned
    options of all sites at once (sparse: one density target spread over every head).
    """
    site_opts = {k: v for k, v in opts.items() if k != "auto"}
    prepare = mod.prepare
    planned, kept, unselected = {}, {}, set()
    for site in sites:
        if not selected(site, sel):
            unselected.add(site.id)
            continue
        reason = fe.keep_reason(site)
        if reason:
            kept[site.id] = reason
            continue
        if prepare is None:
            planned[site.id] = dict(site_opts)
            continue
        if site.id not in captured and needs_samples(mod, site, site_opts):
            kept[site.id] = f"{mod.name} needs the site's values on example inputs, and there are none"
            continue
        r = prepare(site, samples(fe, site, captured.get(site.id, [])), dict(site_opts))
        if isinstance(r, str):
            kept[site.id] = r
        else:
            planned[site.id] = r
    share = mod.share_budget        # a budget spread over every planned site at once
    if share is not None and planned:
        by_id = {s.id: s for s in sites}
        planned = share(planned, {sid: (by_id[sid], samples(fe, by_id[sid], captured[sid]))
                                  for sid in planned if captured.get(sid)})
    return planned, kept, unselected


def output_pairs(fe: FrontEnd, program, inputs: list, reference: list, progress=None) -> list:
    """(name, original, rewritten) for every floating output on every input set; `reference`
    holds the original's outputs per input set (computed once by the caller)."""
    pairs = []
    for i, (input_set, ref) in enumerate(zip(inputs, reference)):
        if progress is not None:
            progress("checking end to end", i + 1, len(inputs))
        pairs += [(n, a, b) for (n, a), (_, b) in zip(ref, fe.outputs(program, input_set))]
    return pairs


def model_error(fe: FrontEnd, program, inputs: list, reference: list) -> float:
    """The largest end-to-end rel_err of `program` against the original's outputs."""
    e = end_to_end(output_pairs(fe, program, inputs, reference), None)["rel_err"]
    return math.inf if math.isnan(e) else e


def _quiet_progress(stage: str, done: int, total: int | None) -> None:
    """The default progress hook: says nothing. (The CLI passes one that draws a bar.)"""


def auto_tune(fe: FrontEnd, sites, mod, planned: dict, tolerance: float, inputs: list, reference: list,
              progress=_quiet_progress) -> dict:
    """Cheapest per-site parameters that keep the end-to-end rel_err within `tolerance`.

    Each site alone: the first rung of its ladder whose error (that site rewritten, the rest
    as they are) is within tolerance / #sites. Then all together; while over the tolerance,
    the site with the largest solo error moves one rung up. `reference`: the original's
    outputs per input set.
    """
    if not inputs:
        raise InputError(f"{words()['auto']} needs inputs to measure the error on")
    by_id = {s.id: s for s in sites}

    trials = [0]

    def error(choice: dict) -> float:
        trials[0] += 1
        progress("auto-tuning (trial rewrites)", trials[0], None)
        return model_error(fe, fe.rewrite(sites, mod, choice)[0], inputs, reference)

    ladders, rung, solo = {}, {}, {}
    budget = tolerance / max(len(planned), 1)
    ladder_of = mod.auto_ladder or (lambda site, opts: [])
    for sid, opts in planned.items():
        ladders[sid] = [{**opts, **step} for step in ladder_of(by_id[sid], opts)] or [opts]
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


# ---------------------------------------------------------------- rewrite + check

def rewrite(fe: FrontEnd, variant, options: dict | None = None, *, sites=None, check: bool = True,
            tolerance: float | None = None, timings: dict | None = None, require_sites: bool = True,
            calibrate: int = 0, progress=_quiet_progress) -> Result:
    """Rewrite the selected sites of `fe`'s program into `variant`; check the numbers unless check=False.

    `calibrate=N`: fit each rewritten site's per-head output map on N calibration input sets
    (kept apart from the inputs the check evaluates on; see calibrate.py).
    `progress(stage, done, total)` is called as long steps advance (total None: open-ended).
    """
    timings = dict(timings or {})
    mod = variant_module(variant)
    opts = validate_options(mod, dict(options or {}), tolerance)
    sel = parse_selection(sites)
    t = time.perf_counter()
    found, _ = fe.find_sites()
    timings["detect_s"] = time.perf_counter() - t
    if not found and require_sites:
        unsearched = getattr(fe, "unsearched", None)
        raise InputError(f"no attention found ({words()['why']})" + (f"; {unsearched}" if unsearched else ""))
    t = time.perf_counter()
    # calibration sets are set apart first: everything below (prepare, auto-tune, checks) sees only the rest
    inputs, calibration_sets = fe.inputs, None
    if calibrate and found:
        calibration, inputs, source = fe.calibration_inputs(calibrate)
        calibration_sets = (calibration, source)
    # the model runs on the inputs (capture) only for what reads values: the check, auto-tuning, and
    # the sites whose planning needs them — with check off, a plan the site records settle costs no run
    site_opts = {k: v for k, v in opts.items() if k != "auto"}
    needs_values = check or bool(opts.get("auto")) or any(
        needs_samples(mod, s, site_opts) for s in found if selected(s, sel))
    if found and needs_values and not inputs:
        raise InputError(fe.inputs_problem or f"no inputs to run the model on ({words()['inputs']})")
    progress("capturing each site's inputs", 0, 1)
    captured = fe.capture(found, inputs) if found and inputs and needs_values else {}
    progress("capturing each site's inputs", 1, 1)
    fill_causal(found, captured)
    planned, kept, unselected = plan(fe, found, mod, opts, sel, captured)
    reference = [fe.outputs(None, input_set) for input_set in inputs] if (check or opts.get("auto")) and found else []
    if opts.get("auto") and planned:
        planned = auto_tune(fe, found, mod, planned, tolerance, inputs, reference, progress)
    calibration = None
    if calibration_sets and planned:
        calibration = _calibrate(fe, found, mod, planned, calibration_sets, progress)
    program, not_lowered, folded = fe.rewrite(found, mod, planned) if planned else (fe.program, {}, {})
    timings["rewrite_s"] = time.perf_counter() - t
    kept.update(not_lowered)
    if calibration:
        for sid, weight in folded.items():
            calibration["sites"][sid]["folded_into"] = weight
    set_statuses(found, unselected, kept, planned)
    check_block, speed, kernel_calls = None, None, {}
    if check and found:
        t = time.perf_counter()
        check_sites(fe, found, mod, planned, captured, calibration, progress)
        tol = tolerance if tolerance is not None else default_tolerance(mod, found)
        with impl.counting() as impl_calls, kernels.counting() as kernel_calls:   # what served this rewrite's calls
            pairs = output_pairs(fe, program, inputs, reference, progress)
        check_block = end_to_end(pairs, tol)
        check_block["impl_calls"] = impl_calls
        timings["check_s"] = time.perf_counter() - t
        speed = {}
        for i, s in enumerate(found):            # (not timed when the ops run in the Triton interpreter)
            if s.status == "rewritten" and captured.get(s.id) and not kernels.interpreting():
                progress("timing each site's attention", i + 1, len(found))
                speed[s.id] = time_site(mod, fe.scalars(s), mod.op_args(s, s.options), captured[s.id][0])
    report = build_report(model=fe.name, fmt=fe.fmt, variant=mod.name, options=opts, inputs_kind=fe.inputs_kind,
                          sites=found, check=check_block, timings=timings,
                          cost=costs(found, mod, planned, captured), kernels=site_kernels(fe, found, mod, captured, kernel_calls))
    if speed:
        for site in report["sites"]:
            if site["id"] in speed:
                site["time"] = speed[site["id"]]
        report["time"] = total_time(speed)
    if calibration:
        report["calibration"] = {"sets": calibrate, "inputs": calibration["source"]}
    return Result(program=program, sites=found, report=report)


def set_statuses(found, unselected, kept: dict, planned: dict) -> None:
    """The one place statuses are set: unselected, kept (with the reason) or rewritten (with the
    options it was rewritten with)."""
    for s in found:
        if s.id in unselected:
            s.status = "unselected"
        elif s.id in kept:
            s.status = "kept"
            s.add_reason(kept[s.id])
        elif s.id in planned:
            s.status = "rewritten"
            s.options = {k: v for k, v in planned[s.id].items() if k != "out_map"}


def check_sites(fe, found, mod, planned: dict, captured: dict, calibration, progress) -> None:
    """Each rewritten site's own check on its captured values (s.check), with the variant's
    diagnostics (and its calibration, if any); a site with active dropout is left unchecked."""
    for i, s in enumerate(found):
        progress("checking each site", i + 1, len(found))
        if s.status == "rewritten" and captured.get(s.id):
            sc = fe.scalars(s)
            if sc["dropout_p"]:
                s.check = {"unchecked": "dropout active"}
            else:
                s.check = site_check(mod, sc, planned[s.id], mod.op_args(s, s.options), captured[s.id])
                if calibration and s.id in calibration["sites"]:
                    s.check["diagnostics"]["calibration"] = calibration["sites"][s.id]


def declined(report: dict, reason: str) -> dict:
    """`report` for a rewrite its caller did not use (the compile backend fell back to the
    original graph): `declined` says why, and every site it had rewritten reads as kept, since
    none of its ops runs."""
    report["declined"] = reason
    for s in report["sites"]:
        if s["status"] == "rewritten":
            s["status"] = "kept"
            s["reason"] = "; ".join(r for r in (s["reason"], f"the graph was declined: {reason}") if r)
    return report


def site_kernels(fe: FrontEnd, sites, mod, captured: dict, calls: dict) -> dict:
    """{id: {"kernel", "kernel_reason"}} for every rewritten site: the generated kernel its op
    runs with on a GPU (and in the interpreter), specialised on its first captured input set
    (or, without one, on its reported shape), or null and the reason the reference runs;
    `calls` counts the kernel calls this rewrite's check made (kernels.counting)."""
    out = {}
    for s in sites:
        if s.status != "rewritten":
            continue
        sc = fe.scalars(s)
        run = (captured.get(s.id) or [None])[0]
        q, k, v, mask = (run["q"], run["k"], run["v"], run["mask"]) if run else _shape_sample(s)
        if q is None:
            out[s.id] = {"kernel": None, "kernel_reason": "head_dim is not static and no input set was captured"}
            continue
        args = (q, k, v, mask, sc["scale"], sc["softcap"], sc["causal"], sc["dropout_p"], *mod.op_args(s, s.options))
        out[s.id] = {**kernels.describe(mod.kernel, *args[:8], args[8:], calls=calls),
                     **impl.describe(mod.implementations, args)}
        if run is None and any(isinstance(x, str) for x in (s.q_len, s.kv_len)):   # judged at length 2
            out[s.id]["impl_reason"] = "; ".join(r for r in ("sizes are symbolic: the op chooses per call at run "
                                                             "time", out[s.id]["impl_reason"]) if r)
    return out


def _shape_sample(s: AttentionSite):
    """Data-less (fake, CPU) q, k, v and mask standing for a site that was not captured, for the
    implementation table to judge as it judges a real call: the site's static sizes (lengths decide
    some implementations, e.g. FlexAttention's minimum), 2 for a symbolic one."""
    if not isinstance(s.head_dim, int):
        return None, None, None, None
    heads = s.heads if isinstance(s.heads, int) else 1
    lq, lk = (x if isinstance(x, int) else 2 for x in (s.q_len, s.kv_len))
    kv_heads = s.kv_heads if isinstance(s.kv_heads, int) and heads % max(s.kv_heads, 1) == 0 else heads
    dtype = getattr(torch, s.dtype, torch.float32)
    with FakeTensorMode():
        q = torch.empty(1, heads, lq, s.head_dim, dtype=dtype)
        k = torch.empty(1, kv_heads, lk, s.head_dim, dtype=dtype)
        mask = None if s.mask == "none" else torch.empty(1, 1, lq, lk, dtype=torch.bool if s.mask == "boolean" else dtype)
    return q, k, k, mask


def _calibrate(fe: FrontEnd, sites, mod, planned: dict, calibration_sets: tuple, progress) -> dict:
    """Fit every planned site's output map on the calibration input sets; adds "out_map" to its options."""
    sets, source = calibration_sets
    progress("capturing calibration inputs", 0, 1)
    runs = fe.capture(sites, sets)
    stats = {}
    for i, s in enumerate(sites):
        progress("calibrating each site", i + 1, len(sites))
        if s.id not in planned or not runs.get(s.id):
            continue
        out_map, stats[s.id] = fit_out_map(mod, fe.scalars(s), mod.op_args(s, planned[s.id]), runs[s.id])
        if out_map is not None:
            planned[s.id] = {**planned[s.id], "out_map": out_map}
    return {"source": source, "sites": stats}
