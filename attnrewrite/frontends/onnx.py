"""The ONNX front end: ModelProto in, ModelProto out, run in onnxruntime.

    fe = OnnxFrontEnd.open("model.onnx")          # large external weights stay on disk
    sites, unmatched = fe.find_sites()              # [AttentionSite], source onnx-*
    runs = fe.capture(sites, fe.inputs)             # per site: normal-form q/k/v/mask and output
    model, kept, folded = fe.rewrite(sites, variant, {site id: options})
    fe.save(model, Path("out.onnx"))                # weights to out.onnx.data when large

Weights stored as external data are never read into this process: `load_model` keeps them
as references (only tensors under INLINE_MAX_BYTES are read, so the detector can see small
constants), onnxruntime reads them from the model's folder, and `save_model` copies them
into the output's data file in chunks. A model over protobuf's 2 GiB limit goes through the
same way, at about one copy of its weights (onnxruntime's) in memory per live session.

Capture runs a copy of the model in onnxruntime (CPU) whose extra graph outputs are each
site's normal-form q/k/v/mask and output. Inputs are `.npz` files keyed by graph input
names, dicts of arrays, or synthesised from the graph's input types.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..io import InputError, atomic_write, what_is
from ..passes import onnx_detect, onnx_fold, onnx_graph, onnx_rewrite
from ..site import NormalForm
from .base import FrontEnd, Rewritten, default_scale

EXTERNAL_MIN_BYTES = 1 << 20      # write weights to <out>.data once they pass 1 MiB
SMALL_TENSOR = 1024               # tensors below this stay inside the model file
MAX_SYNTHESISED = 1 << 26         # elements per synthesised input (256 MiB of float32)
INLINE_MAX_BYTES = 1 << 16        # external tensors up to this size are read in at load ...
KEEP_ON_DISK_BYTES = 1 << 30      # ... and all of them while the external data totals no more than this
COPY_CHUNK = 1 << 26              # bytes per read when external weights are copied to the output
ALIGN = 4096                      # offset of a weight of 1 MiB or more in a written data file (mmap-able)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and validate (onnx.checker, structure only: what a rewrite may assume) an ONNX file.

    External data is checked (files present, long enough, inside the model's folder). Up
    to KEEP_ON_DISK_BYTES of it is read in, so the model is self-contained like any other;
    above that, weights over INLINE_MAX_BYTES stay references into their files (onnxruntime
    reads them; `save_model(..., base_dir=)` copies them).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"model not found: {path}")
    if not p.is_file() or p.stat().st_size == 0:
        raise InputError(f"{p.name} is {what_is(p)}, not an ONNX model")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - not protobuf
        first = (str(e).splitlines() or [""])[0]
        raise InputError(f"{p.name} is not an ONNX model ({what_is(p)}; the protobuf parser says: {first})") from e
    spans = [(t, *external_span(t, p.parent)) for t in external_tensors(model)]
    for t, src, offset, length in spans:
        if not src.is_file():
            raise InputError(f"{p.name} keeps weight {t.name!r} in {src.name}, which is missing")
        if offset + length > src.stat().st_size:
            raise InputError(f"{p.name}: {src.name} is shorter than weight {t.name!r} needs (truncated?)")
    keep_on_disk = sum(length for *_, length in spans) > KEEP_ON_DISK_BYTES
    for t, src, offset, length in spans:
        if not keep_on_disk or length <= INLINE_MAX_BYTES:
            with open(src, "rb") as f:
                f.seek(offset)
                t.raw_data = f.read(length)
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
    validate(model, p)
    return model


def external_tensors(model: onnx.ModelProto) -> list:
    """Tensors (initializers and node attributes such as Constant's value, in every graph) whose
    bytes live in an external file."""
    return [t for t in _all_tensors(model) if t.data_location == TensorProto.EXTERNAL]


def _attribute_tensors(model: onnx.ModelProto):
    """The tensors held by node attributes (Constant's value, …) in every graph."""
    for g in _graphs(model.graph):
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.TENSORS:
                    yield from a.tensors


def _all_tensors(model: onnx.ModelProto):
    for g in _graphs(model.graph):
        yield from g.initializer
    yield from _attribute_tensors(model)


def external_span(t: TensorProto, base_dir: Path) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor, the file resolved against `base_dir`.
    A location that leaves `base_dir` (an absolute path, `..`) is refused: a model file must
    not make the tool read files elsewhere."""
    info = {e.key: e.value for e in t.external_data}
    loc = info.get("location", "")
    src = (base_dir / loc).resolve()
    if not loc or Path(loc).is_absolute() or not src.is_relative_to(base_dir.resolve()):
        raise InputError(f"weight {t.name!r} points at {loc!r}, outside the model's folder")
    try:
        offset = int(info.get("offset", 0) or 0)
        length = int(info["length"]) if info.get("length") else _nbytes(t)
    except ValueError:
        raise InputError(f"weight {t.name!r} has a malformed offset or length in its external data") from None
    if offset < 0 or length < 0:
        raise InputError(f"weight {t.name!r} has a negative offset or length ({offset}, {length}) in its "
                         "external data")
    return src, offset, length


def validate(model: onnx.ModelProto, path: Path | None = None) -> None:
    """InputError when the graph is not a valid ONNX graph (cycles, dangling inputs, unknown
    standard ops, an opset this onnx does not know, no graph at all).

    Contrib ops are not errors: onnx.checker skips domains it does not know (com.microsoft),
    and the ops onnxruntime adds to the standard domain (SimplifiedLayerNormalization, as
    its transformer optimizer and Phi/Llama exports write it) are checked as opaque nodes
    (`checkable`); an op neither onnx nor onnxruntime knows still is one.
    """
    name = path.name if path else "the model"
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{name} holds no graph")
    newest = onnx.defs.onnx_opset_version()
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version > newest:
            raise InputError(f"{name} uses opset {o.version}; this onnx knows opsets up to {newest}")
    try:
        onnx.checker.check_model(checkable(model))       # weightless: the file is not read a second time
    except Exception as e:  # noqa: BLE001 - ValidationError and friends: the user's model
        first = (str(e).strip().splitlines() or [""])[0]
        raise InputError(f"{name} is not a valid ONNX model: {first}") from e


OPAQUE_DOMAIN = "attnrewrite.opaque"      # where `checkable` puts ops only onnxruntime knows


@functools.cache
def _runtime_standard_ops() -> frozenset:
    """The ops onnxruntime registers in the standard domain (its own beside onnx's)."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as C
        return frozenset(s.name for s in C.get_all_operator_schema() if s.domain in ("", "ai.onnx"))
    except Exception:  # noqa: BLE001 - a build without the schema list: the ones exporters write
        return frozenset({"SimplifiedLayerNormalization"})


@functools.cache
def _onnx_knows(op: str, opset: int) -> bool:
    try:
        onnx.defs.get_schema(op, opset, "")
        return True
    except Exception:  # noqa: BLE001 - SchemaError: no such op at this opset
        return False


def _graphs(g: onnx.GraphProto):
    yield g
    for n in g.node:
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _graphs(sub)


ATTENTION_OPS = ("Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention")


def unsearched_subgraphs(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """[(node, reason)] for each control-flow node (If, Loop, Scan, …) of the main graph whose
    body holds a softmax or an attention op: only the main graph is searched for attention."""
    out = []
    for n in model.graph.node:
        bodies = [(a.name, sub) for a in n.attribute
                  for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))]
        found = sorted({m.op_type for _, body in bodies for g in _graphs(body) for m in g.node
                        if m.op_type in ATTENTION_OPS})
        if found:
            out.append((n.name or n.op_type, f"{n.op_type} body ({', '.join(a for a, _ in bodies)}) holds "
                        f"{', '.join(found)}: attention inside control flow is not searched or rewritten"))
    return out


def runtime_only_ops(model: onnx.ModelProto) -> set[str]:
    """Standard-domain ops of `model` that onnx has no schema for at its opset but
    onnxruntime runs (its contrib ops in the standard domain, e.g. SimplifiedLayerNormalization)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    found = set()
    for g in _graphs(model.graph):
        for n in g.node:
            if n.domain in ("", "ai.onnx") and not _onnx_knows(n.op_type, opset) \
                    and n.op_type in _runtime_standard_ops():
                found.add(n.op_type)
    return found


def checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """A weightless copy of `model` for onnx.checker's structural check: large weights become
    typed inputs, and ops only onnxruntime knows (`runtime_only_ops`) move to an opaque
    domain the checker does not look into — their edges (defined before use, no dangling
    names, one producer per value) are still checked."""
    m = onnx_graph.light_copy(model)
    for t in _attribute_tensors(m):       # a value left on disk (a huge Constant): empty, structure kept
        if t.data_location == TensorProto.EXTERNAL:
            del t.external_data[:], t.dims[:]
            t.dims.append(0)
            t.data_location = TensorProto.DEFAULT
    m.functions.extend(model.functions)
    m.graph.sparse_initializer.extend(model.graph.sparse_initializer)
    ops = runtime_only_ops(model)
    if ops:
        for g in _graphs(m.graph):
            for n in g.node:
                if n.domain in ("", "ai.onnx") and n.op_type in ops:
                    n.domain = OPAQUE_DOMAIN
        m.opset_import.append(helper.make_opsetid(OPAQUE_DOMAIN, 1))
    return m


def check_rewritten(original: onnx.ModelProto, rewritten: onnx.ModelProto, inferred=None) -> None:
    """onnx.checker on what the rewrite changed, not on what it was given.

    The whole graph gets the structural check (`checkable`: contrib nodes are opaque);
    the nodes the rewrite added get the full check, types and shapes inferred strictly
    (`onnx_rewrite.changed_subgraph`). A broken lowering fails either; a pre-existing
    com.microsoft or onnxruntime-only op fails neither. RuntimeError names the problem.
    """
    try:
        onnx.checker.check_model(checkable(rewritten))
        sub = onnx_rewrite.changed_subgraph(original, rewritten, inferred)
        if sub is not None:
            onnx.checker.check_model(sub, full_check=True)
    except Exception as e:  # noqa: BLE001 - a bug in a lowering, reported as such
        raise RuntimeError(f"rewritten model fails onnx.checker: {str(e).splitlines()[0]}") from e


def external_files(model_path: Path, model: onnx.ModelProto | None = None) -> set[Path]:
    """The external data files a model file refers to (resolved)."""
    m = model if model is not None else onnx.load(str(model_path), load_external_data=False)
    out = set()
    for t in external_tensors(m):
        for e in t.external_data:
            if e.key == "location":
                out.add((model_path.parent / e.value).resolve())
    return out


def save_model(model: onnx.ModelProto, out: Path, *, external: bool | None = None,
               base_dir: Path | None = None) -> list[Path]:
    """Write `model` to `out` atomically; large weights go to `<out>.data` beside it.

    Weights that are external references (into files under `base_dir`) are copied from
    there in chunks, never held in memory whole; they force an external data file.
    Returns the files written. `external=None` decides by size (EXTERNAL_MIN_BYTES).
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    tensors = [t for g in _graphs(m.graph) for t in g.initializer]
    big = [t for t in tensors if t.data_location == TensorProto.EXTERNAL or _nbytes(t) >= SMALL_TENSOR]
    big += [t for t in _attribute_tensors(m) if t.data_location == TensorProto.EXTERNAL]   # copied, not read in
    if external is None:
        external = sum(_nbytes(t) for t in big) >= EXTERNAL_MIN_BYTES
    external = external or any(t.data_location == TensorProto.EXTERNAL for t in big)
    written = []
    if external and big:
        data_path = out.with_name(out.name + ".data")
        sources = {id(t): external_span(t, base_dir or Path.cwd()) for t in big
                   if t.data_location == TensorProto.EXTERNAL}
        for t in big:
            if id(t) in sources and not sources[id(t)][0].is_file():
                raise InputError(f"weight {t.name!r} refers to {sources[id(t)][0]}, which is missing "
                                 "(pass base_dir: the folder of the model it came from)")

        def write_data(tmp):
            with open(tmp, "wb") as f:
                for t in big:
                    f.write(b"\0" * (-f.tell() % (ALIGN if _nbytes(t) >= EXTERNAL_MIN_BYTES else 64)))
                    offset = f.tell()
                    if id(t) in sources:
                        length = _copy_span(*sources[id(t)], f)
                    else:
                        raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
                        length = f.write(raw)
                    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                                  "uint64_data", "string_data"):
                        t.ClearField(field)
                    del t.external_data[:]
                    for key, value in (("location", data_path.name), ("offset", str(offset)),
                                       ("length", str(length))):
                        t.external_data.add(key=key, value=value)
                    t.data_location = TensorProto.EXTERNAL

        atomic_write(data_path, write_data)
        written.append(data_path)
    try:
        atomic_write(out, lambda tmp: Path(tmp).write_bytes(m.SerializeToString()))
    except BaseException:
        for path in written:                  # no weights file without its model
            path.unlink(missing_ok=True)
        raise
    return [out, *written]


def _copy_span(src: Path, offset: int, length: int, f) -> int:
    with open(src, "rb") as s:
        s.seek(offset)
        left = length
        while left:
            chunk = s.read(min(left, COPY_CHUNK))
            if not chunk:
                raise InputError(f"{src.name} ended early while copying weights")
            f.write(chunk)
            left -= len(chunk)
    return length


def _nbytes(t: TensorProto) -> int:
    length = [e.value for e in t.external_data if e.key == "length"]
    if t.data_location == TensorProto.EXTERNAL and length:
        return int(length[0])
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
        if math.prod(shape) > MAX_SYNTHESISED:
            raise InputError(f"input {inp.name} declares shape {shape}: too large to synthesise "
                             "(pass --inputs with real values)")
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

def session(model: onnx.ModelProto, base_dir: Path | None = None):
    """A CPU session; external weights are read by onnxruntime from `base_dir`."""
    import onnxruntime as ort              # here: importing it writes a file in $TMPDIR (only ONNX needs it)
    so = ort.SessionOptions()
    if base_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base_dir))
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
    return None if x is None else torch.from_numpy(np.ascontiguousarray(x))


