"""What every variant shares: the op schema, mask handling and the custom-op factory.

Every variant op takes the normal form
    (q, k, v, mask?, scale, softcap, causal, dropout_p, <variant params>)
with q (B, H, Lq, D), k/v (B, Hkv, Lk, D|Dv), H a multiple of Hkv (head h reads kv head
h // (H // Hkv), as repeat_interleave / HF repeat_kv do). `mask` broadcasts to
(B, H, Lq, Lk): bool means True = attend, float is added to the scores. `causal` is
bottom-right aligned (key j visible to query i iff j <= i + Lk - Lq, the KV-cache
convention). `softcap` 0 means none. A row with no visible key returns zeros, never NaN.

The op is registered once per variant with `torch.library`; its CPU/CUDA
implementation is the variant's PyTorch reference (the seam where generated Triton
kernels plug in), its fake implementation gives the output shape, and its autograd
formula is the VJP of the reference, so rewritten programs export, save and train.
"""
from __future__ import annotations

import math

import torch

NAMESPACE = "attnrewrite"
_lib = torch.library.Library(NAMESPACE, "FRAGMENT")

MASK_REMOVED = -1e4        # an additive bias at or below this removes the key (HF uses finfo.min)

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


def safe_softmax(s: torch.Tensor) -> torch.Tensor:
    """softmax over the key axis; rows with no finite score give zeros (and zero gradients), never NaN."""
    dead = s.amax(dim=-1, keepdim=True) == -math.inf
    return torch.softmax(s.masked_fill(dead, 0), dim=-1).masked_fill(dead, 0)


def _fake(q, k, v, *args, **kwargs):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def define_attention_op(name: str, reference, extra_schema: str = ""):
    """Register `attnrewrite::<name>` with the normal-form schema plus `extra_schema`.

    `reference(q, k, v, mask, scale, softcap, causal, dropout_p, *params)` is the
    implementation on every device until a kernel is registered for it.
    """
    schema = f"{name}({NORMAL_FORM}{', ' + extra_schema if extra_schema else ''}) -> Tensor"
    _lib.define(schema)
    qualname = f"{NAMESPACE}::{name}"
    torch.library.impl(qualname, "CompositeExplicitAutograd", lib=_lib)(reference)
    torch.library.register_fake(qualname, lib=_lib)(_fake)

    def setup_context(ctx, inputs, output):
        ctx.inputs = inputs
        ctx.save_for_backward(*[t for t in inputs[:4] if isinstance(t, torch.Tensor)])

    def backward(ctx, grad):
        q, k, v, mask, scale, softcap, causal, dropout_p, *params = ctx.inputs
        if dropout_p:
            raise NotImplementedError(
                f"{qualname}: backward with dropout_p > 0 is not supported by the reference; "
                "rewrite an eval-mode program or set dropout to 0")
        saved = ctx.saved_tensors
        q, k, v = saved[:3]
        mask = saved[3] if len(saved) > 3 else None
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in (q, k, v)]
            out = reference(*leaves, mask, scale, softcap, causal, 0.0, *params)
            want = [t for t in leaves if t.requires_grad]
            grads = iter(torch.autograd.grad(out, want, grad, allow_unused=True))
        g = [next(grads) if t.requires_grad else None for t in leaves]
        return (*g, None, None, None, None, None, *[None] * len(params))

    torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_lib)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


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
