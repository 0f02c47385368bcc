"""Which generated kernel an op call runs, and running it.

The custom ops (variants/base.py) call `forward(plan, args)` and `backward(plan, grad, args)`
with the reference's arguments (q, k, v, mask, scale, softcap, causal, dropout_p, *variant
params), `plan` being the op's `KernelPlan`, which the variant hands over with its op
(`define_attention_op(..., kernel=plan)`). Each returns None when kernels are off for the
device or no template covers the call — the op then runs its PyTorch reference. Kernels run
for CUDA tensors, and for CPU tensors when ATTNREWRITE_KERNELS=interpret (the Triton
interpreter, which also needs TRITON_INTERPRET=1 before triton is imported).

`select(plan, ...)` is the one decision: a KernelConfig, or None and the reason. This module
never imports attnrewrite.variants and keeps no table of them: what it needs of a variant
comes in its plan — which template covers a call and with what constants, the extra kernel
arguments the variant computes (sparse top-k's indices, mode=block's kept blocks,
preconditioned's gains), and, for an op that stays a PyTorch pipeline with kernels as some
of its steps (conv-basis: the start search and the FFTs are torch code), that pipeline
(`Host`).
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
from triton import knobs

from ..tally import Tally
from .generate import KernelConfig, load

MAX_HEAD_DIM = 256
INTERPRETER_ON_AT_IMPORT = bool(knobs.runtime.interpret)   # read once: triton.language was set up this way
HALF_OR_SINGLE = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def interpreting() -> bool:
    return os.environ.get("ATTNREWRITE_KERNELS", "").lower() == "interpret"


def target_for(device) -> str | None:
    """"cuda", "interpret" (CPU under ATTNREWRITE_KERNELS=interpret), or None: the reference runs.

    The interpreter needs TRITON_INTERPRET=1 set before triton is first imported (Triton's own
    library functions are compiled or interpreted from then on); asking for it without that is
    an error rather than a silent fall-back to the reference.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda"
    if device.type == "cpu" and interpreting():
        if not INTERPRETER_ON_AT_IMPORT:
            raise RuntimeError("ATTNREWRITE_KERNELS=interpret needs TRITON_INTERPRET=1 in the environment "
                               "before the process imports triton")
        return "interpret"
    return None


def mask_kind(mask, lq: int) -> str:
    """none | key (one bias row shared by every query: key padding) | additive | boolean."""
    if mask is None:
        return "none"
    if mask.dim() < 2 or mask.shape[-2] == 1 or lq == 1:
        return "key"
    return "boolean" if mask.dtype == torch.bool else "additive"


def prepare_mask(mask, kind: str, q, lk: int, target: str):
    """(tensor, (stride_b, stride_h, stride_m, stride_n)) as the kernels read it: a key row as
    fp32 bias, a full boolean mask as uint8, a full additive one as it is (fp32 when the
    interpreter would meet bf16); broadcast axes get stride 0."""
    b, h, lq = q.shape[:3]
    if kind == "none":
        return q, (0, 0, 0, 0)
    m = mask.to(q.device)
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if kind == "key":
        m = m[..., -1:, :]
        m = torch.zeros(m.shape, dtype=torch.float32, device=q.device).masked_fill(~m, -math.inf) \
            if m.dtype == torch.bool else m.to(torch.float32)
        m = m.expand(b, h, 1, lk)
        return m, (m.stride(0), m.stride(1), 0, m.stride(3))
    if kind == "boolean":
        m = m.view(torch.uint8)
    elif target == "interpret" or m.dtype not in HALF_OR_SINGLE:
        m = m.to(torch.float32)
    m = m.expand(b, h, lq, lk)
    return m, m.stride()


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """What the kernels need of one variant's op, given by the variant with its op.

      template(params, causal) -> (template name, its constants) or (None, why no template
          covers a call with these variant parameters);
      extra(cfg, args, backward) -> tuple: arguments the variant computes for the kernel after
          (q, k, v, mask, scale) — e.g. top-k indices, block layouts (`block_lists`), gains;
      host: a `Host` when the op stays a PyTorch pipeline with kernels as some of its steps;
      note: the report's kernel_reason when only the forward has a kernel ("" for the default).
    """
    template: object
    extra: object = None
    host: object = None
    note: str = ""


EXACT = KernelPlan(lambda params, causal: ("exact", ()))


def template_for(plan: KernelPlan | None, params: tuple, causal: bool):
    """(template, its constants) for an op call, or (None, why no template covers it)."""
    if plan is None:
        return None, "the op has no kernel plan"
    return plan.template(tuple(params), bool(causal))


