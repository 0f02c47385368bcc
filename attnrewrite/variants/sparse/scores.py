"""The pieces every sparse mode shares: query chunks, masked scores, a softmax whose dead rows give
zeros, the window band."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 20     # scores per query chunk (4 MB in fp32): peak memory is a few such tensors
NEG_INF = -math.inf


def _chunks(lq: int, per_row: int, align: int = 1, most: int | None = None):
    """Row ranges [i0, i1) of ≤ CHUNK_ELEMENTS // per_row rows (≤ most), a multiple of `align`."""
    rows = max(1, CHUNK_ELEMENTS // max(per_row, 1))
    rows = max(align, min(rows, most or rows) // align * align)
    return [(i, min(i + rows, lq)) for i in range(0, lq, rows)]


def _mask_rows(mask, i0: int, i1: int, lq: int):
    """The mask's rows for queries i0..i1 (a broadcast row axis stays as it is)."""
    if mask is None or mask.dim() < 2 or mask.shape[-2] != lq or lq == 1:
        return mask
    return mask[..., i0:i1, :]


def heads_of(t, hs, h: int):
    """t's entries for heads hs (an index tensor) of h, the head axis being t's third from last — a
    mask, or a plan's (B, H, nq, ·) entry; None, and a head axis broadcast (size ≠ h), stay as they are."""
    if t is None or t.dim() < 3 or t.shape[-3] != h:
        return t
    return t.index_select(t.dim() - 3, hs)


def _apply_mask(s, m):
    """s + the bias m stands for: bool True = attend, float added."""
    if m is None:
        return s
    return s.masked_fill(~m, NEG_INF) if m.dtype == torch.bool else s + m.to(s.dtype)


def _scores(q, keys, scale: float, softcap: float):
    """scale·q·kᵀ, soft-capped; the scale goes on q (c×D, not c×Lk)."""
    s = (q * scale) @ keys.transpose(-1, -2)
    return softcap * torch.tanh(s / softcap) if softcap else s


def _dense_scores(q, kx, mask, scale, softcap, causal, i0, i1):
    """Masked scores of queries i0..i1 against every key they may see: (B, H, i1 − i0, n).

    n = Lk, or with `causal` only the keys up to the chunk's last diagonal (those after it are
    invisible to every row of the chunk: half the work on average).
    """
    lq, lk = q.shape[-2], kx.shape[-2]
    n = min(lk, max(i1 + lk - lq, 1)) if causal else lk
    m = _mask_rows(mask, i0, i1, lq)
    s = _apply_mask(_scores(q[:, :, i0:i1], kx[:, :, :n], scale, softcap),
                    m[..., :n] if m is not None and m.shape[-1] == lk else m)
    if causal:                                                  # key j visible iff j <= i + Lk − Lq
        i = torch.arange(i0, i1, device=q.device)[:, None] + (lk - lq)
        s = s.masked_fill(torch.arange(n, device=q.device) > i, NEG_INF)
    return s


def _softmax(s):
    """Softmax over keys; a row with no finite score gives zeros (and zero, not NaN, gradients)."""
    top = s.detach().amax(-1, keepdim=True)
    return _normalise(torch.exp(s - top.masked_fill(top == NEG_INF, 0.0)))  # a dead row: all exp(−inf) = 0


def _normalise(w):
    """w / Σw over keys; an all-zero row stays zero (divided by 1, so its gradient stays finite)."""
    z = w.sum(-1, keepdim=True)
    return w / torch.where(z > 0, z, 1.0)


def _band(o: dict, lq: int, lk: int, causal: bool):
    """(before, after): row i's band is i' − before ≤ j ≤ i' + after, i' = i + Lk − Lq."""
    if o["band"] == "backward" or (o["band"] == "auto" and causal):
        return min(o["window"], lk) - 1, 0                     # `window` keys ending at the diagonal
    half = min(o["window"] // 2, max(lq, lk))                   # |j − i'| ≤ window // 2
    return half, half


def _in_window(i, j, o, lq, lk, causal):
    """Ωᵢ membership for window mode: broadcast rows i (c, 1) against keys j (m,)."""
    before, after = _band(o, lq, lk, causal)
    ip = i + (lk - lq)
    keep = ((j >= ip - before) & (j <= ip + after)) | (j < o["sinks"])
    return keep & (j <= ip) if causal else keep


def _window_keys(i0, i1, o, lq, lk, causal, device):
    """The keys any row in i0..i1 may keep: the sinks and the band's contiguous span, sorted, distinct."""
    before, after = _band(o, lq, lk, causal)
    j0 = min(max(i0 + lk - lq - before, 0), lk)
    j1 = min(max(i1 - 1 + lk - lq + after + 1, 0), lk)
    j = torch.cat([torch.arange(min(o["sinks"], lk), device=device), torch.arange(j0, j1, device=device)]).unique()
    return j if j.numel() else torch.zeros(1, dtype=torch.long, device=device)   # (a row set with no key)



def _dropout(p, dropout_p: float):
    return F.dropout(p, dropout_p, training=True) if dropout_p else p


def _take(vx, idx):
    """Rows of a contiguous vx (B, H, Lk, D) at key indices idx (B, H, c, k): (B, H, c, k, D)."""
    b, h, lk, d = vx.shape
    flat = idx + lk * torch.arange(b * h, device=idx.device).view(b, h, 1, 1)   # row in (B·H·Lk, D)
    return vx.view(b * h * lk, d).index_select(0, flat.flatten()).view(*idx.shape, d)
