"""The start columns s₀ = 0 < s₁ < … of each head and triangle (`starts`, see the package notes):
ranked by the estimated difference norm ‖bⱼ‖ (norm), binary-searched as the co-authors' code (search),
and the k score columns they read."""
from __future__ import annotations

import math

import torch

from .convolve import is_dense

SAMPLED_DIAGONALS = 40    # diagonals read to estimate ‖bⱼ‖ for the start search
DIAG_BAND = 64            # sampled diagonals closer than this to the main one come from one banded matmul


def sampled_offsets(n: int) -> list[int]:
    """The diagonals t < n that `find_starts` reads at length n: all of t < 8, then SAMPLED_DIAGONALS
    log-spaced ones, sorted (the ONNX lowerings tabulate the same list)."""
    grid = torch.logspace(0, math.log10(max(n - 1, 1)), SAMPLED_DIAGONALS).long().tolist()
    return sorted(t for t in {*range(min(8, n)), *grid} if t < n)


def scores(q, kt, softcap):
    """q·kᵀ, soft-capped when softcap is set (q already scaled)."""
    s = q @ kt
    return softcap * torch.tanh(s / softcap) if softcap else s


def find_starts(q, k, count: int, eps: float, strict: bool, weight, softcap=0.0) -> torch.Tensor:
    """(G, count) sorted start columns per head: 0 and the columns with the largest estimated ‖bⱼ‖.

    ‖bⱼ‖² is estimated on sampled diagonals t (all of t < 8, then log-spaced), each weighted by
    the gap to the next sampled one; keys the mask removes (weight 0) never need a column.
    Candidates below eps·max repeat column 0 instead (an empty block: fewer real starts).
    """
    g, n, _ = q.shape
    count = min(count, n)
    if count == n:
        return torch.arange(n, device=q.device).expand(g, n)
    offsets = [t for t in sampled_offsets(n) if not (strict and t == 0)]
    gaps = [b - a for a, b in zip(offsets, offsets[1:] + [n])]
    rank = torch.float64 if is_dense(n) else torch.float32         # long inputs: half the ranking's traffic
    gap = torch.tensor(gaps, dtype=rank, device=q.device)
    j = torch.arange(n, device=q.device)
    dead = (j[None, :] + torch.tensor(offsets, device=q.device)[:, None]) >= n   # (T, n): no row j + t
    d = _diagonals(q.float(), k.float(), offsets).to(rank)         # the scores need no float64 for a ranking
    if softcap:
        d = softcap * torch.tanh(d / softcap)
    d.masked_fill_(dead, -math.inf)
    h = d.sub_(d.flatten(1).amax(-1)[:, None, None]).exp_()       # H[j + t, j] (shared shift)
    b = h[..., 1:] - h[..., :-1]                                   # bⱼ[t] = H[j+t, j] − H[j+t−1, j−1], j ≥ 1
    b.masked_fill_(dead[:, 1:], 0.0)
    norm2 = torch.zeros(g, n, dtype=rank, device=q.device)
    norm2[:, 1:] = (b.square_() * gap[:, None]).sum(1)
    norm2 = norm2 * weight
    norm2[:, 0] = math.inf
    top, idx = norm2.topk(count, dim=-1)
    floor = (eps * eps) * top[:, 1:2] if count > 1 else top[:, :1]
    idx = torch.where((top > floor) | (idx == 0), idx, torch.zeros_like(idx))
    return idx.sort(-1).values


