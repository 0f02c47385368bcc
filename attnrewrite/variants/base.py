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
    """softmax over the key axis; rows with no finite score give zeros instead of NaN."""
    p = torch.softmax(s, dim=-1)
    dead = s.amax(dim=-1, keepdim=True) == -math.inf
    return torch.where(dead, torch.zeros((), dtype=p.dtype, device=p.device), p)


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
