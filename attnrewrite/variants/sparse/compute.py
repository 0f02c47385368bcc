"""The reference: each chunk of query rows in turn, checkpointed under autograd; block mode's
selection alone (for the kernel); window mode on FlexAttention."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import flex
from ..base import compute_dtype, expand_kv
from ..impl import Implementation
from . import heads
from .blocks import _block_choice, _block_keep, _block_plan, _budget_chunks, _plan_rows, _pooled_out, _select
from .options import MODE_KEYS, _ORDER
from .scores import (NEG_INF, _apply_mask, _band, _chunks, _dense_scores, _dropout, _in_window, _mask_rows,
                     _normalise, _scores, _softmax, _take, _window_keys, heads_of)


def selection_plan(qc, kx, mask, causal: bool, o: dict, scale: float, softcap: float) -> dict | None:
    """What a call needs once before its chunks: mode=heads' per-head selection, or block and topk's
    (select=pooled, per-head densities); None when each chunk selects on its own."""
    if o["mode"] == "heads":
        return heads.plan(qc, kx, mask, causal, o, scale, softcap)
    return _block_plan(qc, kx, mask, causal, o, scale, softcap)


def _chunk_out(q, kx, vx, mask, scale, softcap, causal, dropout_p, o, i0, i1, n_keep=None):
    lq, lk = q.shape[-2], kx.shape[-2]
    if o["mode"] == "window":                  # score only the sinks + the chunk's band span
        j = _window_keys(i0, i1, o, lq, lk, causal, q.device)
        s = _scores(q[:, :, i0:i1], kx.index_select(2, j), scale, softcap)
        s = s.masked_fill(~_in_window(torch.arange(i0, i1, device=q.device)[:, None], j, o, lq, lk, causal), NEG_INF)
        m = _mask_rows(mask, i0, i1, lq)
        p = _softmax(_apply_mask(s, m if m is None or m.shape[-1] == 1 else m[..., j]))
        return _dropout(p, dropout_p) @ vx.index_select(2, j)
    s = _dense_scores(q, kx, mask, scale, softcap, causal, i0, i1)      # (B, H, c, n ≤ Lk): c rows
    if o["mode"] == "topk":                    # softmax over the k best scores only, V at their keys
        top, idx = s.topk(min(o["k"], s.shape[-1]), dim=-1)
        return (_dropout(_softmax(top), dropout_p)[..., None, :] @ _take(vx, idx)).squeeze(-2)
    p = _softmax(s)                            # block: qᵢ = pᵢ·1_Ω / mᵢ (selection not differentiated)
    kept = p * _block_keep(s.detach(), p.detach(), o["block"], o["density"], o["mass"], n_keep)
    return _dropout(_normalise(kept), dropout_p) @ vx[:, :, :s.shape[-1]]


def _row_chunks(q, kx, vx_dim, o, causal, plan=None):
    b, h, lq, _ = q.shape
    lk = kx.shape[-2]
    if o["mode"] == "window":                  # a chunk of c rows scores c + band + sinks keys
        width = sum(_band(o, lq, lk, causal)) + 1
        return _chunks(lq, b * h * (2 * width + min(o["sinks"], lk)), most=max(width, 64))
    if plan is not None and plan["pooled"]:    # c rows score kb blocks of keys
        return _budget_chunks(plan["n_keep"], lq, b * h, o)
    if o["mode"] == "topk":                    # c rows: c·Lk scores, then V gathered at c·k keys
        return _chunks(lq, b * h * (lk + min(o["k"], lk) * vx_dim))
    return _chunks(lq, b * h * lk, o["block"])


def reference(q, k, v, mask, scale: float, softcap: float, causal: bool, dropout_p: float,
              mode: str, top_k: int, window: int, sinks: int, band: str, block: int,
              density: float, mass: float, select: str = "exact", head_density=(), head_pattern=(),
              last: int = 64):
    o = dict(zip(_ORDER, (mode, top_k, window, sinks, band, block, density, mass, select, tuple(head_density),
                          tuple(head_pattern), last)))
    if mode not in MODE_KEYS:
        raise ValueError(f"sparse: unknown mode {mode!r}")
    cdt = compute_dtype(q.dtype)               # half inputs computed in fp32
    qc, kx, vx = q.to(cdt), expand_kv(q, k).to(cdt), expand_kv(q, v).to(cdt).contiguous()
    lq, lk = qc.shape[-2], kx.shape[-2]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    plan = selection_plan(qc, kx, mask, causal, o, scale, softcap) if lq and lk else None
    if plan is not None and plan["pooled"]:    # queries, keys and values padded to whole blocks, once
        qp, kp, vp = (F.pad(x, (0, 0, 0, -x.shape[-2] % block)) for x in (qc, kx, vx))
    else:
        qp, kp, vp = qc, kx, vx
    kw = dict(scale=scale, softcap=softcap, causal=causal, dropout_p=dropout_p, o=o, lq=lq, lk=lk, grad=grad)
    groups = _head_groups(plan, qc.shape[1])
    if groups is None:
        out = _attend(qc, kx, vx, qp, kp, vp, mask, plan, **kw)
    else:                                      # heads with unlike budgets, apart (then back in order)
        h = qc.shape[1]
        parts = [_attend(*(x.index_select(1, hs) for x in (qc, kx, vx, qp, kp, vp)), heads_of(mask, hs, h),
                         {key: heads_of(x, hs, h) if torch.is_tensor(x) else x for key, x in plan.items()}, **kw)
                 for hs in groups]
        order = torch.cat(groups).argsort().to(q.device)
        out = None if any(p is None for p in parts) else torch.cat(parts, 1).index_select(1, order)
    if out is None:
        return q.new_zeros((*q.shape[:-1], v.shape[-1]))
    return out.to(q.dtype)


def _attend(qc, kx, vx, qp, kp, vp, mask, plan, *, scale, softcap, causal, dropout_p, o, lq, lk, grad):
    """The op's rows chunk by chunk (checkpointed under autograd): (B, H, Lq, Dv), None without rows.
    qp, kp, vp: qc, kx, vx padded to whole blocks for a pooled plan."""
    outs = []
    for i0, i1 in _row_chunks(qc, kx, vx.shape[-1], o, causal, plan):
        kw = dict(mask=mask, scale=scale, softcap=softcap, causal=causal, dropout_p=dropout_p, o=o, i0=i0, i1=i1)
        if plan is None:
            fn = functools.partial(_chunk_out, **kw)
        elif plan["pooled"]:
            idx, valid = _select(plan, o, i0, i1)
            fn = functools.partial(_pooled_out, **kw, lq=lq, lk=lk, idx=idx, valid=valid)
        else:                                  # exact ranking, per-head budgets
            fn = functools.partial(_chunk_out, **kw, n_keep=_plan_rows(plan, i0, i1, o["block"])["n_keep"])
        args = (qp, kp, vp) if plan is not None and plan["pooled"] else (qc, kx, vx)
        # under autograd, recompute each chunk in backward instead of keeping its scores
        outs.append(checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args))
    return torch.cat(outs, 2) if outs else None


def _head_groups(plan, h: int):
    """For a gathered-block plan whose heads keep unlike numbers of blocks (per-head budgets), the
    heads in groups of alike budgets — the power of two at or above each head's largest — else
    None. Every head of a chunk gathers as many blocks as the chunk's largest budget, so one group
    would make a head keeping 3 % of the blocks pay for one keeping 25 %."""
    if plan is None or not plan["pooled"] or plan["n_keep"].shape[1] != h or h == 1:
        return None
    most = plan["n_keep"].amax(dim=(0, 2, 3)).tolist()
    buckets = {}
    for i, x in enumerate(most):
        buckets.setdefault(1 << (int(x) - 1).bit_length(), []).append(i)
    if len(buckets) == 1:
        return None
    device = plan["n_keep"].device
    return [torch.tensor(v, device=device) for _, v in sorted(buckets.items())]


def kept_blocks(q, k, v, mask, scale: float, softcap: float, causal: bool, dropout_p: float,
                mode: str, top_k: int, window: int, sinks: int, band: str, block: int,
                density: float, mass: float, select: str = "exact", head_density=(), head_pattern=(),
                last: int = 64):
    """Block (and heads) mode's selection alone, as `reference` makes it: (B, H, ⌈Lq/block⌉, ⌈Lk/block⌉) bool,
    the key blocks each query block keeps (the same chunks, ranking and budgets; no output).
    The block-sparse kernel runs on it (KERNEL below)."""
    o = dict(zip(_ORDER, (mode, top_k, window, sinks, band, block, density, mass, select, tuple(head_density),
                          tuple(head_pattern), last)))
    cdt = compute_dtype(q.dtype)
    with torch.no_grad():
        qc, kx = q.to(cdt), expand_kv(q, k).to(cdt)
        (b, h, lq, _), lk = qc.shape, kx.shape[-2]
        keep = torch.zeros(b, h, -(-lq // block), -(-lk // block), dtype=torch.bool, device=q.device)
        plan = selection_plan(qc, kx, mask, causal, o, scale, softcap) if lq and lk else None
        if plan is not None and plan["pooled"]:
            return keep.scatter_(-1, plan["idx"], plan["valid"])
        for i0, i1 in _row_chunks(qc, kx, v.shape[-1], o, causal, plan):
            s = _dense_scores(qc, kx, mask, scale, softcap, causal, i0, i1)
            n_keep = None if plan is None else _plan_rows(plan, i0, i1, block)["n_keep"]
            chosen = _block_choice(s, _softmax(s), block, density, mass, n_keep)
            keep[:, :, i0 // block:i0 // block + chosen.shape[-2], :chosen.shape[-1]] = chosen
    return keep


# ---------------------------------------------------------------- window on FlexAttention

FLEX_MIN_KEYS = 1024         # below this many keys the chunked reference is as fast, with nothing to compile


def _flex_window_covers(q, k, v, mask, scale, softcap, causal, dropout_p, mode, *params):
    if mode != "window":
        return f"mode={mode}: FlexAttention serves window mode"
    why = flex.covers(q, k, v, mask, dropout_p)
    if why is None and k.shape[-2] < FLEX_MIN_KEYS:
        why = f"{k.shape[-2]} keys: below {FLEX_MIN_KEYS} the chunked reference is as fast as FlexAttention"
    return why


def _flex_window(q, k, v, mask, scale, softcap, causal, dropout_p, mode, top_k, window, sinks, band,
                 *rest, traced: bool = False):
    """Window mode as FlexAttention: the band and sinks (and causal) as its mask_mod, and the key
    blocks they touch as its BlockMask — blocks the band or the sinks cover whole are full."""
    o = {"window": window, "sinks": sinks, "band": band}
    lq, lk = q.shape[-2], k.shape[-2]
    before, after = _band(o, lq, lk, causal)
    after = min(after, 0) if causal else after
    off = lk - lq

    def keep(b, h, i, j):
        ip = i + off
        kept = ((j >= ip - before) & (j <= ip + after)) | (j < sinks)
        return kept & (j <= ip) if causal else kept

    q_lo, q_hi, k_lo, k_hi, whole = flex.block_ranges(lq, lk, q.device)
    sink_any, sink_full = k_lo < sinks, k_hi < sinks
    if causal:
        sink_any, sink_full = sink_any & (k_lo <= q_hi), sink_full & (k_hi <= q_lo)
    blocks = ((k_hi >= q_lo - before) & (k_lo <= q_hi + after)) | sink_any
    full = (((k_lo >= q_hi - before) & (k_hi <= q_lo + after)) | sink_full) & whole & blocks
    return flex.flex(q, k, v, mask, scale, softcap, keep, (blocks, full), traced=traced)


FLEX_WINDOW = Implementation("flex", _flex_window_covers, _flex_window,
                             lower=functools.partial(_flex_window, traced=True), seeded=False)
