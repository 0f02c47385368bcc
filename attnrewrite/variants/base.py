"""What every variant shares: the op schema, mask handling and the custom-op factory.

Every variant op takes the normal form
    (q, k, v, mask?, scale, softcap, causal, dropout_p, <variant params>)
with q (B, H, Lq, D), k/v (B, Hkv, Lk, D|Dv), H a multiple of Hkv (head h reads kv head
h // (H // Hkv), as repeat_interleave / HF repeat_kv do). `mask` broadcasts to
(B, H, Lq, Lk): bool means True = attend, float is added to the scores. `causal` is
bottom-right aligned (key j visible to query i iff j <= i + Lk - Lq, the KV-cache
convention). `softcap` 0 means none. A row with no visible key returns zeros, never NaN.

The op is registered once per variant with `torch.library`; its implementation runs the
generated Triton kernel (attnrewrite.kernels) for CUDA tensors, and for CPU tensors when
ATTNREWRITE_KERNELS=interpret, where a template covers the call, and the variant's PyTorch
reference otherwise; its fake implementation gives the output shape, and its autograd
formula calls a second op, `attnrewrite::<name>_backward` (dq, dk, dv from the VJP of the
reference), so rewritten programs export, save and train, and a kernel can back the
backward op alone.

Dropout. Every op ends with `Tensor? dropout_seed=None` (a 0-dim integer tensor). With
dropout_p > 0 and a seed, the reference runs on the global RNG forked and seeded from it
(`seeded_rng`): the dropout mask is a pure function of the seed, the caller's RNG stream is
left untouched, and the backward op replays the same mask. Without a seed the mask is
drawn from the global RNG as it stands; the forward works, but its backward cannot know
that mask and raises — a training program passes a seed (the rewrite emits one per site
whose dropout is active).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .. import kernels
from . import impl
from ..site import MASK_FLOOR

NAMESPACE = "attnrewrite"
_lib = torch.library.Library(NAMESPACE, "FRAGMENT")

MASK_REMOVED = MASK_FLOOR   # the one mask floor (site.MASK_FLOOR), under the name variants use

NORMAL_FORM = ("Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, float softcap, "
               "bool causal, float dropout_p")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types are computed in fp32; fp32/fp64 in themselves."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def expand_kv(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Repeat kv heads to q's head count (GQA/MQA), and a batch of 1 to q's batch."""
    if t.shape[1] != q.shape[1]:
        h, hkv = q.shape[1], t.shape[1]
        if h % hkv:
            raise ValueError(f"{h} query heads is not a multiple of {hkv} kv heads")
        t = t.repeat_interleave(h // hkv, dim=1)
    if t.shape[0] != q.shape[0]:
        t = t.expand(q.shape[0], *t.shape[1:])
    return t


def kv_mismatch(q, k) -> str | None:
    """Why k/v cannot serve q's heads and batch (GQA needs H a multiple of Hkv), or None."""
    if q.shape[1] % k.shape[1] or k.shape[0] not in (1, q.shape[0]):
        return "k/v heads or batch do not divide q's"
    return None


def score_bias(mask: torch.Tensor | None, causal: bool, lq: int, lk: int,
               dtype: torch.dtype, device) -> torch.Tensor | None:
    """The additive bias the normal form's mask and causal flag stand for."""
    bias = None
    if mask is not None:
        if mask.dtype == torch.bool:
            bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, -math.inf)
        else:
            bias = mask.to(dtype)
    if causal:
        keep = torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)
        c = torch.zeros(lq, lk, dtype=dtype, device=device).masked_fill(~keep, -math.inf)
        bias = c if bias is None else bias + c
    return bias


def masked_scores(q, k, scale: float, softcap: float, mask, causal: bool) -> torch.Tensor:
    """scale·q·kᵀ, soft-capped, plus the bias — in the compute dtype, (B, H, Lq, Lk)."""
    cdt = compute_dtype(q.dtype)
    q, k = q.to(cdt), expand_kv(q, k).to(cdt)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    bias = score_bias(mask, causal, q.shape[-2], k.shape[-2], cdt, q.device)
    return s if bias is None else s + bias