def _diagonals(q, k, offsets: list[int]) -> torch.Tensor:
    """(G, T, n) raw scores s[j + t, j] for the given offsets t (0 past the end).

    Offsets below DIAG_BAND come from one banded product (each block of DIAG_BAND rows against
    the 2·DIAG_BAND keys ending with it: matmul speed, 2·DIAG_BAND·n·d per head); the
    others are one slice dot product each (n·d).
    """
    g, n, dim = q.shape
    out = torch.zeros(g, len(offsets), n, dtype=q.dtype, device=q.device)
    short = [(i, t) for i, t in enumerate(offsets) if t < DIAG_BAND]
    if short:
        b = DIAG_BAND
        nb = -(-n // b)
        qb = torch.nn.functional.pad(q, (0, 0, 0, nb * b - n)).view(g, nb, b, dim)
        kb = torch.nn.functional.pad(k, (0, 0, b, nb * b - n)).unfold(1, 2 * b, b)   # (G, nb, d, 2b)
        band = qb @ kb                                             # [a + r, c] = s[a + r, a − b + c]
        for i, t in short:                                         # c = r + b − t
            out[:, i, :n - t] = band.diagonal(b - t, 2, 3).reshape(g, nb * b)[:, t:n]
    for i, t in enumerate(offsets):
        if t >= DIAG_BAND:
            out[:, i, :n - t] = torch.linalg.vecdot(q[:, t:], k[:, :n - t])
    return out


def search_starts(q, k, count: int, delta: float, segment: int, strict: bool, softcap=0.0) -> torch.Tensor:
    """(G, count) sorted start columns per head by binary search (`starts=search`, see the package notes).

    Start 0 first; then, after start s, the search runs over j ∈ (s, n − T] (T = segment): a
    probe j is "different" when Σₜ |s[j + t, j] − s[s + t, s]| ≥ delta (t counted from the
    diagonal, from 1 below it if strict), and the search narrows to the left of a different
    probe, to the right of an equal one — the first different column when the difference is
    monotone in j, some column otherwise, as in the co-authors' code. Heads are searched
    together; a head with no column left repeats column 0 (an empty block).
    """
    g, n, dim = q.shape
    count = min(count, n)
    if count == n:
        return torch.arange(n, device=q.device).expand(g, n)
    low = 1 if strict else 0                                       # first row of a segment below column j
    seg = max(1, min(segment, n - low - 1))
    last = n - low - seg                                           # the last column whose segment fits
    t = torch.arange(seg, device=q.device) + low

    def probe(cols):                                               # (G,) columns -> (G, T) scores s[j + t, j]
        qs = q.gather(1, (cols[:, None] + t).clamp(max=n - 1)[..., None].expand(-1, -1, dim))
        kc = k.gather(1, cols[:, None, None].expand(-1, 1, dim))
        s = torch.linalg.vecdot(qs, kc)
        return softcap * torch.tanh(s / softcap) if softcap else s

    cur = torch.zeros(g, dtype=torch.long, device=q.device)
    ref = probe(cur)
    found = [cur]
    for _ in range(count - 1):
        lo, hi = cur + 1, torch.full_like(cur, max(last, 0))
        done = lo > hi
        lo = torch.minimum(lo, hi)
        while bool((lo < hi).any()):
            mid = (lo + hi) // 2
            differs = (probe(mid) - ref).abs().sum(-1) >= delta
            live = lo < hi
            hi = torch.where(live & differs, mid, hi)
            lo = torch.where(live & ~differs, mid + 1, lo)
        cur = torch.where(done, cur, hi)
        ref = torch.where(done[:, None], ref, probe(cur))
        found.append(torch.where(done, torch.zeros_like(hi), hi))
    return torch.stack(found, -1).sort(-1).values


def _start_columns(q, k, starts, softcap, strict):
    """(G, k, n) raw scores col[i, t] = s[sᵢ + t, sᵢ] (−inf past the end, and on the diagonal if strict)."""
    g, n, _ = q.shape
    ks = k.gather(1, starts[..., None].expand(-1, -1, k.shape[-1]))        # (G, k, d)
    s = scores(q, ks.transpose(1, 2), softcap).transpose(1, 2)           # (G, k, n): s[r, sᵢ]
    t = torch.arange(n, device=q.device)
    rows = starts[..., None] + t                                           # sᵢ + t
    cols = s.gather(2, rows.clamp(max=n - 1))
    dead = rows >= n
    if strict:
        dead = dead | (t == 0)
    return cols.masked_fill(dead, -math.inf)

