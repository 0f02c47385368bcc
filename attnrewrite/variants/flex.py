"""FlexAttention for the normal form: the mask, soft-cap and a variant's key set as a BlockMask.

`flex(q, k, v, mask, scale, softcap, keep, blocks, traced)` computes softmax over the keys
that `keep(b, h, i, j)` admits (and the mask does not remove), visiting only the key blocks
`blocks` names — a (keep, full) pair of (Qblocks, Kblocks) bool tensors over blocks of
BLOCK rows and keys, `full` marking blocks that every pair of keeps (keep is then not
evaluated there). A boolean mask enters the mask_mod, an additive one and the soft-cap the
score_mod. Rows that keep no key come out as zeros, as the references give them.

Eagerly (`traced=False`) FlexAttention runs compiled — on CPU that is Inductor's C++ flex
template — once per configuration (torch.compile caches by shape and dtype); inside a
graph being traced (`traced=True`: the compile backend's lowering) the plain higher-order
op is emitted and Inductor compiles it with the rest of the graph.
"""
from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..kernels import block_lists
from .base import kv_mismatch

BLOCK = 128                      # FlexAttention's default block (rows and keys)
RECOMPILE_LIMIT = 64             # configurations (shapes, dtypes, masks, window settings) compiled per process
DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float16, torch.bfloat16, torch.float32)}


def covers(q, k, v, mask, dropout_p: float) -> str | None:
    """None when `flex` can run this call, else why not."""
    if dropout_p:
        return "dropout is active: FlexAttention draws no dropout mask"
    allowed = DTYPES.get(q.device.type)
    if allowed is None:
        return f"FlexAttention runs on CPU and CUDA, not {q.device.type}"
    if q.dtype not in allowed or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"FlexAttention on {q.device.type} takes {', '.join(str(d) for d in allowed)} (q {q.dtype})"
    if (why := kv_mismatch(q, k)) is not None:
        return why
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "a gradient is wanted: FlexAttention has no backward on CPU"
    if not all(isinstance(x, int) for x in (*q.shape, *k.shape, *v.shape)):
        return "sizes are symbolic: the block layout is built for static sizes"
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        return f"a {mask.dtype} mask is neither boolean nor additive"
    if q.shape[-1] != v.shape[-1]:
        return "the value head dim differs from the query's"
    return None


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(flex_attention, dynamic=False)


def _indexer(m: torch.Tensor):
    """(b, h, i, j) -> m's entry, broadcast axes read at 0."""
    m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
    sb, sh, sq = (m.shape[0] > 1, m.shape[1] > 1, m.shape[2] > 1)

    def at(b, h, i, j):
        return m[b if sb else 0, h if sh else 0, i if sq else 0, j]
    return at


def flex(q, k, v, mask, scale: float, softcap: float, keep, blocks, traced: bool = False):
    lq, lk = q.shape[-2], k.shape[-2]
    if k.shape[0] != q.shape[0]:
        k, v = k.expand(q.shape[0], *k.shape[1:]), v.expand(q.shape[0], *v.shape[1:])
    allowed = _indexer(mask) if mask is not None and mask.dtype == torch.bool else None
    bias = _indexer(mask.to(q.dtype)) if mask is not None and mask.dtype != torch.bool else None

    def mask_mod(b, h, i, j):
        kept = keep(b, h, i, j)
        return kept & allowed(b, h, i, j) if allowed is not None else kept

    score_mod = None
    if softcap or bias is not None:
        cap = float(softcap)

        def score_mod(s, b, h, i, j):
            if cap:
                s = cap * torch.tanh(s / cap)
            return s + bias(b, h, i, j) if bias is not None else s

    keep_blocks, full_blocks = blocks
    if mask is not None:                           # an element mask cuts every block: none is full
        full_blocks = torch.zeros_like(full_blocks)
    # the transposed (per key block) lists serve only a backward; building them vmaps, which fails
    # inside an op called from a compiled graph — so only when a gradient is wanted here
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    kv_num, kv_idx, full_num, full_idx = block_lists(keep_blocks[None, None], full_blocks[None, None])
    block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK,
                                          mask_mod=mask_mod, seq_lengths=(lq, lk), compute_q_blocks=grad)
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=float(scale), enable_gqa=q.shape[1] != k.shape[1])
    if traced:             # (Inductor's CPU template reads q, k and v as buffers of their own: no views)
        q, k, v = (torch.ops.aten.clone.default(t, memory_format=torch.contiguous_format) for t in (q, k, v))
        return flex_attention(q, k, v, **kwargs)
    if not grad:           # inside the op's forward: its own autograd formula carries the gradient
        q, k, v = q.detach(), k.detach(), v.detach()
    # one compile per configuration, and more configurations than Dynamo's default 8 per function
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        return _compiled()(q, k, v, **kwargs)


def block_ranges(lq: int, lk: int, device):
    """Per query block its first and last row's key position (i' = i + Lk − Lq), (Qblocks, 1);
    per key block its first and last key, (1, Kblocks); and whether each key block is whole."""
    nq, nk = -(-lq // BLOCK), -(-lk // BLOCK)
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    q_lo, q_hi = i * BLOCK + lk - lq, torch.clamp((i + 1) * BLOCK, max=lq) - 1 + lk - lq
    k_lo, k_hi = j * BLOCK, torch.clamp((j + 1) * BLOCK, max=lk) - 1
    whole = ((j + 1) * BLOCK <= lk) & ((i + 1) * BLOCK <= lq)
    return q_lo, q_hi, k_lo, k_hi, whole