def select(kplan: KernelPlan | None, q, k, v, mask, scale, softcap, causal, dropout_p, params, target: str,
           plan: list | None = None):
    """(KernelConfig, "") or (None, the reason the reference runs). For an op with a host
    pipeline (conv-basis) the host's plan decides causal, the mask kind and the working
    precision; a list passed as `plan` receives that plan, for the run."""
    template, constants = template_for(kplan, tuple(params), bool(causal))
    if template is None:
        return None, constants
    if dropout_p:
        return None, "dropout is active: the kernels draw no dropout mask (the reference does, from its seed)"
    dtype = HALF_OR_SINGLE.get(q.dtype)
    if dtype is None:
        return None, f"{q.dtype} has no template (float16, bfloat16 and float32 do)"
    if dtype == "bfloat16" and target == "interpret":
        return None, "the Triton interpreter has no bfloat16 arithmetic"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return None, "q, k and v differ in dtype"
    d, dv = q.shape[-1], v.shape[-1]
    if max(d, dv) > MAX_HEAD_DIM:
        return None, f"head_dim {max(d, dv)} is over {MAX_HEAD_DIM}"
    if q.shape[1] % k.shape[1] or k.shape[0] not in (1, q.shape[0]):
        return None, "k/v heads or batch do not divide q's"
    kind = mask_kind(mask, q.shape[-2])
    if kplan.host is not None:
        found = kplan.host.plan(q, k, v, mask, bool(causal), tuple(params))
        if isinstance(found, str):
            return None, found
        causal, key_bias, work = found
        kind = "none" if key_bias is None else "key"
        constants = (*constants, ("WORK_F64", work == torch.float64))
        if plan is not None:
            plan.append(found)
    cfg = KernelConfig(template=template, head_dim=d, head_dim_v=dv, dtype=dtype, causal=bool(causal),
                       mask=kind, group=q.shape[1] // k.shape[1],
                       softcap=float(softcap or 0.0), params=constants, target=target)
    return cfg, ""


def _call(kplan: KernelPlan | None, args, backward: bool = False):
    """(module, its forward's or backward's arguments after the gradient), or (None, None)."""
    q, k, v, mask, scale, softcap, causal, dropout_p, *params = args
    target = target_for(q.device)
    if target is None:
        return None, None
    cfg, _ = select(kplan, q, k, v, mask, scale, softcap, causal, dropout_p, params, target)
    if cfg is None or (backward and cfg.template not in BACKWARD_TEMPLATES):
        return None, None
    m = prepare_mask(mask, cfg.mask, q, k.shape[-2], target)
    extra = kplan.extra(cfg, args, backward) if kplan.extra is not None else ()
    _count(cfg)
    return load(cfg), (q, k, v, m, float(scale), *extra)