def is_causal_mask(mask: torch.Tensor | None) -> bool:
    """True when every key after the (bottom-right) diagonal is removed, for every row."""
    if mask is None or mask.dim() < 2 or mask.shape[-2] < 2:
        return False
    lq, lk = mask.shape[-2], mask.shape[-1]
    removed = ~mask if mask.dtype == torch.bool else mask <= MASK_FLOOR
    upper = torch.ones(lq, lk, dtype=torch.bool).triu(lk - lq + 1)
    if not upper.any():
        return False
    removed = removed.expand(*removed.shape[:-2], lq, lk)
    return bool(removed[..., upper].all()) and not bool(removed[..., ~upper].all())


def safe_softmax(s: torch.Tensor) -> torch.Tensor:
    """softmax over the key axis; rows with no finite score give zeros (and zero gradients), never NaN."""
    dead = s.amax(dim=-1, keepdim=True) == -math.inf
    return torch.softmax(s.masked_fill(dead, 0), dim=-1).masked_fill(dead, 0)


SEED = "Tensor? dropout_seed=None"
OUT_MAP = "float[]? out_map=None"     # a per-head Dv×Dv map applied to the output (calibration), row-major


def apply_out_map(out: torch.Tensor, out_map, transpose: bool = False) -> torch.Tensor:
    """out (B, H, Lq, Dv) times each head's Dv×Dv map (its transpose: for the backward); None: as is."""
    if not out_map:
        return out
    h, dv = out.shape[1], out.shape[-1]
    x = torch.tensor(out_map, dtype=compute_dtype(out.dtype), device=out.device).view(h, dv, dv)
    return torch.matmul(out.to(x.dtype), x.transpose(-1, -2) if transpose else x).to(out.dtype)
BACKWARD_OPS: dict = {}     # op name -> its `<name>_backward` op
IMPLEMENTATIONS: dict = {}  # op name -> its implementation table (impl.py), fastest first
KERNEL_PLANS: dict = {}     # op name -> its kernels.KernelPlan (None: no generated kernel covers it)


@contextlib.contextmanager
def seeded_rng(seed, device):
    """Run the block on the CPU generator (and `device`'s, for an accelerator) forked and
    seeded from `seed`, so the random numbers drawn inside depend on the seed alone; the
    generators are restored on exit."""
    device, seed = torch.device(device), int(seed) % (1 << 64)
    accel = device.type != "cpu"
    with torch.random.fork_rng(devices=[device] if accel else [], device_type=device.type if accel else "cuda"):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        elif accel:
            getattr(torch, device.type).manual_seed(seed)
        yield


def _rng(dropout_p: float, seed, device):
    """Where the reference draws its dropout mask: seeded from `seed` when dropout is active
    and a seed is given, else the global generator as it stands."""
    return seeded_rng(seed, device) if dropout_p and seed is not None else contextlib.nullcontext()


def _require_seed(qualname: str, dropout_p: float, seed) -> None:
    if dropout_p and seed is None:
        raise NotImplementedError(
            f"{qualname}: backward with dropout_p > 0 needs the dropout_seed the forward was called "
            "with (without one the dropout mask cannot be replayed)")


@contextlib.contextmanager
def _autograd():
    """Grad mode and autograd dispatch on, for the reference backward's recompute. (A kernel
    entered through a dispatch mode — FlopCounterMode, opcheck — runs with autograd's
    dispatch keys excluded, and would record no graph to differentiate.)"""
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False), \
            torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.ADInplaceOrView, False), torch.enable_grad():
        yield


_REQUIRED = object()
_CAST = {"int": int, "float": float, "str": str, "bool": bool}