def float_outputs(model) -> list[str]:
    return [o.name for o in model.graph.output
            if o.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16,
                                                TensorProto.DOUBLE)]


def inputs_for(model, inputs) -> tuple[list, str]:
    """(input sets, kind): a .npz path, a dict or list of dicts of arrays, else synthesised."""
    if inputs is None:
        try:
            return synthesise_inputs(model), "synthesised"
        except InputError as e:              # listing needs no run; the pipeline raises it when a run is needed
            return [], f"none: {e}"
    if isinstance(inputs, (str, os.PathLike)):
        sets = read_npz(str(inputs), model)
    elif isinstance(inputs, dict):
        sets = [{k: np.asarray(v) for k, v in inputs.items()}]
    else:
        sets = [{k: np.asarray(v) for k, v in d.items()} for d in inputs]
    check_id_ranges(model, sets)
    return sets, "given"


def check_id_ranges(model, sets: list[dict]) -> None:
    """InputError for token ids outside the embedding table they index (where the graph shows one)."""
    bounds = _id_bounds(model)
    for i, feeds in enumerate(sets):
        where = f"input set {i}" if len(sets) > 1 else "the inputs"
        for name, high in bounds.items():
            x = feeds.get(name)
            if x is None or x.size == 0 or not np.issubdtype(x.dtype, np.integer):
                continue
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= high:
                raise InputError(f"{where}: {name} holds ids {lo}…{hi}, outside the embedding's 0…{high - 1}")


