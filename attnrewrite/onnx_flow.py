"""ONNX in, ONNX out: load, synthesise inputs, detect, rewrite, check in onnxruntime, save.

    model = load_model("model.onnx")                # external data read from beside it
    sites = detect(model)                            # [AttentionSite], source onnx-*
    result = rewrite(model, "exact")                 # .program (ModelProto), .sites, .report
    save_model(result.program, Path("out.onnx"))     # weights to out.onnx.data when large

The check runs the original and the rewritten model in onnxruntime (CPU) on the same
inputs. Per site, a copy of the original gets the site's normal-form q/k/v/mask and its
output as extra graph outputs; the variant's PyTorch reference runs on those captured
tensors and is compared with the captured output. End to end, every floating output of
the two models is compared (check.compare: rel_err, max_abs_err, cosine).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .loading import InputError
from .passes import onnx_detect, onnx_rewrite
from .report import build_report

EXTERNAL_MIN_BYTES = 1 << 20      # write weights to <out>.data once they pass 1 MiB
SMALL_TENSOR = 1024               # tensors below this stay inside the model file


def is_onnx(obj) -> bool:
    if isinstance(obj, onnx.ModelProto):
        return True
    return isinstance(obj, (str, os.PathLike)) and str(obj).lower().endswith(".onnx")


# ---------------------------------------------------------------- load / save

def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"model not found: {path}")
    try:
        return onnx.load(str(p), load_external_data=True)
    except Exception as e:  # noqa: BLE001 - a broken file or missing external data
        raise InputError(f"cannot load {p.name} as ONNX: {str(e).splitlines()[0]}") from e


def external_files(model_path: Path, model: onnx.ModelProto | None = None) -> set[Path]:
    """The external data files a model file refers to (resolved)."""
    m = model if model is not None else onnx.load(str(model_path), load_external_data=False)
    out = set()
    for t in m.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location":
                    out.add((model_path.parent / e.value).resolve())
    return out


def save_model(model: onnx.ModelProto, out: Path, *, external: bool | None = None) -> list[Path]:
    """Write `model` to `out` atomically; large weights go to `<out>.data` beside it.

    Returns the files written. `external=None` decides by size (EXTERNAL_MIN_BYTES).
    """
    from .cli import atomic_write

    m = onnx.ModelProto()
    m.CopyFrom(model)
    big = [t for t in m.graph.initializer if _nbytes(t) >= SMALL_TENSOR]
    if external is None:
        external = sum(_nbytes(t) for t in big) >= EXTERNAL_MIN_BYTES
    written = []
    if external and big:
        data_path = out.with_name(out.name + ".data")
        blob = bytearray()
        for t in big:
            raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
            blob += b"\0" * (-len(blob) % 64)             # 64-byte aligned, as onnx does
            offset = len(blob)
            blob += raw
            for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                      "string_data"):
                t.ClearField(f)
            del t.external_data[:]
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(len(raw)))):
                t.external_data.add(key=key, value=value)
            t.data_location = TensorProto.EXTERNAL
        atomic_write(data_path, lambda tmp: Path(tmp).write_bytes(bytes(blob)))
        written.append(data_path)
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(m.SerializeToString()))
    return [out, *written]


def _nbytes(t: TensorProto) -> int:
    if t.HasField("raw_data"):
        return len(t.raw_data)
    n = int(np.prod(t.dims)) if t.dims else 1
    return n * max(1, np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
                   if t.data_type != TensorProto.STRING else 1)


# ---------------------------------------------------------------- inputs

def graph_inputs(model: onnx.ModelProto) -> list:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def read_npz(path: str, model: onnx.ModelProto) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"inputs file not found: {path}")
    if p.suffix.lower() != ".npz":
        raise InputError("ONNX inputs must be a .npz keyed by graph input names")
    try:
        with np.load(p, allow_pickle=False) as z:
            feeds = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read inputs {path}: {str(e).splitlines()[0]}") from e
    names = [i.name for i in graph_inputs(model)]
    missing = [n for n in names if n not in feeds]
    extra = [k for k in feeds if k not in names]
    if missing or extra:
        raise InputError(f"inputs {path}: missing {missing or 'none'}, unknown {extra or 'none'} "
                         f"(graph inputs: {', '.join(names)})")
    return [feeds]


def _id_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Per integer graph input, the smallest embedding table its ids index (Gather)."""
    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    bounds = {}
    for inp in graph_inputs(model):
        frontier, seen = [inp.name], set()
        while frontier and len(seen) < 200:
            v = frontier.pop()
            for n in users.get(v, []):
                if n.op_type == "Gather" and n.input[1] == v and n.input[0] in inits \
                        and len(inits[n.input[0]].dims) == 2:
                    bounds[inp.name] = min(bounds.get(inp.name, 1 << 62), int(inits[n.input[0]].dims[0]))
                elif n.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity",
                                   "Expand") and n.input[0] == v and n.name not in seen:
                    seen.add(n.name)
                    frontier.append(n.output[0])
    return bounds