@dataclass(frozen=True)
class OpArg:
    """One argument of a variant's op after the normal form, declared once: the op schema, the
    argument tuple a rewrite emits and the reference's parameter all come from the variant's
    ordered OpArgs.

    `type` is the schema type ("int", "float", "str", "int[]", "float[]", "int[]?", …); the
    value is `value(o)` when given, else option `key` (default: `name`) cast to `type`, o being
    a site's options over the parameters' defaults; `default` (optional) is the schema default,
    which lets programs saved before the argument existed load, and lets the dispatcher leave
    the argument out when it equals it."""
    name: str
    type: str
    key: str | None = None
    value: Callable | None = None
    default: object = _REQUIRED

    @property
    def option(self) -> str:
        return self.key or self.name

    def schema(self) -> str:
        if self.default is _REQUIRED:
            return f"{self.type} {self.name}"
        return f"{self.type} {self.name}={_schema_literal(self.default)}"

    def of(self, o: dict):
        if self.value is not None:
            return self.value(o)
        x, kind = o[self.option], self.type.rstrip("?")
        if x is None and kind != self.type:                      # an optional argument left out
            return None
        if kind.endswith("[]"):
            return [_CAST[kind[:-2]](v) for v in x]
        return _CAST[kind](x)


def _schema_literal(x) -> str:
    if isinstance(x, str):
        return f'"{x}"'
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_schema_literal(v) for v in x) + "]"
    return "None" if x is None else repr(x)


def op_schema(args) -> str:
    """The schema text of a variant's OpArgs ("str mode, int k=64, …")."""
    return ", ".join(a.schema() for a in args)


def op_args_from(args, params: dict, hidden: dict | None = None) -> Callable:
    """The variant's `op_args(site, options)`: each OpArg's value from the options, missing ones
    (and None) taken from the params' defaults and from `hidden` (rewrite-time state the user
    does not set, such as per-head budgets)."""
    base = {**{k: p.default for k, p in params.items()}, **(hidden or {})}

    def op_args(site, options: dict) -> tuple:
        o = {**base, **{k: v for k, v in options.items() if v is not None}}
        return tuple(a.of(o) for a in args)
    op_args.__doc__ = f"The op's arguments after the normal form: ({', '.join(a.name for a in args)})."
    return op_args


def define_attention_op(name: str, reference, extra_schema: "str | tuple" = "", fast: tuple = (), kernel=None):
    """Register `attnrewrite::<name>` and `attnrewrite::<name>_backward`; return the forward op.

    Forward: (normal form, extra_schema, dropout_seed, out_map) -> out. Backward:
    (grad, normal form, extra_schema, dropout_seed, out_map) -> (dq, dk, dv), shaped as q, k, v
    (k and v with their own head count); also in BACKWARD_OPS[name].
    `reference(q, k, v, mask, scale, softcap, causal, dropout_p, *params)` is the
    implementation of last resort; `fast` holds the variant's faster implementations
    (impl.Implementation), tried in order after the kernels under the interpreter and before
    the kernels on CUDA — see impl.py for the whole table. The table is IMPLEMENTATIONS[name].
    `kernel` is the op's kernels.KernelPlan (which generated kernels cover which calls; None:
    none do), kept in KERNEL_PLANS[name].
    """
    if not isinstance(extra_schema, str):                # the variant's OpArgs
        extra_schema = op_schema(extra_schema)
    params = f", {extra_schema}" if extra_schema else ""
    _lib.define(f"{name}({NORMAL_FORM}{params}, {SEED}, {OUT_MAP}) -> Tensor")
    _lib.define(f"{name}_backward(Tensor grad, {NORMAL_FORM}{params}, {SEED}, {OUT_MAP}) "
                "-> (Tensor, Tensor, Tensor)")
    qualname = f"{NAMESPACE}::{name}"
    ops = getattr(torch.ops, NAMESPACE)
    fwd, bwd = getattr(ops, name).default, getattr(ops, f"{name}_backward").default
    defaults = [a.default_value if a.has_default_value() else None for a in fwd._schema.arguments]

    def split(args):
        """(the reference's arguments, dropout_p, dropout_seed, out_map); the dispatcher leaves
        out trailing arguments equal to their defaults, which come back here."""
        args = (*args, *defaults[len(args):])
        return args[:-2], args[7], args[-2], args[-1]

    impls = impl.table(reference, tuple(fast), kernel)
    IMPLEMENTATIONS[name] = impls
    KERNEL_PLANS[name] = kernel

    def forward(*args):
        args, dropout_p, seed, out_map = split(args)
        chosen, _ = impl.choose(impls, args)
        with _rng(dropout_p, seed, args[0].device) if chosen.seeded else contextlib.nullcontext():
            out = chosen.run(*args)
        impl.count(chosen, args[0].device)
        return apply_out_map(out, out_map).contiguous()    # the layout the fake implementation states

    def backward_reference(grad, *args):
        args, dropout_p, seed, out_map = split(args)
        _require_seed(qualname, dropout_p, seed)
        grad = apply_out_map(grad, out_map, transpose=True)   # through the map first
        chosen, _ = impl.choose(impls, args)
        grads = kernels.backward(kernel, grad, args) if chosen.name == "triton" else None
        if grads is not None:
            return tuple(torch.empty_like(t).copy_(g) for g, t in zip(grads, args[:3]))
        with _autograd():                          # recompute under autograd, with what covers that
            leaves = [t.detach().requires_grad_() for t in args[:3]]
            run, chosen = impl.differentiable(impls, (*leaves, *args[3:]))
            with _rng(dropout_p, seed, args[0].device) if chosen.seeded else contextlib.nullcontext():
                out = run(*leaves, *args[3:])
            grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
        # each gradient in its input's own layout, as the fake implementation (empty_like) states
        return tuple(torch.zeros_like(t) if g is None else torch.empty_like(t).copy_(g) for g, t in zip(grads, leaves))

    torch.library.impl(qualname, "CompositeExplicitAutograd", lib=_lib)(forward)
    torch.library.register_fake(qualname, lib=_lib)(
        lambda q, k, v, *args: q.new_empty((*q.shape[:-1], v.shape[-1])))
    torch.library.impl(f"{qualname}_backward", "CompositeExplicitAutograd", lib=_lib)(backward_reference)
    torch.library.register_fake(f"{qualname}_backward", lib=_lib)(
        lambda grad, q, k, v, *args: (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)))

    _register_autograd(qualname, bwd)
    BACKWARD_OPS[name] = bwd
    return fwd