def is_onnx(obj) -> bool:
    """An onnx.ModelProto or a path ending in .onnx."""
    if isinstance(obj, onnx.ModelProto):
        return True
    return isinstance(obj, (str, os.PathLike)) and str(obj).lower().endswith(".onnx")


class OnnxFrontEnd(FrontEnd):
    """An ONNX ModelProto and its input sets (feeds dicts)."""

    fmt = "onnx"

    def __init__(self, model: onnx.ModelProto, inputs=None, name: str = "", source: str | None = None):
        self.program = model
        self.inputs, kind = inputs_for(model, inputs)
        self.inputs_kind, _, self.inputs_problem = kind.partition(": ")
        self.name = name or model.graph.name or "onnx model"
        self.source = source
        self.base_dir = Path(source).resolve().parent if source else None   # where external weights live
        self._inferred = onnx_graph.infer(model)
        self._original_session = None
        self._last = (None, None)              # (program, its session): auto-tuning runs one at a time

    @classmethod
    def open(cls, model, inputs=None) -> "OnnxFrontEnd":
        if isinstance(model, onnx.ModelProto):
            return cls(model, inputs)
        return cls(load_model(model), inputs, name=str(model), source=str(model))

    def synthesise(self, seed: int) -> list:
        return synthesise_inputs(self.program, seed)

    def find_sites(self):
        sites, unmatched, _ = onnx_detect.find_sites(self.program, self._inferred)
        skipped = unsearched_subgraphs(self.program)
        self.unsearched = (f"{len(skipped)} control-flow subgraph(s) holding a softmax or an attention op "
                           f"were not searched ({', '.join(n for n, _ in skipped[:3])})") if skipped else None
        return sites, unmatched + skipped

    def keep_reason(self, site):
        if site.graph.keep:
            return site.graph.keep
        if onnx_rewrite.scalar_scale(site) is None and default_scale(site) is None:
            return "default scale with an unknown head_dim"
        return None

    def scalars(self, site):
        scale = onnx_rewrite.scalar_scale(site)
        scale = scale if scale is not None else default_scale(site)
        form = NormalForm.of(site)
        return {"scale": float(scale) if scale is not None else 1.0, "softcap": form.softcap,
                "causal": form.causal, "dropout_p": form.dropout_p}

    def capture(self, sites, inputs):
        sites = [s for s in sites if not s.graph.keep]
        if not sites:
            return {}
        probe, probes = onnx_rewrite.probe_model(self.program, sites, self._inferred)
        sess = session(probe, self.base_dir)
        out: dict[int, list[dict]] = {sid: [] for sid in probes}
        for feeds in inputs:
            res = run(sess, feeds)
            for sid, names in probes.items():
                out[sid].append({k: _torch(res[n]) if n else None for k, n in names.items()})
        return out

    def rewrite(self, sites, variant, choice):
        new, kept = onnx_rewrite.rewrite_model(self.program, sites, variant, choice, self._inferred)
        maps = {sid: o["out_map"] for sid, o in choice.items() if o.get("out_map") and sid not in kept}
        folded = onnx_fold.fold_out_maps(new, maps, self.base_dir) if maps else {}
        check_rewritten(self.program, new, self._inferred)
        return Rewritten(new, kept, folded)

    def outputs(self, program, feeds):
        if program is None:
            if self._original_session is None:
                self._original_session = session(self.program, self.base_dir)
            sess = self._original_session
        else:
            if self._last[0] is not program:
                self._last = (program, session(program, self.base_dir))
            sess = self._last[1]
        res = run(sess, feeds)
        return [(n, _torch(res[n])) for n in float_outputs(self.program)]

    def save(self, program, path):
        return save_model(program, Path(path), base_dir=self.base_dir)

    def output_path(self, variant: str):
        if self.source is None:
            return None
        p = Path(self.source)
        return p.with_name(f"{p.stem}.{variant}.onnx")