def synthesise_inputs(model: onnx.ModelProto, seed: int = 0) -> list[dict]:
    """One input set from the graph's input types: ids below the embedding size, masks of ones.

    Symbolic dims get 2 on the first axis and 8 elsewhere, one value per symbol.
    """
    rng = np.random.default_rng(seed)
    bounds = _id_bounds(model)
    sym: dict[str, int] = {}
    feeds = {}
    for inp in graph_inputs(model):
        t = inp.type.tensor_type
        shape = []
        for i, d in enumerate(t.shape.dim):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            else:
                shape.append(sym.setdefault(d.dim_param or f"?{inp.name}{i}", 2 if i == 0 else 8))
        dt = helper.tensor_dtype_to_np_dtype(t.elem_type)
        name = inp.name.lower()
        if dt == np.bool_:
            x = np.ones(shape, dt)
        elif "mask" in name:
            x = np.ones(shape, dt)
        elif "token_type" in name:
            x = np.zeros(shape, dt)
        elif np.issubdtype(dt, np.floating):
            x = rng.standard_normal(shape).astype(dt)
        else:
            x = rng.integers(0, bounds.get(inp.name, 2), size=shape).astype(dt)
        feeds[inp.name] = x
    return [feeds]


# ---------------------------------------------------------------- onnxruntime

def session(model: onnx.ModelProto):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 4
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - the user's model does not run
        raise InputError(f"onnxruntime cannot load the model: {str(e).splitlines()[0]}") from e


def run(sess, feeds: dict) -> dict:
    try:
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds)))
    except Exception as e:  # noqa: BLE001
        raise InputError(f"onnxruntime failed on the inputs (pass --inputs?): {str(e).splitlines()[0]}") from e


# ---------------------------------------------------------------- detect / check

def _torch(x):
    import torch
    return None if x is None else torch.from_numpy(np.ascontiguousarray(x))


def capture(model, sites, input_sets, inferred=None) -> dict[int, list[dict]]:
    """Per site, per input set: the captured normal form {q, k, v, mask, out} (torch tensors).

    Also sets each site's `causal` when its captured mask removes every key above the
    diagonal (decomposed graphs materialise causal masks).
    """
    from .check import is_causal_mask

    if not sites:
        return {}
    probe, probes = onnx_rewrite.probe_model(model, sites, inferred)
    sess = session(probe)
    by_id = {s.id: s for s in sites}
    out: dict[int, list[dict]] = {sid: [] for sid in probes}
    for feeds in input_sets:
        res = run(sess, feeds)
        for sid, names in probes.items():
            got = {k: _torch(res[n]) if n else None for k, n in names.items()}
            out[sid].append(got)
            by_id[sid].causal = bool(by_id[sid].causal or is_causal_mask(got["mask"]))
    return out


def samples_of(site, runs: list[dict]) -> list[dict]:
    """The captured normal form as variants' `prepare` expects it."""
    return [{"q": r["q"], "k": r["k"], "v": r["v"], "mask": r["mask"], "scale": float(site.scale),
             "softcap": float(site.softcap or 0.0), "causal": bool(site.graph.causal), "dropout_p": 0.0}
            for r in runs]