def _register_autograd(qualname: str, bwd) -> None:
    """The forward op's autograd formula: save the normal form and the seed, call the backward op."""
    def setup_context(ctx, inputs, output):
        *args, seed, out_map = inputs
        ctx.rest, ctx.out_map = args[4:], out_map              # scale, softcap, causal, dropout_p, params
        ctx.save_for_backward(*args[:4], seed)

    def backward(ctx, grad):
        q, k, v, mask, seed = ctx.saved_tensors
        _require_seed(qualname, ctx.rest[3], seed)
        grads = bwd(grad, q, k, v, mask, *ctx.rest, seed, ctx.out_map)
        return (*[g if need else None for g, need in zip(grads, ctx.needs_input_grad)],
                None, *[None] * len(ctx.rest), None, None)

    torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_lib)


def lowerings() -> dict:
    """{op overload: (its implementation table, apply_out_map)} for impl.lower_graph."""
    ops = getattr(torch.ops, NAMESPACE)
    return {getattr(ops, name).default: (impls, apply_out_map) for name, impls in IMPLEMENTATIONS.items()}


# ---------------------------------------------------------------- variant parameters

class Param:
    """One `--set KEY=VALUE` parameter: default, type, and what values are allowed.

    kind is int | float | bool | str | "ints" (a list of ints: "0,5,9" on the command line).
    """

    def __init__(self, default, kind, help: str, choices=(), minimum=None, maximum=None,
                 allow_none: bool = False):
        self.default, self.kind, self.help = default, kind, help
        self.choices, self.minimum, self.maximum, self.allow_none = tuple(choices), minimum, maximum, allow_none

    def parse(self, key: str, value):
        """The validated value, or ValueError with a one-line reason."""
        if value is None or (self.allow_none and isinstance(value, str) and value.lower() in ("none", "")):
            if self.allow_none:
                return None
            raise ValueError(f"{key} needs a value")
        kind = self.kind
        try:
            if kind == "ints":
                items = value if isinstance(value, (list, tuple)) else str(value).split(",")
                value = [int(str(v).strip()) for v in items if str(v).strip()]
                if not value or any(v < 0 for v in value):
                    raise ValueError
            elif kind is bool:
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    value = value.lower() in ("true", "1", "yes")
                value = bool(value)
            elif kind is int:
                if isinstance(value, bool) or float(value) != int(float(value)):
                    raise ValueError
                value = int(float(value))
            elif kind is float:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError
            else:
                value = str(value)
        except (TypeError, ValueError):
            what = {"ints": "a comma-separated list of non-negative integers", bool: "true or false",
                    int: "an integer", float: "a number"}.get(kind, "a string")
            raise ValueError(f"{key}={value!r} is not {what}") from None
        if self.choices and value not in self.choices:
            raise ValueError(f"{key}={value} is not one of {', '.join(map(str, self.choices))}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{key}={value} is below the minimum {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{key}={value} is above the maximum {self.maximum}")
        return value