def topk_indices(q, k, mask, scale, softcap, causal, kept: int, chunk_elements: int = 1 << 22):
    """(B, H, Lq, min(kept, Lk)) indices of each row's highest masked scores, as sparse's top-k
    mode selects them: scores (q·scale)·kᵀ in fp32 for half inputs, soft-capped, plus the mask
    (False / bias), causal keys removed; torch.topk; rows in chunks of ≤ chunk_elements scores."""
    b, h, lq, _ = q.shape
    cdt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    kx = k.to(cdt).repeat_interleave(h // k.shape[1], 1).expand(b, h, *k.shape[2:])
    lk = kx.shape[2]
    m = mask
    if m is not None:
        while m.dim() < 4:
            m = m.unsqueeze(0)
    rows = max(1, chunk_elements // max(b * h * lk, 1))
    out = []
    for i0 in range(0, lq, rows):
        i1 = min(i0 + rows, lq)
        s = (q[:, :, i0:i1].to(cdt) * scale) @ kx.transpose(-1, -2)
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if m is not None:
            mr = m if m.shape[-2] == 1 else m[..., i0:i1, :]
            s = s.masked_fill(~mr, -math.inf) if mr.dtype == torch.bool else s + mr.to(s.dtype)
        if causal:
            i = torch.arange(i0, i1, device=q.device)[:, None] + (lk - lq)
            s = s.masked_fill(torch.arange(lk, device=q.device) > i, -math.inf)
        out.append(s.topk(min(int(kept), lk), dim=-1).indices)
    return torch.cat(out, 2)


def gains(gain, q):
    """Per-head gains as the preconditioned kernel reads them: fp32, one per query head."""
    g = torch.tensor([float(x) for x in gain], dtype=torch.float32, device=q.device)
    return g.expand(q.shape[1]).contiguous()


def reason(kplan: KernelPlan | None, args) -> str | None:
    """None when a generated kernel runs this call's forward on its device, else why not."""
    q, k, v, mask, scale, softcap, causal, dropout_p, *params = args
    try:
        target = target_for(q.device)
    except RuntimeError as e:
        return str(e)
    if target is None:
        return f"no generated kernels on {q.device.type} (CUDA, or the interpreter under ATTNREWRITE_KERNELS=interpret)"
    cfg, why = select(kplan, q, k, v, mask, scale, softcap, causal, dropout_p, params, target)
    return None if cfg is not None else why


def forward(kplan: KernelPlan | None, args) -> torch.Tensor | None:
    """The op's output from its generated kernel, or None (the reference runs)."""
    if kplan is not None and kplan.host is not None:
        return _host_forward(kplan, args)
    module, call = _call(kplan, args)
    if module is None:
        return None
    return module.forward(*call)[0]


def backward(kplan: KernelPlan | None, grad, args) -> tuple | None:
    """(dq, dk, dv) from the generated backward kernels, or None (the reference's VJP runs)."""
    module, call = _call(kplan, args, backward=True)
    if module is None:
        return None
    return module.backward(grad, *call)


def describe(kplan: KernelPlan | None, q, k, v, mask, scale, softcap, causal, dropout_p, params,
             calls: dict | None = None) -> dict:
    """What the report says about a site's kernel: {"kernel": {name, hash, template, target,
    backward, config, calls}, "kernel_reason": ""} or {"kernel": None, "kernel_reason": why}.
    The target is this process's: "interpret" under ATTNREWRITE_KERNELS=interpret, else "cuda"
    (what the op runs on CUDA tensors). `calls`: how many forward and backward calls ran with the
    configuration inside the `counting()` whose counts are passed (the pipeline counts its check,
    which runs the rewritten program, so a count > 0 shows the kernel really ran for this
    rewrite); without them, this process's total."""
    target = "interpret" if interpreting() else "cuda"
    cfg, reason = select(kplan, q, k, v, mask, scale, softcap, causal, dropout_p, params, target)
    if cfg is None:
        return {"kernel": None, "kernel_reason": reason}
    has_backward = cfg.template in BACKWARD_TEMPLATES
    return {"kernel": {"name": cfg.name, "hash": cfg.hash, "template": cfg.template, "target": target,
                       "backward": "kernel" if has_backward else "reference", "config": cfg.as_dict(),
                       "calls": (CALLS if calls is None else calls).get(cfg, 0)},
            "kernel_reason": "" if has_backward else kplan.note or f"{cfg.template}: forward only; "
                                                                   "the backward runs the reference"}


BACKWARD_TEMPLATES = ("exact", "block_sparse")
CALLS: dict = {}          # KernelConfig -> forward/backward calls made through the ops in this process
_SCOPED = Tally("kernel calls")
counting = _SCOPED.counting  # `with counting() as counts:` {KernelConfig: calls} made inside


def _count(cfg) -> None:
    CALLS[cfg] = CALLS.get(cfg, 0) + 1
    _SCOPED.add(cfg)


# ---------------------------------------------------------------- ops whose kernels are steps of a PyTorch pipeline

@dataclasses.dataclass(frozen=True)
class Host:
    """An op that stays a PyTorch pipeline with generated kernels as some of its steps
    (conv-basis: the start search and the FFTs are torch code, the start columns, the
    normalisation and the exact rows are kernels), given in the variant's KernelPlan, so this
    module needs no copy of the pipeline.

      plan(q, k, v, mask, causal, params) -> (causal, key_bias or None, working dtype): how the
          variant would compute the call — what the kernels are specialised on — or a str, why the
          reference runs instead;
      run(module, args, plan) -> the op's output, calling the loaded module's host functions."""
    plan: object
    run: object


def _host_forward(kplan: KernelPlan, args):
    q, k, v, mask, scale, softcap, causal, dropout_p, *params = args
    target = target_for(q.device)
    if target is None:
        return None
    found: list = []
    cfg, _ = select(kplan, q, k, v, mask, scale, softcap, causal, dropout_p, params, target, plan=found)
    if cfg is None:
        return None
    _count(cfg)
    return kplan.host.run(load(cfg), args, found[0])


# ---------------------------------------------------------------- block-sparse: sparse mode=block, and given lists

def uncut_blocks(query_blocks: int, key_blocks: int, block_m: int, block_n: int, lq: int, lk: int,
                 causal: bool, device=None) -> torch.Tensor:
    """(Qblocks, Kblocks) bool: the key blocks every row of a query block sees whole — inside Lk,
    and (causal) at or below the diagonal of the block's first row — so a kept one may be full."""
    i = torch.arange(query_blocks, device=device)[:, None]
    j = torch.arange(key_blocks, device=device)[None, :]
    inside = (j + 1) * block_n <= lk
    return inside & ((j + 1) * block_n - 1 <= i * block_m + lk - lq) if causal else inside


def selected_lists(keep: torch.Tensor, args, block: int, backward: bool) -> tuple:
    """The layout of the kept blocks `keep` (B, H, Qblocks, Kblocks), bool, for the call `args`:
    kept blocks that no element mask cuts are full; for the backward also its transpose."""
    q, k = args[0], args[1]
    full = keep & uncut_blocks(*keep.shape[-2:], block, block, q.shape[-2], k.shape[-2], bool(args[6]), q.device)
    return block_lists(keep, full) + (block_lists(keep.mT, full.mT) if backward else ())


def block_lists(keep: torch.Tensor, full: torch.Tensor | None = None):
    """FlexAttention's layout from block indicators keep/full (B|1, H|1, Qblocks, Kblocks), bool:
    (kv_num, kv_idx, full_num, full_idx), int32, indices in increasing order, valid ones first.
    Blocks in `full` (a subset of keep) skip the element mask; the rest of keep are partial."""
    full = torch.zeros_like(keep) if full is None else full & keep
    partial = keep & ~full

    def lists(ind):
        order = torch.sort((~ind).to(torch.int8), dim=-1, stable=True).indices
        return ind.sum(-1).to(torch.int32), order.to(torch.int32).contiguous()

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(full)
    return kv_num, kv_idx, full_num, full_idx


def block_indicator(num: torch.Tensor, idx: torch.Tensor, blocks: int) -> torch.Tensor:
    """The bool indicator (…, Qblocks, blocks) of the first num entries of each list in idx
    (entries outside [0, blocks) dropped): block_lists' inverse."""
    slot = torch.arange(idx.shape[-1], device=idx.device)
    col = torch.where(slot < num[..., None], idx.long(), blocks).clamp(0, blocks)
    ind = torch.zeros(*col.shape[:-1], blocks + 1, dtype=torch.bool, device=idx.device)
    return ind.scatter_(-1, col, True)[..., :blocks]


def transposed_lists(layout, key_blocks: int) -> tuple:
    """FlexAttention's q_num, q_idx, full_q_num, full_q_idx for a layout: per key block, the query
    blocks whose partial (full) lists name it — what the dK/dV kernel walks."""
    kv_num, kv_idx, full_num, full_idx = layout
    partial, full = block_indicator(kv_num, kv_idx, key_blocks), block_indicator(full_num, full_idx, key_blocks)
    return block_lists((partial | full).mT, full.mT)


class _BlockSparse(torch.autograd.Function):
    """block_sparse_attention under autograd: the generated forward, and the generated backward
    over the layout and its transpose."""

    @staticmethod
    def forward(ctx, q, k, v, call):
        module, mask, scale, layout, key_blocks = call
        ctx.save_for_backward(q, k, v)
        ctx.call = call
        return module.forward(q, k, v, mask, scale, *layout)[0]

    @staticmethod
    def backward(ctx, grad):
        module, mask, scale, layout, key_blocks = ctx.call
        grads = module.backward(grad, *ctx.saved_tensors, mask, scale, *layout, *transposed_lists(layout, key_blocks))
        return (*grads, None)


def block_sparse_attention(q, k, v, layout, block_m: int, block_n: int, *, mask=None, scale=None,
                           softcap: float = 0.0, causal: bool = False) -> torch.Tensor:
    """Attention of q (B, H, Lq, D) over k/v (B|1, Hkv, Lk, D) restricted to the listed key blocks
    (`layout` from block_lists; query blocks of block_m rows, key blocks of block_n keys, both
    multiples of 16), through the generated block_sparse kernel on the tensors' device (CUDA, or
    the interpreter on CPU). Differentiable in q, k and v (the template's backward kernels)."""
    target = target_for(q.device)
    if target is None:
        raise RuntimeError("block_sparse_attention runs on CUDA tensors, or on CPU under ATTNREWRITE_KERNELS=interpret")
    if block_m % 16 or block_n % 16:
        raise ValueError(f"block sizes {block_m}×{block_n}: the block-sparse kernel needs multiples of 16")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cfg, reason = select(EXACT, q, k, v, mask, scale, softcap, causal, 0.0, (), target)
    if cfg is None:
        raise ValueError(f"no block-sparse kernel for this call: {reason}")
    cfg = dataclasses.replace(cfg, template="block_sparse",
                              params=(("SPARSE_M", int(block_m)), ("SPARSE_N", int(block_n))))
    m = prepare_mask(mask, cfg.mask, q, k.shape[-2], target)
    return _BlockSparse.apply(q, k, v, (load(cfg), m, float(scale), tuple(layout), -(-k.shape[-2] // block_n)))