def check_sites(sites, variant, choose, captured: dict) -> None:
    """Fill each rewritten site's `check`: the variant's reference on the captured tensors."""
    from .check import compare, worst

    for site in sites:
        runs = captured.get(site.id)
        if site.status != "rewritten" or not runs or site.scale is None:
            continue
        opts = choose(site) or {}
        op_args = variant.op_args(site, opts) if hasattr(variant, "op_args") else ()
        stats = []
        for r in runs:
            ref = variant.reference(r["q"], r["k"], r["v"], r["mask"], float(site.scale),
                                    float(site.softcap or 0.0), bool(site.graph.causal), 0.0, *op_args)
            stats.append(compare(r["out"], ref))
        r = runs[0]
        diag = {}
        if hasattr(variant, "diagnostics"):
            diag = variant.diagnostics(r["q"], r["k"], r["v"], r["mask"], float(site.scale),
                                       float(site.softcap or 0.0), bool(site.graph.causal), opts)
        site.check = {**worst(stats), "diagnostics": diag}


def float_outputs(model) -> list[str]:
    return [o.name for o in model.graph.output
            if o.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16,
                                                TensorProto.DOUBLE)]


def check_end_to_end(orig, new, input_sets, tolerance) -> dict:
    from .check import compare, worst

    a, b = session(orig), session(new)
    by_name: dict[str, list] = {}
    names = float_outputs(orig)
    for feeds in input_sets:
        ra, rb = run(a, feeds), run(b, feeds)
        for n in names:
            by_name.setdefault(n, []).append(compare(_torch(ra[n]), _torch(rb[n])))
    outs = [{"name": n, **worst(s)} for n, s in by_name.items()]
    rel = max((o["rel_err"] for o in outs), default=0.0)
    passed = None if tolerance is None else bool(rel <= tolerance) and not math.isnan(rel)
    return {"outputs": outs, "rel_err": rel, "tolerance": tolerance, "passed": passed}


def as_model(obj) -> onnx.ModelProto:
    return obj if isinstance(obj, onnx.ModelProto) else load_model(obj)


def inputs_for(model, inputs) -> tuple[list, str]:
    if inputs is None:
        return synthesise_inputs(model), "synthesised"
    if isinstance(inputs, (str, os.PathLike)):
        return read_npz(str(inputs), model), "given"
    if isinstance(inputs, dict):
        return [{k: np.asarray(v) for k, v in inputs.items()}], "given"
    return [{k: np.asarray(v) for k, v in d.items()} for d in inputs], "given"


def detect(obj, example_inputs=None, *, fill_causal: bool = True, unmatched: list | None = None):
    """Every attention site in an ONNX model (ModelProto or path)."""
    model = as_model(obj)
    inferred = onnx_detect.infer(model)
    sites, um, _ = onnx_detect.find_sites(model, inferred)
    if unmatched is not None:
        unmatched.extend(um)
    if sites and fill_causal:
        capture(model, sites, inputs_for(model, example_inputs)[0], inferred)
    return sites