def parse_params(variant_name: str, params: dict, options: dict) -> dict:
    """Defaults overlaid with validated `options`; ValueError names the bad key."""
    out = {k: p.default for k, p in params.items()}
    for key, value in options.items():
        if key not in params:
            names = ", ".join(sorted(params)) or "none"
            raise ValueError(f"unknown option '{key}' for variant {variant_name} (known: {names})")
        out[key] = params[key].parse(key, value)
    return out


# ---------------------------------------------------------------- the variant object

@dataclass(frozen=True, eq=False)
class Variant:
    """One variant, all of it in one object, defined once at the end of its own file.

    `name` is what users write (`--variant conv-basis`, `rewrite(m, "conv-basis")`,
    `compile_backend("conv-basis")`; the underscore spelling is accepted too) and is resolved
    to this object once, where the request comes in (`variants.resolve`); everything below
    (pipeline, cost, check, report, front ends) holds the object. `params` are the options in
    order ({key: Param}: default, type, validation, help). The rest is what the pipeline calls:

      reference(q, k, v, mask, scale, softcap, causal, dropout_p, *op_args) -> out
      op                      attnrewrite::<op_name> (define_attention_op)
      op_args(site, options) -> tuple             the op's arguments after the normal form
      diagnostics(q, k, v, mask, scale, softcap, causal, options) -> dict
      prepare(site, samples, options) -> dict | str        per-site state, or why it stays
      needs_samples(site, options) -> bool                 whether prepare reads captured values
      auto_ladder(site, options) -> [overrides]            cheapest first, for auto=true
      inapplicable(given, options) -> str | None           an option the chosen mode ignores
      share_budget(planned, seen) -> planned               spread one budget over all the sites
      onnx_lower(builder, site, q, k, v, mask, options) -> the (B, H, Lq, Dv) output value
      cost_model(dims, options) -> dict                    the forward cost (variants/costing.py)
      exact_check                                          gate the end-to-end check by default
                                                           (exact: 1e-4; approximations: report only)

    A variant outside this package is an object like these, registered under the entry-point
    group `attnrewrite.variants` (see variants/__init__.py).
    """
    name: str
    op_name: str
    params: dict
    reference: Callable
    op: object
    op_args: Callable
    diagnostics: Callable
    prepare: Callable | None = None
    needs_samples: Callable | None = None
    auto_ladder: Callable | None = None
    inapplicable: Callable | None = None
    share_budget: Callable | None = None
    onnx_lower: Callable | None = None
    cost_model: Callable | None = None
    exact_check: bool = False

    @property
    def key(self) -> str:
        """The name as reports and Python identifiers spell it: "conv_basis"."""
        return self.name.replace("-", "_")

    # the names the pipeline used when a variant was its module
    NAME = property(lambda self: self.key)
    OP_NAME = property(lambda self: self.op_name)
    PARAMS = property(lambda self: self.params)

    @property
    def backward_op(self):
        """attnrewrite::<op_name>_backward, the op its autograd formula calls."""
        return BACKWARD_OPS[self.op_name]

    @property
    def kernel(self):
        """Its kernels.KernelPlan: which generated kernels cover its calls (None: none)."""
        return KERNEL_PLANS[self.op_name]

    @property
    def implementations(self) -> tuple:
        """Its implementation table, fastest first (impl.py)."""
        return IMPLEMENTATIONS[self.op_name]

    def defaults(self) -> dict:
        return {k: p.default for k, p in self.params.items()}

    def __repr__(self) -> str:
        return f"<variant {self.name}>"