def rewrite(obj, variant: str = "exact", example_inputs=None, check: bool = True, sites=None,
            tolerance: float | None = None, *, model_name: str = "", timings=None, **options):
    """Rewrite the selected sites of an ONNX model into `variant` (see api.rewrite)."""
    from . import api
    from .check import default_tolerance

    timings = dict(timings or {})
    t = time.perf_counter()
    model = as_model(obj)
    timings.setdefault("load_s", time.perf_counter() - t)
    opts = api.validate_options(variant, options, tolerance)
    if opts.get("auto"):
        raise InputError("--set auto=true is not supported for ONNX models yet")
    mod = api.variant_module(variant)
    sel = api.parse_selection(sites)
    t = time.perf_counter()
    inferred = onnx_detect.infer(model)
    found, _, _ = onnx_detect.find_sites(model, inferred)
    timings["detect_s"] = time.perf_counter() - t
    if not found:
        raise InputError("no attention found (run with --list --verbose to see why each softmax was not matched)")
    feeds, kind = inputs_for(model, example_inputs)
    t = time.perf_counter()
    captured = capture(model, found, feeds, inferred)
    per_site = {}
    for s in found:
        if not api.selected(s, sel):
            continue
        o = dict(opts)
        prepare = getattr(mod, "prepare", None)
        if prepare is not None and not s.graph.keep and s.id in captured and s.scale is not None:
            o = prepare(s, samples_of(s, captured[s.id]), o)
            if isinstance(o, str):                       # the variant keeps this site exact
                s.status = "kept"
                s.add_reason(o)
                continue
        per_site[s.id] = o
    choose = (lambda s: per_site.get(s.id) if s.status != "kept" else {})
    new = onnx_rewrite.rewrite_model(model, found, mod, choose, inferred)
    timings["rewrite_s"] = time.perf_counter() - t
    for s in found:
        if s.id not in per_site and s.status != "kept":
            s.status = "unselected"
    try:
        onnx.checker.check_model(new, full_check=True)
    except Exception as e:  # noqa: BLE001 - a bug in a lowering, reported as such
        raise RuntimeError(f"rewritten model fails onnx.checker: {str(e).splitlines()[0]}") from e
    check_block = None
    if check:
        t = time.perf_counter()
        check_sites(found, mod, choose, captured)
        tol = tolerance if tolerance is not None else default_tolerance(variant, found)
        check_block = check_end_to_end(model, new, feeds, tol)
        timings["check_s"] = time.perf_counter() - t
    report = build_report(model=model_name or _model_name(obj), fmt="onnx", variant=variant, options=opts,
                          inputs_kind=kind, sites=found, check=check_block, timings=timings)
    return api.Result(program=new, sites=found, report=report)


def _model_name(obj) -> str:
    return str(obj) if not isinstance(obj, onnx.ModelProto) else (obj.graph.name or "onnx model")


# ---------------------------------------------------------------- CLI

def default_output(model: str, variant: str) -> Path:
    p = Path(model)
    return p.with_name(f"{p.stem}.{variant}.onnx")


def run_cli(args, out, err, options: dict) -> int:
    """`attnrewrite MODEL.onnx ...` (cli.run hands over once it sees a .onnx MODEL)."""
    from . import api
    from .cli import UsageError, finish_listing, finish_rewrite

    variant = args.variant.replace("-", "_") if args.variant else None
    listing = args.list or variant is None
    if listing and (options or args.output):
        raise UsageError("--set and -o need --variant")
    if variant:
        api.validate_options(variant, options, args.tolerance)
    src = Path(args.model)
    output = Path(args.output) if args.output else (None if listing else default_output(args.model, variant))
    if output is not None:
        if not src.exists():
            raise InputError(f"model not found: {args.model}")
        protected = {src.resolve(), *external_files(src)}
        if output.resolve() in protected or output.with_name(output.name + ".data").resolve() in protected:
            raise InputError(f"{output} would overwrite the input model or its weights: choose another -o")
        if output.exists() and not args.overwrite:
            raise InputError(f"{output} exists (pass --overwrite to replace it)")
    t0 = time.perf_counter()
    with err.status("loading the ONNX model…"):
        model = load_model(args.model)
    timings = {"load_s": time.perf_counter() - t0}
    inputs = args.inputs
    if listing:
        t = time.perf_counter()
        unmatched: list = []
        sites = detect(model, inputs, unmatched=unmatched)
        timings["detect_s"] = time.perf_counter() - t
        kind = "given" if inputs else "synthesised"
        report = build_report(model=args.model, fmt="onnx", variant=None, options={}, inputs_kind=kind,
                              sites=sites, timings=timings)
        return finish_listing(report, unmatched, args, out, err)
    with err.status(f"rewriting into {variant} and checking…"):
        result = rewrite(model, variant, inputs, check=not args.no_check, sites=args.sites,
                         tolerance=args.tolerance, model_name=args.model, timings=timings, **options)
    return finish_rewrite(result.report, output, lambda path: save_model(result.program, path), args, out, err)
