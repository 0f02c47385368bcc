"""conv-basis — attention as a sum of k sub-convolutions, applied by FFT in O(k·n·d·log n).

Math (after Conv-Basis, arXiv 2405.05219 — the construction is ours, the paper's
algorithm text was not available). Let H = exp(s − c) on and below the diagonal, s the
site's scores (scale·q·kᵀ, soft-capped), c one shift shared by every row. Column j's
basis vector is bⱼ = H[j:, j] − H[j−1:n−1, j−1]; H = Σⱼ S(bⱼ, n−j) exactly, where S(b, m)
is zero but for a bottom-right m×m lower-triangular Toeplitz block with first column b.
Keeping k start columns s₀ = 0 < s₁ < … gives H̃ = Σᵢ S(b̃ᵢ, n−sᵢ), which is H with every
column j ∈ [sᵢ, sᵢ₊₁) replaced by start column sᵢ shifted down by j − sᵢ:

    H̃[r, j] = H[sᵢ + r − j, sᵢ]        (r ≥ j, sᵢ ≤ j < sᵢ₊₁)

so H̃·X = Σᵢ cᵢ ∗ X[sᵢ:sᵢ₊₁] — one causal convolution per start column cᵢ = H[sᵢ:, sᵢ]
(the telescoped form of Σ S(b̃ᵢ), without the differences' cancellation). Only the k
columns of q·kᵀ are computed (O(k·n·d)). Output O = (H̃V) / (H̃·1) row by row.
Bidirectional sites add a second basis for the strictly upper triangle: the same
construction on the reversed sequence.

Applying H̃ (n > DENSE_MAX_N), overlap-save: the rows are cut into nb blocks of P (a power
of two near n / FFT_BLOCKS), and the columns into segments, each one block intersected with
one start's columns (at most nb + k). Every segment of X = [V·w | w] is transformed once
(size 2P), every start column once per block lag (k·nb windows of 2P lags), and output
block o is Σ over segments s of window(owner s, lag o − block s) · X̂ₛ — for every
frequency one (nb × S)·(S × (d+1)) complex product — then one inverse transform per
output block and column. Work O((nb + k)·n·d·log P + (nb + k)·n·d), memory O((nb + k)·n·d).

Start columns (`starts`):
  norm     (default) 0 and the k − 1 columns with the largest difference norm ‖bⱼ‖,
           estimated on ~40 sampled diagonals (O(n·d) each); `eps` drops candidates whose
           norm is below eps·max (fewer than k starts when H is nearly conv).
  search   the recovery of the co-authors' public code (hliuav/k_conv_basis), in our words:
           after start s, binary-search j ∈ (s, n − T] for the first column whose diagonal
           segment (scores s[j + t, j], t < T = `segment`) differs in ℓ1 by at least `delta`
           from the last start's segment — that is, from the running sum of the basis
           vectors built on the scores; O(log n) probes of T·d each per start. Their basis
           b̃ᵢ = exp(b₁ + … + bᵢ) − exp(b₁ + … + bᵢ₋₁) sums to exactly the H̃ above for the
           same starts (the cumulative sums are the start columns' scores), so the
           apply step is shared; we subtract the shift c where they exponentiate raw scores.
  0,5,9    fixed columns (0 is always added).
k ≥ n keeps every column: H̃ = H, exact to round-off.

Numerics: c is shared by all rows (a per-row max breaks the Toeplitz structure), so a row
whose scores sit far below the global maximum has a normaliser H̃·1 of the size of the
FFT's round-off. `precision`: float64, or float32 (scores, kernels, transforms); `auto` is
float32 on the FFT path for float32/half inputs and float64 otherwise (the dense path and
float64 inputs). Rows whose normaliser is below `RELIABLE` (float64) or `RELIABLE_F32`
times its FFT error estimate (unit round-off × log₂ of the transform size × Σ over the
segments reaching the row's block of ‖window‖·‖w on the segment‖) are recomputed exactly
(O(n·d) each, in the working precision) and counted.
Masks: a key-only bias (padding) and the causal pattern are supported — the key bias
becomes a weight on V and on the ones vector; any other bias keeps the site exact.
Dropout: with dropout_p > 0 the op computes exact attention with dropout (the same mask as
`exact` for the same seed); the rewrite keeps such sites exact anyway.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from onnx import helper

from ..kernels.dispatch import Host, KernelPlan
from ..passes import onnx_rewrite as R
from . import costing
from .exact import attention as exact_attention
from .base import (BACKWARD_OPS, MASK_REMOVED, Param, define_attention_op, expand_kv, masked_scores, safe_softmax,
                   Variant)

NAME = "conv_basis"
OP_NAME = "conv_basis_attention"


class StartsParam(Param):
    """`starts`: norm | search (found per input) or fixed columns ("0,5,9"); None means norm."""

    def parse(self, key: str, value):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "norm")):
            return "norm"
        if isinstance(value, str) and value.strip().lower() == "search":
            return "search"
        try:
            return super().parse(key, value)
        except ValueError:
            raise ValueError(f"{key}={value!r} is not norm, search or a comma-separated list of "
                             "non-negative integers") from None


PARAMS = {
    "k": Param(16, int, "number of basis (start) columns per head and triangle", minimum=1),
    "starts": StartsParam("norm", "ints", "start columns: norm (largest difference norm), search (binary "
                          "search, as the co-authors' code), or fixed columns 0,5,9 (0 is always added)"),
    "eps": Param(0.0, float, "starts=norm: skip candidates with difference norm below eps × the largest",
                 minimum=0.0),
    "delta": Param(1e-9, float, "starts=search: ℓ1 difference (in scaled logits) that ends a column's block",
                   minimum=0.0),
    "segment": Param(1, int, "starts=search: diagonal entries compared per probe (T)", minimum=1),
    "precision": Param("auto", str, "float32 | float64 | auto (float32 on the FFT path for float32/half inputs)",
                       choices=("auto", "float32", "float64")),
}
RELIABLE = 1e6            # float64: a row's normaliser must exceed 1e6 × its FFT error estimate (≈ 6 digits)
RELIABLE_F32 = 1e3        # float32: the same test with float32's unit round-off (≈ 3 digits, worst case)
SAMPLED_DIAGONALS = 40    # diagonals read to estimate ‖bⱼ‖ for the start search
DENSE_MAX_N = 512         # up to this length H̃ is built densely (same matrix; FFTs cost more there)
FFT_CHUNK = 1 << 26       # elements of X̂ segments per chunk of heads (heads × segments × columns × size)
FFT_BLOCKS = 16           # the overlap-save block P is the power of two ≥ n / FFT_BLOCKS ...
FFT_MIN_BLOCK = 16        # ... and at least this
DIAG_ROWS = 64            # rows sampled per head for the basis-error diagnostic
DIAG_BAND = 64            # sampled diagonals closer than this to the main one come from one banded matmul
UNIT = {torch.float32: 2.0 ** -23, torch.float64: 2.0 ** -52}   # unit round-off of the working precisions


# ----------------------------------------------------------------------------- masks

def split_mask(mask, causal: bool, n: int):
    """(causal, key_bias (B', H', n) or None) when mask = causal pattern + a per-key bias; else None.

    Bias entries at or below MASK_REMOVED count as removed (-inf).
    """
    if mask is None:
        return causal, None
    m = mask
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=torch.float64, device=m.device).masked_fill(~m, -math.inf)
    m = m.double()
    m = m.masked_fill(m <= MASK_REMOVED, -math.inf)
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.shape[-2] == 1:
        return causal, m[..., 0, :]
    upper = torch.ones(n, n, dtype=torch.bool, device=m.device).triu(1)
    if not causal and bool((m[..., upper] == -math.inf).all()):
        causal = True
    key = m[..., -1, :] if causal else m[..., 0, :]
    expect = key.unsqueeze(-2).expand(m.shape)
    seen = ~upper if causal else torch.ones_like(upper)
    if not torch.equal(m[..., seen], expect[..., seen]):
        return None
    return causal, key


# ----------------------------------------------------------------------------- G heads at once

def _scores(q, kt, softcap):
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
    grid = torch.logspace(0, math.log10(max(n - 1, 1)), SAMPLED_DIAGONALS).long().tolist()
    offsets = sorted(t for t in {*range(min(8, n)), *grid} if t < n and not (strict and t == 0))
    gaps = [b - a for a, b in zip(offsets, offsets[1:] + [n])]
    rank = torch.float64 if n <= DENSE_MAX_N else torch.float32    # long inputs: half the ranking's traffic
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
    """(G, count) sorted start columns per head by binary search (`starts=search`, see the module notes).

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
    s = _scores(q, ks.transpose(1, 2), softcap).transpose(1, 2)           # (G, k, n): s[r, sᵢ]
    t = torch.arange(n, device=q.device)
    rows = starts[..., None] + t                                           # sᵢ + t
    cols = s.gather(2, rows.clamp(max=n - 1))
    dead = rows >= n
    if strict:
        dead = dead | (t == 0)
    return cols.masked_fill(dead, -math.inf)


def fft_block(n: int) -> int:
    """The overlap-save block P: the power of two ≥ n / FFT_BLOCKS, at least FFT_MIN_BLOCK."""
    return max(FFT_MIN_BLOCK, 1 << (max(1, -(-n // FFT_BLOCKS)) - 1).bit_length())


def _conv_apply(kern, starts, x):
    """H̃·x = Σᵢ kernᵢ ∗ x[sᵢ:sᵢ₊₁] for G heads: (G, n, m), and the normaliser's error estimate.

    kern (G, k, n) = exp(colᵢ − c), starts (G, k) sorted, x (G, n, m) with the normaliser's
    weights in its last column. n ≤ DENSE_MAX_N: H̃ built densely, one estimate per head
    (G, 1); else overlap-save (module notes), one estimate per row (G, n).
    """
    g, n, m = x.shape
    k = starts.shape[1]
    owner = torch.searchsorted(starts, torch.arange(n, device=x.device).expand(g, n).contiguous(),
                               right=True) - 1                     # start index owning column j
    if n <= DENSE_MAX_N:                                           # short: H̃ itself is cheaper than FFTs
        size = 1 << (2 * n - 1).bit_length()
        sq = torch.zeros(g, k, dtype=x.dtype, device=x.device).scatter_add_(1, owner, x[..., -1] ** 2)
        noise = (torch.linalg.vector_norm(kern, dim=-1) * sq.sqrt()).sum(1, keepdim=True)
        return _dense_apply(kern, owner, x), noise * UNIT[x.dtype] * math.log2(size)
    p = fft_block(n)
    nb, segs = -(-n // p), -(-n // p) + k                          # blocks; segments (an upper bound)
    per = max(1, FFT_CHUNK // (segs * m * 2 * p))
    ys, noises = [], []
    for a in range(0, g, per):
        y, noise = _overlap_save(kern[a:a + per], owner[a:a + per], x[a:a + per], p, nb, segs)
        ys.append(y)
        noises.append(noise)
    return torch.cat(ys), torch.cat(noises)


def _overlap_save(kern, owner, x, p, nb, segs):
    """`_conv_apply`'s FFT path for a chunk of heads (block p, nb blocks, segs segments)."""
    g, n, m = x.shape
    k = kern.shape[1]
    j = torch.arange(n, device=x.device)
    blk = (j // p).expand(g, n)
    key = blk * k + owner                                          # non-decreasing along j
    seg = torch.zeros_like(key)
    seg[:, 1:] = (key[:, 1:] != key[:, :-1]).cumsum(1)            # segment of column j
    seg_blk = torch.zeros(g, segs, dtype=torch.long, device=x.device).scatter_(1, seg, blk)
    seg_own = torch.zeros(g, segs, dtype=torch.long, device=x.device).scatter_(1, seg, owner)
    # X segments (G, m, S, 2P), the first P entries in use, and their spectra
    xs = torch.zeros(g, m, segs * 2 * p, dtype=x.dtype, device=x.device)
    xs.scatter_(2, (seg * 2 * p + j % p)[:, None, :].expand(g, m, n), x.transpose(1, 2))
    xs = xs.view(g, m, segs, 2 * p)
    xspec = torch.fft.rfft(xs)                                     # (G, m, S, P + 1)
    # kernel windows: window (i, δ) holds lags (δ − 1)·P + 1 … (δ + 1)·P of start i
    kp = torch.nn.functional.pad(kern, (p - 1, (nb + 1) * p - (p - 1) - n))
    win = kp.unfold(2, 2 * p, p)                                   # (G, k, nb, 2P)
    wspec = torch.fft.rfft(win).flatten(1, 2)                      # (G, k·nb, P + 1)
    lag = torch.arange(nb, device=x.device)[None, :, None] - seg_blk[:, None, :]   # (G, nb, S): o − block
    pick = (seg_own[:, None, :] * nb + lag.clamp(min=0)).flatten(1)
    live = (lag >= 0).flatten(1)
    tmat = wspec.gather(1, pick[..., None].expand(-1, -1, p + 1)) * live[..., None]
    tmat = tmat.view(g, nb, segs, p + 1).permute(0, 3, 1, 2)      # (G, P + 1, nb, S)
    yspec = tmat @ xspec.permute(0, 3, 2, 1)                       # (G, P + 1, nb, m)
    y = torch.fft.irfft(yspec.permute(0, 2, 3, 1), n=2 * p)[..., p - 1:2 * p - 1]   # (G, nb, m, P)
    y = y.transpose(2, 3).reshape(g, nb * p, m)[:, :n]
    # error estimate of the normaliser, per output block: Σₛ ‖window‖·‖w on segment s‖
    wn = torch.linalg.vector_norm(win, dim=-1).flatten(1)          # (G, k·nb)
    xn = torch.linalg.vector_norm(xs[:, -1], dim=-1)               # (G, S)
    per_block = (wn.gather(1, pick) * live).view(g, nb, segs).mul(xn[:, None, :]).sum(-1)
    noise = per_block.gather(1, blk) * (UNIT[x.dtype] * math.log2(2 * p))
    return y, noise


def _dense_apply(kern, owner, x):
    """The same H̃·x with H̃ built from the k columns: H̃[r, j] = kern_b[r − j], b = owner(j), r ≥ j."""
    g, n, _ = x.shape
    r = torch.arange(n, device=x.device)
    picked = kern.transpose(1, 2).gather(2, owner[:, None, :].expand(g, n, n))   # [g, t, j] = kern_b(j)[t]
    off = (r[:, None] - r[None, :]).expand(g, n, n)                # (G, r, j): r − j
    h = picked.gather(1, off.clamp(0, n - 1)).masked_fill(off < 0, 0.0)
    return h @ x


def _exact_rows(q, k, v, rows, key_bias, causal, softcap):
    """softmax rows of one head recomputed directly, O(len(rows)·n·d)."""
    n, out = k.shape[0], []
    for part in rows.split(1024):                                  # O(1024·n) memory at a time
        s = _scores(q[part], k.T, softcap)
        if key_bias is not None:
            s = s + key_bias
        if causal:
            s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > part[:, None], -math.inf)
        out.append(safe_softmax(s) @ v)
    return torch.cat(out)


def attend_heads(q, k, v, key_bias, causal, softcap, count, starts, eps, stats=None, delta=1e-9, segment=1,
                 steps=None):
    """G heads in q's dtype (float32 or float64): q (G, n, d) already scaled, k (G, n, d), v (G, n, dv),
    key_bias (G, n) or None; starts: "norm", "search" or a list of fixed columns. steps: None (PyTorch
    throughout), or _KernelSteps — the start columns and the normalisation with the exact rows from
    the generated kernels, the rest (start search, FFT apply) the same code."""
    g, n, _ = q.shape
    if key_bias is None:
        w = torch.ones(g, n, dtype=q.dtype, device=q.device)
    else:
        top = key_bias.amax(-1, keepdim=True)
        w = torch.exp(key_bias - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
    x = torch.cat([v * w[..., None], w[..., None]], dim=-1)       # [V·w | w]: numerator and normaliser
    parts = [(q, k, x, w, False)]
    if not causal:                                                 # strictly upper triangle, reversed
        parts.append((q.flip(1), k.flip(1), x.flip(1), w.flip(1), True))
    plans = []
    for qq, kk, _, ww, strict in parts:
        if starts == "search":
            st = search_starts(qq, kk, count, delta, segment, strict, softcap)
        elif isinstance(starts, str) or starts is None:
            st = find_starts(qq, kk, count, eps, strict, ww, softcap)
        else:
            st = torch.tensor(sorted({0, *[min(s, n - 1) for s in starts]}), device=q.device).expand(g, -1)
        st = st.contiguous()
        plans.append((st, _start_columns(qq, kk, st, softcap, strict) if steps is None else
                      steps.start_columns(st, strict)))
    c = torch.stack([cols.flatten(1).amax(-1) for _, cols in plans], -1).amax(-1)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    y = torch.zeros_like(x)
    noise = torch.zeros(g, 1, dtype=x.dtype, device=x.device)
    for (_, _, xx, _, strict), (st, cols) in zip(parts, plans):
        part, err = _conv_apply(torch.exp(cols - c[:, None, None]), st, xx)
        y += part.flip(1) if strict else part
        noise = noise + (err.flip(1) if strict else err)
    reliable = RELIABLE if q.dtype == torch.float64 else RELIABLE_F32
    if steps is not None:
        out, bad = steps.finish(y, noise, reliable)
    else:
        norm = y[..., -1]
        out = y[..., :-1] / norm.clamp_min(torch.finfo(norm.dtype).tiny)[..., None]
        bad = norm <= reliable * noise
        for h in bad.any(-1).nonzero()[:, 0].tolist():
            rows = bad[h].nonzero()[:, 0]
            out[h, rows] = _exact_rows(q[h], k[h], v[h], rows, None if key_bias is None else key_bias[h],
                                       causal, softcap)
    if stats is not None:
        stats["fallback_rows"] = stats.get("fallback_rows", 0) + int(bad.sum())
        stats["rows"] = stats.get("rows", 0) + g * n
        stats.setdefault("starts", []).extend(
            sum(len(set(p[0][h].tolist())) for p in plans) / len(plans) for h in range(g))
        for h in torch.linspace(0, g - 1, min(g, 8)).round().long().unique().tolist():
            stats.setdefault("basis_err", []).append(_basis_error(
                q[h], k[h], None if key_bias is None else key_bias[h], causal, softcap,
                [p[0][h] for p in plans]))
    return out


def _basis_error(q, k, key_bias, causal, softcap, plans):
    """‖Ã − A‖_F / ‖A‖_F on sampled rows of one head, Ã the normalised rows of H̃ (before the fallback),
    in float64 whatever the working precision (plans: each triangle's start columns)."""
    q, k = q.double(), k.double()
    n = q.shape[0]
    plans = [(st.tolist(), _start_columns((q.flip(0) if p else q)[None], (k.flip(0) if p else k)[None],
                                          st[None], softcap, p == 1)[0]) for p, st in enumerate(plans)]
    if key_bias is not None:
        key_bias = key_bias.double()
    rows = torch.linspace(0, n - 1, min(DIAG_ROWS, n), device=q.device).round().long().unique()
    j = torch.arange(n, device=q.device)
    s = _scores(q[rows], k.T, softcap)
    if key_bias is not None:
        s = s + key_bias
    if causal:
        s = s.masked_fill(j[None, :] > rows[:, None], -math.inf)
    exact = safe_softmax(s)
    logits = torch.full((len(rows), n), -math.inf, dtype=q.dtype, device=q.device)
    for p, (st, table) in enumerate(plans):                        # table (k, n): colᵢ[t] = s[sᵢ + t, sᵢ]
        r = (rows if p == 0 else n - 1 - rows)[:, None]            # the row in this part's coordinates
        st_t = torch.tensor(st, device=q.device)
        block = torch.bucketize(j, st_t, right=True) - 1           # start index owning column j
        off = (r - j[None, :]).expand(len(rows), n)                # H̃[r, j] = colᵦ[r − j]
        val = torch.where(j[None, :] <= r, table[block[None, :].expand_as(off), off.clamp(0, n - 1)],
                          torch.tensor(-math.inf, dtype=q.dtype, device=q.device))
        logits = torch.logaddexp(logits, val.flip(-1) if p == 1 else val)
    if key_bias is not None:
        logits = logits + key_bias
    approx = safe_softmax(logits)
    na = torch.linalg.vector_norm(exact)
    return float(torch.linalg.vector_norm(approx - exact) / na) if na > 0 else 0.0


# ----------------------------------------------------------------------------- the op

def working_dtype(precision: str, dtype: torch.dtype, n: int) -> torch.dtype:
    """float32 or float64: as asked, or (auto) float32 on the FFT path for inputs that are not float64."""
    if precision in ("float32", "float64"):
        return getattr(torch, precision)
    return torch.float64 if dtype == torch.float64 or n <= DENSE_MAX_N else torch.float32


def _attend(q, k, v, mask, scale, softcap, causal, dropout_p, count, starts, eps, stats=None,
            delta=1e-9, segment=1, precision="auto"):
    lq, n = q.shape[-2], k.shape[-2]
    split = split_mask(mask, causal, n) if lq == n else None
    if split is None or dropout_p:                                 # not representable: exact
        if stats is not None:
            stats["exact_fallback"] = "mask is not causal + per-key" if split is None else "dropout"
        return exact_attention(q, k, v, mask, scale, softcap, causal, dropout_p)
    causal, key_bias = split
    return _attend_split(q, k, v, key_bias, scale, softcap, causal, count, starts, eps, stats, delta, segment,
                         working_dtype(precision, q.dtype, n))


def _attend_split(q, k, v, key_bias, scale, softcap, causal, count, starts, eps, stats, delta, segment, dt,
                  kernels=None):
    """_attend once the mask is split into causal + key_bias (B', H', n) or None, in working dtype dt;
    kernels: the generated conv_basis module for the op's kernel path (see _KernelSteps), or None."""
    qw = q.to(dt) * scale
    kw, vw = expand_kv(q, k).to(dt), expand_kv(q, v).to(dt)
    b, h, n, d = qw.shape
    kb = None
    if key_bias is not None:
        kb = key_bias.expand(b, h, n).reshape(b * h, n).to(dt)
    steps = None if kernels is None else _KernelSteps(kernels, q, k, v, scale, kb)
    out = attend_heads(qw.reshape(b * h, n, d), kw.reshape(b * h, n, d), vw.reshape(b * h, n, -1), kb,
                       causal, softcap, count, starts, eps, stats, delta, segment, steps)
    return out.reshape(b, h, n, -1).to(q.dtype)


def reference(q, k, v, mask, scale: float, softcap: float, causal: bool, dropout_p: float,
              k_basis: int, starts: list[int] | None, eps: float, search: str | None = "norm",
              delta: float | None = 1e-9, segment: int | None = 1, precision: str | None = "auto"):
    """The op: `starts` fixed columns or None, then `search` (norm | search) finds them per input.
    (The dispatcher drops trailing arguments equal to their defaults: None stands for the default.)"""
    found = starts if starts is not None else (search or "norm")
    return _attend(q, k, v, mask, scale, softcap, causal, dropout_p, k_basis, found, eps, None,
                   1e-9 if delta is None else delta, segment or 1, precision or "auto")




# ----------------------------------------------------------------------------- the op on generated kernels

class _KernelSteps:
    """attend_heads' steps on the generated conv_basis kernels (attnrewrite/kernels/conv_basis.py),
    which read the op's own q, k, v (site dtype, kv heads not repeated) in the working precision."""

    def __init__(self, module, q, k, v, scale, key_bias):
        self.module, self.q, self.k, self.v, self.scale = module, q, k, v, scale
        self.key_bias = None if key_bias is None else key_bias.contiguous()

    def start_columns(self, starts, strict: bool):
        return self.module.start_columns(self.q, self.k, self.scale, starts, strict)

    def finish(self, y, noise, reliable: float):
        """(out (G, n, dv) in q's dtype, bad (G, n)): the normalised rows, the unreliable ones
        recomputed exactly in place."""
        out, bad = self.module.normalise(y, noise, reliable, self.q.dtype)
        rows = bad.flatten().nonzero()[:, 0]
        self.module.exact_rows(self.q, self.k, self.v, self.key_bias, self.scale, rows, out)
        return out, bad


def _kernel_plan(q, k, v, mask, causal: bool, params: tuple):
    """(causal, key bias or None, working dtype) as the reference computes this call, or why the
    kernels do not run (the reference computes exact attention there)."""
    n = k.shape[-2]
    if q.shape[-2] != n:
        return f"conv-basis needs q_len == kv_len (got {q.shape[-2]} and {n}); the op computes exact attention"
    split = split_mask(mask, causal, n)
    if split is None:
        return "the mask is not causal + per-key: the op computes exact attention (PyTorch)"
    precision = params[6] if len(params) > 6 and params[6] else "auto"
    return (*split, working_dtype(precision, q.dtype, n))


def kernel_forward(module, args, plan, stats=None):
    """The op with the generated kernels (`module`): the PyTorch start search, kernel start columns,
    the PyTorch FFT apply, then kernel normalisation and exact rows — the reference's starts and
    fallback rows, its numbers up to round-off. `plan` from _kernel_plan; `stats` as _attend's."""
    q, k, v, mask, scale, softcap, causal, dropout_p, count, fixed, eps, search, delta, segment = \
        (*args, *[None] * 14)[:14]
    causal, key_bias, dt = plan
    return _attend_split(q, k, v, key_bias, scale, softcap, causal, count,
                         fixed if fixed is not None else (search or "norm"), eps, stats,
                         1e-9 if delta is None else delta, segment or 1, dt, kernels=module)


KERNEL = KernelPlan(lambda params, causal: ("conv_basis", ()), host=Host(_kernel_plan, kernel_forward),
                    note="conv_basis: forward only — the start search and the FFT apply run in PyTorch between the "
                         "kernels (start columns; normalisation with the reliability test; exact rows); the "
                         "backward runs the reference")
op = define_attention_op(OP_NAME, reference, "int k_basis, int[]? starts, float eps, str search=\"norm\", "
                         "float delta=1e-09, int segment=1, str precision=\"auto\"", kernel=KERNEL)
backward_op = BACKWARD_OPS[OP_NAME]


def op_args(site, options: dict) -> tuple:
    """(k, fixed starts or None, eps, search mode, delta, segment, precision) — the op's parameters."""
    o = {key: p.default for key, p in PARAMS.items()} | {key: x for key, x in options.items() if x is not None}
    starts = o["starts"]
    fixed = None if isinstance(starts, str) else [int(x) for x in starts]
    return (int(o["k"]), fixed, float(o["eps"]), starts if isinstance(starts, str) else "norm",
            float(o["delta"]), int(o["segment"]), str(o["precision"]))


def prepare(site, samples: list, options: dict):
    """Keep sites the basis cannot represent: cross-attention lengths, a general bias, dropout."""
    for smp in samples:
        q, k = smp["q"], smp["k"]
        if q.shape[-2] != k.shape[-2]:
            return f"conv-basis needs q_len == kv_len (got {q.shape[-2]} and {k.shape[-2]})"
        if split_mask(smp["mask"], smp["causal"], k.shape[-2]) is None:
            return "conv-basis supports causal + per-key (padding) masks only; this bias depends on the query"
        if smp["dropout_p"]:
            return "conv-basis does not apply attention dropout"
    return options


def needs_samples(site, options: dict) -> bool:
    """Whether `prepare` must look at captured values: where the site record leaves its questions
    open — lengths not known equal, dropout (a mask, causal + padding only?, the pipeline
    captures anyway)."""
    return bool(site.dropout) or site.q_len is None or site.q_len != site.kv_len


def auto_ladder(site, options: dict) -> list[dict]:
    n = site.kv_len if isinstance(site.kv_len, int) else 1 << 15
    ladder, k = [], 1
    while k < n:
        ladder.append({"k": k})
        k *= 2
    return ladder + [{"k": n}]


def diagnostics(q, k, v, mask, scale, softcap, causal, options: dict) -> dict:
    stats: dict = {}
    count, fixed, eps, search, delta, segment, precision = op_args(None, options)
    _attend(q, k, v, mask, scale, softcap, causal, 0.0, count, search if fixed is None else fixed, eps, stats,
            delta, segment, precision)
    if "exact_fallback" in stats:
        return {"exact_fallback": stats["exact_fallback"]}
    errs = stats["basis_err"]
    return {"basis_err_max": max(errs), "basis_err_mean": sum(errs) / len(errs),
            "fallback_rows": stats["fallback_rows"], "rows": stats["rows"],
            "starts_mean": sum(stats["starts"]) / len(stats["starts"])}


# ----------------------------------------------------------------------------- ONNX lowering


ONNX_OFFSET_TABLE_N = 4096   # sequence lengths whose sampled-diagonal offsets are tabulated in the model


@functools.lru_cache(maxsize=2)
def _offset_table(n_max: int):
    """(n_max + 1, T) int16: row n = find_starts' sorted offsets for length n, padded with -1."""
    rows = []
    for n in range(n_max + 1):
        grid = torch.logspace(0, math.log10(max(n - 1, 1)), SAMPLED_DIAGONALS).long().tolist()
        rows.append(sorted(t for t in {*range(min(8, n)), *grid} if t < n))
    table = np.full((n_max + 1, max(len(r) for r in rows)), -1, np.int16)
    for n, r in enumerate(rows):
        table[n, :len(r)] = r
    table.flags.writeable = False
    return table


def _onnx_dense(b, site, q, k, v, mask, options: dict) -> str:
    """Standard ONNX ops (onnxruntime CPU), dense: the same H̃ the reference builds for n ≤ DENSE_MAX_N.

    Dense memory: the (B, H, n, n) scores S = softcap(scale·q·kᵀ) are materialised (no FFT).
    Everything runs in float64, as the reference.
      start search  the sampled diagonals S[j + t, j] are read from S with GatherElements; the
                    offsets t (0..7 and the 40 log-spaced ones, exactly as `find_starts`) come
                    from a table indexed by the run-time n (n > ONNX_OFFSET_TABLE_N uses the
                    last row: an estimate on fewer diagonals than the reference's); gap weights,
                    key weights, column 0 forced, TopK(Min(k, n)), eps, and k ≥ n → every column.
      H̃             owner s(j) = the largest start ≤ j (ReduceMax); H̃[r, j] = exp(S[s(j) + r − j,
                    s(j)] − c) for r ≥ j, by two GatherElements; c = max over the start columns.
                    Bidirectional: the same on S flipped on both axes (strict diagonal), flipped
                    back and added.
      output        (H̃·(V∘w)) / (H̃·w); rows whose normaliser is below RELIABLE × the reference's
                    FFT error estimate are the exact softmax rows, as in the reference.
    Masks: additive or boolean, causal + per-key bias only (`prepare` keeps the others); whether
    the mask is causal is decided at run time (every strictly-upper entry removed), and the key
    bias is its last (causal) or first row, as `split_mask`. Needs Lq == Lk.
    """

    TP = R.TensorProto
    if isinstance(site.q_len, int) and isinstance(site.kv_len, int) and site.q_len != site.kv_len:
        raise R.Unsupported(f"{NAME}: needs q_len == kv_len (got {site.q_len} and {site.kv_len})")
    if options.get("starts") == "search":
        raise R.Unsupported(f"{NAME}: starts=search has no ONNX lowering yet (starts=norm or fixed columns do)")
    count, fixed, eps = op_args(site, options)[:3]
    out_dt = b.dtype(q)
    F64, I64, BOOL = TP.DOUBLE, TP.INT64, TP.BOOL
    q, k, v = (b.cast(x, F64) for x in (q, k, v))
    if isinstance(site.heads, int) and isinstance(site.kv_heads, int) and site.heads != site.kv_heads:
        k, v = R.repeat_kv(b, k, site.heads, site.kv_heads), R.repeat_kv(b, v, site.heads, site.kv_heads)
    f = lambda x: b.const(np.array(x, np.float64))                # noqa: E731 - a 0-d double
    i = lambda x: b.const(np.array(x, np.int64))                  # noqa: E731 - a 0-d int64
    ninf = f(-math.inf)
    big = np.iinfo(np.int64)

    reduce, cmp = b.reduce, b.compare

    def where(c, x, y):
        return b.op("Where", c, x, y, dtype=b.dtype(x))

    def flip(x, axes):
        n_ax = len(axes)
        return b.op("Slice", x, b.ints(*[-1] * n_ax), b.ints(*[big.min] * n_ax), b.ints(*axes), b.ints(*[-1] * n_ax))

    s = R.decomposed_scores(b, site, q, k, None, False)            # (B, H, n, n) raw scores, float64
    n1 = b.shape_of(s, 3, 4)                                       # (1,) run-time n
    n0 = b.op("Squeeze", n1, b.ints(0))
    ar = b.op("Range", i(0), n0, i(1), dtype=I64)                  # (n,)
    off = b.op("Sub", b.op("Unsqueeze", ar, b.ints(1)), ar)        # (n, n): r − j
    bhn = b.op("Concat", b.shape_of(s, 0, 2), n1, axis=0, dtype=I64)

    # ---- the mask: causal (static flag or every strictly-upper entry removed) + per-key bias
    if mask is None:
        causal = b.const(np.array(bool(site.causal)))
        w = b.op("Expand", f(1.0), bhn)
        kb = None
    else:
        m = (where(mask, f(0.0), ninf) if b.dtype(mask) == BOOL else b.cast(mask, F64))
        m = where(cmp("LessOrEqual", m, f(MASK_REMOVED)), ninf, m)
        m = b.op("Expand", m, b.op("Concat", b.ints(1, 1), n1, n1, axis=0, dtype=I64))
        upper = cmp("Less", off, i(0))                             # j > r
        removed = b.op("Or", b.op("Not", upper), cmp("Equal", m, ninf), dtype=BOOL)
        causal = cmp("Greater", reduce("ReduceMin", b.op("Cast", removed, to=TP.INT32, dtype=TP.INT32),
                                       [0, 1, 2, 3], keepdims=0), b.const(np.array(0, np.int32)))
        if site.causal:
            causal = b.const(np.array(True))
        last = b.op("Gather", m, b.op("Sub", n1, b.ints(1)), axis=2)          # (B', H', 1, n)
        first = b.op("Gather", m, b.ints(0), axis=2)
        kb = b.op("Expand", b.op("Squeeze", where(causal, last, first), b.ints(2)), bhn)   # (B, H, n)
        top = reduce("ReduceMax", kb, [2])
        top = where(b.op("Or", b.op("IsInf", top, dtype=BOOL), b.op("IsNaN", top, dtype=BOOL), dtype=BOOL),
                    f(0.0), top)
        w = b.op("Exp", b.op("Sub", kb, top))

    # ---- the offsets of the sampled diagonals for the run-time n
    cache = b.__dict__.setdefault("_conv_basis_consts", {})
    if "offsets" not in cache:
        cache["offsets"] = b.const(_offset_table(ONNX_OFFSET_TABLE_N))
    offs = b.op("Cast", b.op("Gather", cache["offsets"], b.op("Min", n0, i(ONNX_OFFSET_TABLE_N)), axis=0),
                to=I64, dtype=I64)                                 # (T,), −1 = padding
    nxt = b.op("Concat", b.op("Slice", offs, b.ints(1), b.ints(big.max)), b.ints(-1), axis=0, dtype=I64)
    nxt = where(cmp("GreaterOrEqual", nxt, i(0)), nxt, n0)
    gap = b.op("Cast", where(cmp("GreaterOrEqual", offs, i(0)), b.op("Sub", nxt, offs), i(0)), to=F64, dtype=F64)
    kk = b.op("Min", b.ints(int(count)), n1)                       # (1,)
    every = cmp("Equal", b.op("Squeeze", kk, b.ints(0)), n0)

    def starts_of(sp, wp, strict):
        """(B, H, k') start columns (unsorted, repeats allowed) as find_starts."""
        if fixed is not None:
            st = sorted({0, *[int(x) for x in fixed]})
            st = b.op("Min", b.const(np.array(st, np.int64)), b.op("Sub", n0, i(1)))
            return b.op("Unsqueeze", st, b.ints(0, 1))
        lo = 1 if strict else 0
        okt = cmp("GreaterOrEqual", offs, i(lo))                   # (T,)
        rows = b.op("Add", b.op("Unsqueeze", offs, b.ints(1)), ar)  # (T, n): j + t
        valid = b.op("And", b.op("Unsqueeze", okt, b.ints(1)), cmp("Less", rows, n0), dtype=BOOL)
        idx = b.op("Expand", b.op("Max", b.op("Min", rows, b.op("Sub", n0, i(1))), i(0)),
                   b.op("Concat", b.shape_of(s, 0, 2), b.shape_of(rows, 0, 2), axis=0, dtype=I64))
        d = where(valid, b.op("GatherElements", sp, idx, axis=2), ninf)    # (B, H, T, n): S[j + t, j]
        c = reduce("ReduceMax", d, [2, 3])
        h = b.op("Exp", b.op("Sub", d, c))
        prev = b.op("Pad", h, b.ints(0, 0, 0, 1, 0, 0, 0, 0), f(0.0))
        prev = b.op("Slice", prev, b.ints(0), n1, b.ints(3))          # h[.., j − 1]
        bj = where(b.op("And", valid, cmp("Greater", ar, i(0)), dtype=BOOL), b.op("Sub", h, prev), f(0.0))
        gapt = where(okt, gap, f(0.0))
        norm2 = reduce("ReduceSum", b.op("Mul", b.op("Unsqueeze", gapt, b.ints(1)), b.op("Mul", bj, bj)), [2],
                       keepdims=0)
        norm2 = b.op("Mul", norm2, wp)
        norm2 = where(cmp("Equal", ar, i(0)), f(math.inf), norm2)
        vals, inds = b.fresh("TopK"), b.fresh("TopK_indices")
        b.nodes.append(helper.make_node("TopK", [norm2, kk], [vals, inds], name=b.fresh("TopK_node"),
                                        axis=-1, largest=1, sorted=1))
        b.types[vals], b.types[inds] = F64, I64
        second = b.op("Gather", vals, b.op("Min", i(1), b.op("Sub", b.op("Squeeze", kk, b.ints(0)), i(1))), axis=2)
        floor = where(cmp("Greater", b.op("Squeeze", kk, b.ints(0)), i(1)),
                      b.op("Mul", f(eps * eps), second), b.op("Gather", vals, i(0), axis=2))
        keep = b.op("Or", cmp("Greater", vals, b.op("Unsqueeze", floor, b.ints(2))), cmp("Equal", inds, i(0)),
                    dtype=BOOL)
        st = where(keep, inds, i(0))
        allc = b.op("Unsqueeze", b.op("Range", i(0), b.op("Squeeze", kk, b.ints(0)), i(1), dtype=I64), b.ints(0, 1))
        return where(every, allc, st)                              # k ≥ n: every column

    def part(sp, wp, strict):
        """Logits of H̃ (−inf where 0), (B, H, n, n), in this part's coordinates, and the owners s(j)."""
        st = starts_of(sp, wp, strict)                             # (B, H, k')
        le = cmp("LessOrEqual", b.op("Unsqueeze", st, b.ints(3)), ar)        # (B, H, k', n)
        own = reduce("ReduceMax", where(le, b.op("Unsqueeze", st, b.ints(3)), i(-1)), [2], keepdims=1)  # (B,H,1,n)
        shape = b.op("Shape", sp, dtype=I64)
        cols = b.op("GatherElements", sp, b.op("Expand", own, shape), axis=3)   # [r, j] = S[r, s(j)]
        ridx = b.op("Expand", b.op("Max", b.op("Add", own, off), i(0)), shape)   # s(j) + r − j
        x = b.op("GatherElements", cols, b.op("Min", ridx, b.op("Sub", n0, i(1))), axis=2)
        live = cmp("GreaterOrEqual", off, i(1 if strict else 0))
        return where(live, x, ninf), own

    def noise_of(ht, own, wp):
        """Σᵢ ‖kernᵢ‖·‖w on block i‖ (the normaliser's FFT error estimate before its factor)."""
        colnorm = reduce("ReduceL2", ht, [2], keepdims=1)                 # (B, H, 1, n)
        onehot = b.op("Cast", cmp("Equal", b.op("Transpose", own, perm=[0, 1, 3, 2]), ar), to=F64, dtype=F64)
        blocksq = b.op("MatMul", b.op("Unsqueeze", b.op("Mul", wp, wp), b.ints(2)), onehot)  # (B, H, 1, n)
        return reduce("ReduceSum", b.op("Mul", colnorm, b.op("Sqrt", blocksq)), [2, 3])

    lo, own_lo = part(s, w, False)
    c = reduce("ReduceMax", lo, [2, 3])
    if not site.causal:                                            # causal known only at run time: both parts
        s_up, w_up = flip(s, [2, 3]), flip(w, [2])
        up, own_up = part(s_up, w_up, True)
        c = b.op("Max", c, where(causal, ninf, reduce("ReduceMax", up, [2, 3])))
    c = where(b.op("Or", b.op("IsInf", c, dtype=BOOL), b.op("IsNaN", c, dtype=BOOL), dtype=BOOL), f(0.0), c)
    h = h_lo = b.op("Exp", b.op("Sub", lo, c))
    noise = noise_of(h_lo, own_lo, w)
    if not site.causal:
        h_up = b.op("Exp", b.op("Sub", up, c))
        h = b.op("Add", h_lo, where(causal, f(0.0), flip(h_up, [2, 3])))
        noise = b.op("Add", noise, where(causal, f(0.0), noise_of(h_up, own_up, w_up)))
    m2 = b.op("Cast", b.op("Sub", b.op("Mul", n0, i(2)), i(1)), to=F64, dtype=F64)
    size_log2 = b.op("Add", b.op("Floor", b.op("Div", b.op("Log", m2), f(math.log(2.0)))), f(1.0))   # log2 FFT size
    noise = b.op("Mul", noise, b.op("Mul", size_log2, f(2.2e-16)))         # (B, H, 1, 1)
    w4 = b.op("Unsqueeze", w, b.ints(3))                                   # (B, H, n, 1)
    num = b.op("MatMul", h, b.op("Mul", v, w4))
    den = b.op("MatMul", h, w4)                                            # (B, H, n, 1)
    approx = b.op("Div", num, b.op("Max", den, f(1e-300)))
    bad = cmp("LessOrEqual", den, b.op("Mul", noise, f(RELIABLE)))
    ex = s if kb is None else b.op("Add", s, b.op("Unsqueeze", kb, b.ints(2)))
    ex = where(b.op("And", causal, cmp("Less", off, i(0)), dtype=BOOL), ninf, ex)
    exact = b.op("MatMul", R.safe_softmax(b, ex), v)
    return b.cast(where(bad, exact, approx), out_dt)


ONNX_DFT_MIN_N = DENSE_MAX_N + 1   # the DFT lowering from this length on (static, or checked at run time)
ONNX_DFT_OPSET = 17                # the DFT op (opset 17: axis attribute; 20: axis input)
ONNX_DIAG_GROUP = 8                # sampled diagonals gathered at once (group·n·d values per head)


def onnx_lower(b, site, q, k, v, mask, options: dict) -> str:
    """Standard ONNX ops (onnxruntime CPU) for the site, dense or through the DFT op.

    The path follows the reference's own choice for float32 inputs (`precision=auto`): the
    dense float64 H̃ (`_onnx_dense`) up to DENSE_MAX_N, float32 FFT convolutions
    (`_onnx_dft`) above it. A static length picks the path at rewrite time (DFT from
    ONNX_DFT_MIN_N on); a dynamic one holds both in an `If` on the run-time length, so a model
    exported with dynamic axes costs nothing extra at short lengths and O(k·n·d) at long ones.
    `precision=float64`, or a model below opset 17 (no DFT op), keeps the dense lowering.
    Needs Lq == Lk; starts=search is not lowered (the site is kept with that reason).
    """
    if isinstance(site.q_len, int) and isinstance(site.kv_len, int) and site.q_len != site.kv_len:
        raise R.Unsupported(f"{NAME}: needs q_len == kv_len (got {site.q_len} and {site.kv_len})")
    if options.get("starts") == "search":
        raise R.Unsupported(f"{NAME}: starts=search has no ONNX lowering yet (starts=norm or fixed columns do)")
    precision = op_args(site, options)[6]
    if b.opset < ONNX_DFT_OPSET or precision == "float64":
        return _onnx_dense(b, site, q, k, v, mask, options)
    n = site.kv_len if isinstance(site.kv_len, int) else site.q_len
    if isinstance(n, int):
        lower = _onnx_dft if n >= ONNX_DFT_MIN_N else _onnx_dense
        return lower(b, site, q, k, v, mask, options)
    TP = R.TensorProto
    long = b.op("GreaterOrEqual", b.op("Squeeze", b.shape_of(k, 2, 3), b.ints(0)),
                b.const(np.array(ONNX_DFT_MIN_N, np.int64)), dtype=TP.BOOL)
    branches = []
    for lower in (_onnx_dft, _onnx_dense):
        start = len(b.nodes)
        y = lower(b, site, q, k, v, mask, options)
        nodes = b.nodes[start:]
        del b.nodes[start:]
        branches.append(helper.make_graph(nodes, b.fresh(lower.__name__), [],
                                          [helper.make_tensor_value_info(y, b.dtype(y), None)]))
    return b.op("If", long, then_branch=branches[0], else_branch=branches[1], dtype=b.dtype(q))


def _onnx_dft(b, site, q, k, v, mask, options: dict) -> str:
    """The reference's FFT path in standard ONNX ops, float32: memory O(k·n·d), no (n, n) tensor.

      start search  the sampled diagonals s[j + t, j] = q[j + t]·k[j] (the offsets t of
                    `find_starts`: static n exactly, dynamic n from the same table as the
                    dense lowering), ONNX_DIAG_GROUP offsets at a time (one Gather of q rows
                    and one batched MatMul); the ranking in float64 as the reference's short
                    path; TopK(Min(k, n)), eps, k ≥ n → every column; fixed starts as given.
      columns       colᵢ[t] = s[sᵢ + t, sᵢ] from q·k[starts]ᵀ (n × k); kernᵢ = exp(colᵢ − c),
                    c the largest over both triangles. A repeated start keeps its first copy.
      apply         overlap-save as `_overlap_save`, block P = fft_block(n): the columns of
                    X = [V·w | w] cut into segments (one block ∩ one start's columns, at most
                    nb + k', placed by ScatterElements), each transformed once by `DFT` (real
                    input, onesided, zero-padded by the op to 2P); each start's kernel windows
                    (nb of 2P lags) once; per frequency the complex (nb × S)·(S × m) product as
                    one real MatMul of [Tr; Ti] with [Xr | Xi]; one inverse `DFT` (onesided →
                    real) per output block and column. Bidirectional: the strict upper
                    triangle is the same on the reversed sequence, flipped back and added (a
                    run-time causal mask selects). Memory O((1 + k/nb)·n·d + k·n).
      fallback      the reference's test: normaliser ≤ RELIABLE_F32 × its FFT error estimate
                    (n ≤ DENSE_MAX_N: Σᵢ ‖kernᵢ‖·‖w on block i‖ per head; above: per row block
                    of fft_block(n), Σ over the start blocks reaching it of ‖kernel window‖·
                    ‖w on the block‖), × unit round-off × log₂ of the transform size. The
                    unreliable rows (R = the most in any head) are taken by TopK, scored
                    exactly against every key (R·n per head), and scattered back.
    Masks: causal + per-key bias as `split_mask`; a constant causal mask is the causal flag;
    a mask with one query row is a key mask; with n rows the causal test runs on the mask's
    rows (the last key each row keeps), and the key bias is its last (causal) or first row.
    """
    TP = R.TensorProto
    F32, F64, I64, BOOL = TP.FLOAT, TP.DOUBLE, TP.INT64, TP.BOOL
    count, fixed, eps = op_args(site, options)[:3]
    out_dt = b.dtype(q)
    q, k, v = (b.cast(x, F32) for x in (q, k, v))
    if isinstance(site.heads, int) and isinstance(site.kv_heads, int) and site.heads != site.kv_heads:
        k, v = R.repeat_kv(b, k, site.heads, site.kv_heads), R.repeat_kv(b, v, site.heads, site.kv_heads)
    causal = bool(site.causal)
    if mask is not None and R.constant_causal(b, mask):
        mask, causal = None, True                                  # the constant causal pattern: the flag
    f32 = lambda x: b.const(np.array(x, np.float32))              # noqa: E731 - a 0-d float
    f64 = lambda x: b.const(np.array(x, np.float64))              # noqa: E731 - a 0-d double
    i = lambda x: b.const(np.array(x, np.int64))                  # noqa: E731 - a 0-d int64
    big = np.iinfo(np.int64)
    static_n = site.kv_len if isinstance(site.kv_len, int) else site.q_len
    static_n = static_n if isinstance(static_n, int) else None

    reduce, cmp = b.reduce, b.compare

    def where(c, x, y):
        return b.op("Where", c, x, y, dtype=b.dtype(x))

    def flip(x, axis=2):
        return b.op("Slice", x, b.ints(-1), b.ints(big.min), b.ints(axis), b.ints(-1))

    def unsq(x, *axes):
        return b.op("Unsqueeze", x, b.ints(*axes))

    def cat(*xs, axis=0):
        return b.op("Concat", *xs, axis=axis, dtype=b.dtype(xs[0]))

    def finite_or_zero(x):
        return where(b.op("Or", b.op("IsInf", x, dtype=BOOL), b.op("IsNaN", x, dtype=BOOL), dtype=BOOL),
                     b.scalar_like(0.0, x), x)

    def dft(x, length, axis, inverse=0):
        if b.opset >= 20:
            return b.op("DFT", x, length, i(axis), onesided=1, inverse=inverse, dtype=F32)
        return b.op("DFT", x, length, axis=axis, onesided=1, inverse=inverse, dtype=F32)

    qs = b.op("Mul", q, f32(R.resolve_scale(b, site)))            # scaled in float32, as the reference
    bh = b.shape_of(q, 0, 2)                                       # (2,) B, H
    n1 = b.shape_of(k, 2, 3)                                       # (1,) n
    n0 = b.op("Squeeze", n1, b.ints(0))
    last = b.op("Sub", n0, i(1))
    ar = b.op("Range", i(0), n0, i(1), dtype=I64)                  # (n,)
    bhn = cat(bh, n1)

    # ---- the mask: causal (static, or tested on the mask's rows) + per-key bias -> weights w
    if mask is None:
        w, kb = b.op("Expand", f32(1.0), bhn), None
    else:
        m = where(mask, f64(0.0), f64(-math.inf)) if b.dtype(mask) == BOOL else b.cast(mask, F64)
        m = where(cmp("LessOrEqual", m, f64(MASK_REMOVED)), f64(-math.inf), m)
        m = b.op("Expand", m, cat(b.ints(1, 1, 1), n1))            # rank 4, its own rows (1 or n)
        rows = b.shape_of(m, 2, 3)
        if not causal:                                             # every key after the row removed?
            kept = cmp("Greater", m, f64(-math.inf))
            last_kept = reduce("ReduceMax", where(kept, ar, i(-1)), [3], keepdims=0)      # (B', H', rows)
            rr = b.op("Range", i(0), b.op("Squeeze", rows, b.ints(0)), i(1), dtype=I64)
            tril = reduce("ReduceMin", b.op("Cast", cmp("LessOrEqual", last_kept, rr), to=TP.INT32,
                                             dtype=TP.INT32), [0, 1, 2], keepdims=0)
            causal = b.op("And", cmp("Greater", tril, b.const(np.array(0, np.int32))),
                          cmp("Greater", b.op("Squeeze", rows, b.ints(0)), i(1)), dtype=BOOL)
            row = where(causal, b.op("Sub", rows, b.ints(1)), b.ints(0))
        else:
            row = b.op("Sub", rows, b.ints(1))
        kb = b.cast(b.op("Expand", b.op("Squeeze", b.op("Gather", m, row, axis=2), b.ints(2)), bhn), F32)
        w = b.op("Exp", b.op("Sub", kb, finite_or_zero(reduce("ReduceMax", kb, [2]))))   # (B, H, n)
    x = cat(b.op("Mul", v, unsq(w, 3)), unsq(w, 3), axis=3)        # [V·w | w] (B, H, n, dv + 1)
    dv = b.op("Squeeze", b.shape_of(v, 3, 4), b.ints(0))
    static_causal = causal if isinstance(causal, bool) else None

    # ---- the sampled diagonals' offsets and gap weights
    if static_n is not None:
        grid = torch.logspace(0, math.log10(max(static_n - 1, 1)), SAMPLED_DIAGONALS).long().tolist()
        table = sorted(t for t in {*range(min(8, static_n)), *grid} if t < static_n)
        offs, n_offs = b.const(np.array(table, np.int64)), len(table)
    else:
        cache = b.__dict__.setdefault("_conv_basis_consts", {})
        if "offsets" not in cache:
            cache["offsets"] = b.const(_offset_table(ONNX_OFFSET_TABLE_N))
        offs = b.op("Cast", b.op("Gather", cache["offsets"], b.op("Min", n0, i(ONNX_OFFSET_TABLE_N)), axis=0),
                    to=I64, dtype=I64)                             # −1 = padding
        n_offs = _offset_table(ONNX_OFFSET_TABLE_N).shape[1]
    nxt = cat(b.op("Slice", offs, b.ints(1), b.ints(big.max)), b.ints(-1))
    nxt = where(cmp("GreaterOrEqual", nxt, i(0)), nxt, n0)
    gap = b.op("Cast", where(cmp("GreaterOrEqual", offs, i(0)), b.op("Sub", nxt, offs), i(0)), to=F64, dtype=F64)
    kk = b.op("Min", b.ints(int(count)), n1)                       # (1,)
    kk0 = b.op("Squeeze", kk, b.ints(0))
    every = cmp("Equal", kk0, n0)
    kidx = b.op("Range", i(0), kk0, i(1), dtype=I64)               # (k',)

    def softcapped(s):
        if not site.softcap:
            return s
        cap = b.scalar_like(float(site.softcap), s)
        return b.op("Mul", b.op("Tanh", b.op("Div", s, cap)), cap)

    def diagonals(qp, kp):
        """(B, H, T, n) float32 raw scores qp[j + t]·kp[j] (garbage where j + t ≥ n or t < 0)."""
        kcol = unsq(kp, 4)                                         # (B, H, n, d, 1)
        out = []
        for a in range(0, n_offs, ONNX_DIAG_GROUP):
            part = b.op("Slice", offs, b.ints(a), b.ints(a + ONNX_DIAG_GROUP), b.ints(0))
            idx = b.op("Min", b.op("Max", b.op("Add", unsq(ar, 1), unsq(part, 0)), i(0)), last)  # (n, G)
            rowsq = b.op("Gather", qp, idx, axis=2)                # (B, H, n, G, d)
            out.append(b.op("Squeeze", b.op("MatMul", rowsq, kcol), b.ints(4)))                   # (B, H, n, G)
        d = out[0] if len(out) == 1 else cat(*out, axis=3)
        return b.op("Transpose", d, perm=[0, 1, 3, 2])

    def starts_of(qp, kp, wp, strict):
        """(B, H, k') start columns (unsorted, repeats allowed), as find_starts / fixed columns."""
        if fixed is not None:
            st = sorted({0, *[int(s) for s in fixed]})
            st = b.op("Min", b.const(np.array(st, np.int64)), last)
            return b.op("Expand", unsq(st, 0, 1), cat(bh, b.shape_of(st, 0, 1)))
        lo = 1 if strict else 0
        okt = cmp("GreaterOrEqual", offs, i(lo))                   # (T,)
        rows = b.op("Add", unsq(offs, 1), ar)                      # (T, n): j + t
        valid = b.op("And", unsq(okt, 1), cmp("Less", rows, n0), dtype=BOOL)
        d = softcapped(b.cast(diagonals(qp, kp), F64))
        d = where(valid, d, f64(-math.inf))                        # (B, H, T, n): s[j + t, j]
        h = b.op("Exp", b.op("Sub", d, reduce("ReduceMax", d, [2, 3])))
        prev = b.op("Slice", b.op("Pad", h, b.ints(0, 0, 0, 1, 0, 0, 0, 0), f64(0.0)), b.ints(0), n1, b.ints(3))
        bj = where(b.op("And", valid, cmp("Greater", ar, i(0)), dtype=BOOL), b.op("Sub", h, prev), f64(0.0))
        norm2 = reduce("ReduceSum", b.op("Mul", unsq(where(okt, gap, f64(0.0)), 1), b.op("Mul", bj, bj)), [2],
                       keepdims=0)
        norm2 = b.op("Mul", norm2, b.cast(wp, F64))
        norm2 = where(cmp("Equal", ar, i(0)), f64(math.inf), norm2)
        vals, inds = b.fresh("TopK"), b.fresh("TopK_indices")
        b.nodes.append(helper.make_node("TopK", [norm2, kk], [vals, inds], name=b.fresh("TopK_node"),
                                        axis=-1, largest=1, sorted=1))
        b.types[vals], b.types[inds] = F64, I64
        second = b.op("Gather", vals, b.op("Min", i(1), b.op("Sub", kk0, i(1))), axis=2)
        floor = where(cmp("Greater", kk0, i(1)), b.op("Mul", f64(eps * eps), second),
                      b.op("Gather", vals, i(0), axis=2))
        keep = b.op("Or", cmp("Greater", vals, unsq(floor, 2)), cmp("Equal", inds, i(0)), dtype=BOOL)
        return where(every, b.op("Expand", unsq(kidx, 0, 1), cat(bh, kk)), where(keep, inds, i(0)))

    def part(qp, kp, wp, strict):
        """(start columns' logits (B, H, k', n), owner mask (B, H, k', n) float32) of one triangle."""
        st = starts_of(qp, kp, wp, strict)                         # (B, H, k')
        st3 = unsq(st, 3)                                          # (B, H, k', 1)
        kn = b.shape_of(st, 2, 3)                                  # (1,) k'
        kidx = b.op("Range", i(0), b.op("Squeeze", kn, b.ints(0)), i(1), dtype=I64)
        ks = b.op("GatherElements", kp, b.op("Expand", st3, cat(bh, kn, b.shape_of(kp, 3, 4))), axis=2)  # (B, H, k', d)
        s = softcapped(b.op("MatMul", ks, b.op("Transpose", qp, perm=[0, 1, 3, 2])))       # (B, H, k', n): s[r, sᵢ]
        rows = b.op("Add", st3, ar)                                # sᵢ + t
        cols = b.op("GatherElements", s, b.op("Min", rows, last), axis=3)
        dead = cmp("GreaterOrEqual", rows, n0)
        if strict:
            dead = b.op("Or", dead, cmp("Equal", ar, i(0)), dtype=BOOL)
        cols = where(dead, f32(-math.inf), cols)
        own = reduce("ReduceMax", where(cmp("LessOrEqual", st3, ar), st3, i(-1)), [2])   # (B, H, 1, n): s(j)
        earlier = cmp("Greater", unsq(kidx, 1), unsq(kidx, 0))     # [i, i']: i' before i
        dup = reduce("ReduceMax", b.op("Cast", b.op("And", cmp("Equal", st3, unsq(st, 2)), earlier, dtype=BOOL),
                                       to=TP.INT32, dtype=TP.INT32), [3])                 # (B, H, k', 1)
        owns = b.op("And", cmp("Equal", own, st3), cmp("Equal", dup, b.const(np.array(0, np.int32))), dtype=BOOL)
        return cols, b.op("Cast", owns, to=F32, dtype=F32)

    # ---- powers of two at run time (a dynamic length's block and bit lengths)
    pows = None if static_n is not None else b.const(np.array([1 << e for e in range(1, 48)], np.int64))

    def pow2_at_least(m):                                          # 0-d: the smallest power of two ≥ m (≥ 2)
        return reduce("ReduceMin", where(cmp("GreaterOrEqual", pows, m), pows, i(big.max)), [0], keepdims=0)

    unit = UNIT[torch.float32]

    def bit_length(m):                                             # 0-d float32: m's bit length (m ≥ 1)
        return b.op("Cast", reduce("ReduceSum", b.op("Cast", cmp("LessOrEqual", cat(b.ints(1), pows), m),
                                                     to=I64, dtype=I64), [0], keepdims=0), to=F32, dtype=F32)

    def noise_head(kern, owns, wp):
        """(B, H, 1): Σᵢ ‖kernᵢ‖·‖w on start i's columns‖ × unit × log₂(the dense path's size)."""
        wsq = reduce("ReduceSum", b.op("Mul", owns, unsq(b.op("Mul", wp, wp), 2)), [3], keepdims=0)
        s = reduce("ReduceSum", b.op("Mul", reduce("ReduceL2", kern, [3], keepdims=0), b.op("Sqrt", wsq)), [2])
        bits = f32(float((2 * static_n - 1).bit_length())) if static_n is not None else \
            bit_length(b.op("Sub", b.op("Mul", n0, i(2)), i(1)))
        return b.op("Mul", b.op("Mul", s, f32(unit)), bits)

    if static_n is not None:
        p_blk = b.const(np.array(fft_block(static_n), np.int64))
    else:                                                          # fft_block at run time
        p_blk = b.op("Max", i(FFT_MIN_BLOCK), pow2_at_least(b.op("Max", i(1), b.op(
            "Div", b.op("Add", n0, i(FFT_BLOCKS - 1)), i(FFT_BLOCKS)))))
    nb = b.op("Div", b.op("Add", n0, b.op("Sub", p_blk, i(1))), p_blk)
    blk = b.op("Div", ar, p_blk)                                   # (n,) the row's block
    p1 = unsq(p_blk, 0)                                            # (1,) P
    p2 = b.op("Mul", p_blk, i(2))                                  # 2P, the transform size
    nb1 = unsq(nb, 0)
    delta = b.op("Range", i(0), nb, i(1), dtype=I64)               # (nb,) blocks / lags in blocks

    def apply(kern, owns, xp):
        """Σᵢ kernᵢ ∗ (xp on start i's columns): (B, H, n, m), overlap-save as `_overlap_save`.

        Segments are the runs of columns with one block and one owning start (at most nb + k');
        each is transformed once (2P), each start's kernel once per block lag, and output block
        o is Σₛ window(owner s, o − block s)·X̂ₛ, per frequency one (2nb × S)·(S × 2m) real
        MatMul for the complex product, then one inverse transform per block and column."""
        m1 = b.shape_of(xp, 3, 4)
        kn = b.shape_of(owns, 2, 3)
        own = b.op("ArgMax", owns, axis=2, keepdims=0)             # (B, H, n): the owning start's slot
        key = b.op("Add", b.op("Mul", blk, b.op("Squeeze", kn, b.ints(0))), own)
        new = b.op("Cast", b.op("Not", cmp("Equal", b.op("Slice", key, b.ints(1), b.ints(big.max), b.ints(2)),
                                           b.op("Slice", key, b.ints(0), b.ints(-1), b.ints(2)))), to=I64, dtype=I64)
        seg = b.op("CumSum", b.op("Pad", new, b.ints(0, 0, 1, 0, 0, 0), i(0)), i(2))   # (B, H, n) segment of j
        nseg = b.op("Add", nb1, kn)                                # (1,) S, an upper bound
        slot = b.op("Add", b.op("Mul", seg, p_blk), b.op("Mod", ar, p_blk))
        xs = b.op("Expand", f32(0.0), cat(bh, b.op("Mul", nseg, p1), m1))
        xs = b.op("ScatterElements", xs, b.op("Expand", unsq(slot, 3), cat(bhn, m1)), xp, axis=2)
        xs = b.op("Transpose", b.op("Reshape", xs, cat(bh, nseg, p1, m1)), perm=[0, 1, 2, 4, 3])
        xf = dft(unsq(xs, 5), p2, 4)                               # (B, H, S, m, P + 1, 2)
        xf = b.op("Transpose", xf, perm=[0, 1, 4, 2, 5, 3])        # (B, H, F, S, 2, m)
        xf = b.op("Reshape", xf, b.ints(0, 0, 0, 0, -1))           # (B, H, F, S, [re | im])
        zero = b.op("Expand", i(0), cat(bh, nseg))
        seg_blk = b.op("ScatterElements", zero, seg, b.op("Expand", blk, bhn), axis=2)    # (B, H, S)
        seg_own = b.op("ScatterElements", zero, seg, own, axis=2)
        right = b.op("Sub", b.op("Mul", b.op("Add", nb, i(1)), p_blk), b.op("Add", n0, b.op("Sub", p_blk, i(1))))
        kp = b.op("Pad", kern, cat(b.ints(0, 0, 0), b.op("Sub", p1, b.ints(1)), b.ints(0, 0, 0), unsq(right, 0)),
                  f32(0.0))                                        # (B, H, k', (nb + 1)·P)
        widx = b.op("Add", unsq(b.op("Mul", delta, p_blk), 1), b.op("Range", i(0), p2, i(1), dtype=I64))
        wf = dft(unsq(b.op("Gather", kp, widx, axis=3), 5), p2, 4)  # (B, H, k', nb, P + 1, 2)
        wf = b.op("Reshape", wf, cat(b.ints(0, 0, -1), b.shape_of(wf, 4, 6)))   # (B, H, k'·nb, F, 2)
        lag = b.op("Sub", unsq(delta, 0, 1, 3), unsq(seg_blk, 2))  # (B, H, nb, S): o − block s
        pick = b.op("Add", b.op("Mul", unsq(seg_own, 2), nb), b.op("Max", lag, i(0)))
        tm = b.op("GatherND", wf, unsq(b.op("Reshape", pick, b.ints(0, 0, -1)), 3), batch_dims=2)  # (B, H, nb·S, F, 2)
        live = unsq(b.op("Reshape", cmp("GreaterOrEqual", lag, i(0)), b.ints(0, 0, -1)), 3, 4)
        tm = where(live, tm, f32(0.0))
        tm = b.op("Reshape", tm, cat(bh, nb1, nseg, b.ints(-1, 2)))
        tm = b.op("Transpose", tm, perm=[0, 1, 4, 5, 2, 3])        # (B, H, F, 2, nb, S)
        tm = b.op("Reshape", tm, cat(b.ints(0, 0, 0, -1), nseg))  # (B, H, F, [Tr; Ti], S)
        prod = b.op("MatMul", tm, xf)                              # (B, H, F, 2nb, 2m)
        blocks = lambda r0, r1, c0, c1: b.op("Slice", prod, cat(r0, c0), cat(r1, c1), b.ints(3, 4))   # noqa: E731
        z = b.ints(0)
        nb2, m2 = b.op("Mul", nb1, b.ints(2)), b.op("Mul", m1, b.ints(2))
        yr = b.op("Sub", blocks(z, nb1, z, m1), blocks(nb1, nb2, m1, m2))
        yi = b.op("Add", blocks(z, nb1, m1, m2), blocks(nb1, nb2, z, m1))
        y = b.op("Transpose", cat(unsq(yr, 5), unsq(yi, 5), axis=5), perm=[0, 1, 3, 4, 2, 5])   # (B, H, nb, m, F, 2)
        y = dft(y, p2, 4, inverse=1)                               # (B, H, nb, m, 2P, 1)
        y = b.op("Squeeze", b.op("Slice", y, b.op("Sub", p1, b.ints(1)), b.op("Sub", b.op("Mul", p1, b.ints(2)),
                                                                                b.ints(1)), b.ints(4)), b.ints(5))
        y = b.op("Reshape", b.op("Transpose", y, perm=[0, 1, 2, 4, 3]), cat(bh, b.ints(-1), m1))
        return b.op("Slice", y, b.ints(0), n1, b.ints(2))

    def noise_rows(kern, owns, wp):
        """(B, H, n): the overlap-save path's estimate (module notes), per row block of P."""
        k2 = b.op("Cast", b.op("Mul", kern, kern), to=F64, dtype=F64)
        csum = b.op("Pad", b.op("CumSum", k2, i(3)), b.ints(0, 0, 0, 1, 0, 0, 0, 0), f64(0.0))   # Σ_{lag < x}
        hi = b.op("Min", b.op("Add", b.op("Mul", b.op("Add", delta, i(1)), p_blk), i(1)), n0)
        lo = b.op("Min", b.op("Max", b.op("Add", b.op("Mul", b.op("Sub", delta, i(1)), p_blk), i(1)), i(0)), n0)
        wn2 = b.op("Sub", b.op("Gather", csum, hi, axis=3), b.op("Gather", csum, lo, axis=3))
        wn = b.cast(b.op("Sqrt", b.op("Max", wn2, f64(0.0))), F32)          # (B, H, k', nb) window norms
        pad = b.op("Sub", b.op("Mul", nb, p_blk), n0)
        wsq = b.op("Mul", owns, unsq(b.op("Mul", wp, wp), 2))     # (B, H, k', n)
        wsq = b.op("Pad", wsq, cat(b.ints(0, 0, 0, 0, 0, 0, 0), unsq(pad, 0)), f32(0.0))
        wsq = b.op("Reshape", wsq, cat(b.shape_of(owns, 0, 3), unsq(nb, 0), unsq(p_blk, 0)))
        xn = b.op("Sqrt", reduce("ReduceSum", wsq, [4], keepdims=1))  # (B, H, k', nb, 1) ‖w on segment‖
        lag = b.op("Sub", unsq(delta, 1), unsq(delta, 0))          # (nb, nb): o − β
        tm = b.op("Gather", wn, b.op("Max", lag, i(0)), axis=3)    # (B, H, k', nb, nb)
        tm = where(cmp("GreaterOrEqual", lag, i(0)), tm, f32(0.0))
        per_block = reduce("ReduceSum", b.op("MatMul", tm, xn), [2, 4], keepdims=0)       # (B, H, nb)
        bits = f32(float(fft_block(static_n).bit_length())) if static_n is not None else bit_length(p_blk)
        return b.op("Mul", b.op("Mul", b.op("Gather", per_block, blk, axis=2), f32(unit)), bits)

    # ---- both triangles: starts, columns, one shift c, the convolutions and the error estimates
    parts = [(qs, k, x, w, False)]
    if static_causal is not True:                                  # the strictly upper triangle, reversed
        parts.append((flip(qs), flip(k), flip(x), flip(w), True))
    plans = [part(qp, kp, wp, strict) for qp, kp, _, wp, strict in parts]
    tops = [reduce("ReduceMax", cols, [2, 3]) for cols, _ in plans]
    if len(tops) == 2 and static_causal is None:
        tops[1] = where(causal, f32(-math.inf), tops[1])
    c = finite_or_zero(tops[0] if len(tops) == 1 else b.op("Max", *tops))
    y = noise = None
    for (_, _, xp, wp, strict), (cols, owns) in zip(parts, plans):
        kern = b.op("Exp", b.op("Sub", cols, c))
        yp = apply(kern, owns, xp)
        if static_n is not None and static_n <= DENSE_MAX_N:
            np_ = noise_head(kern, owns, wp)
        elif static_n is not None:
            np_ = noise_rows(kern, owns, wp)
        else:
            np_ = where(cmp("Greater", n0, i(DENSE_MAX_N)), noise_rows(kern, owns, wp),
                        b.op("Expand", noise_head(kern, owns, wp), bhn))
        if strict:
            yp, np_ = flip(yp), flip(np_)
            if static_causal is None:
                yp, np_ = where(causal, f32(0.0), yp), where(causal, f32(0.0), np_)
        y = yp if y is None else b.op("Add", y, yp)
        noise = np_ if noise is None else b.op("Add", noise, np_)
    norm = b.op("Squeeze", b.op("Slice", y, unsq(dv, 0), b.ints(big.max), b.ints(3)), b.ints(3))   # (B, H, n)
    approx = b.op("Div", b.op("Slice", y, b.ints(0), unsq(dv, 0), b.ints(3)),
                  unsq(b.op("Max", norm, f32(np.finfo(np.float32).tiny)), 3))
    bad = cmp("LessOrEqual", norm, b.op("Mul", noise, f32(RELIABLE_F32)))

    # ---- the unreliable rows, recomputed exactly: R = the most in any head, picked by TopK
    flag = b.op("Cast", bad, to=F32, dtype=F32)
    r = b.op("Max", b.ints(1), b.op("Cast", reduce("ReduceMax", reduce("ReduceSum", flag, [2]), [0, 1, 2], keepdims=0),
                                   to=I64, dtype=I64))
    r = b.op("Reshape", r, b.ints(1))
    vals, rows = b.fresh("TopK"), b.fresh("TopK_indices")
    b.nodes.append(helper.make_node("TopK", [flag, r], [vals, rows], name=b.fresh("TopK_node"),
                                    axis=-1, largest=1, sorted=0))
    b.types[vals], b.types[rows] = F32, I64
    rows4 = unsq(rows, 3)                                          # (B, H, R, 1)
    qr = b.op("GatherElements", qs, b.op("Expand", rows4, cat(bh, r, b.shape_of(qs, 3, 4))), axis=2)
    s = softcapped(b.op("MatMul", qr, b.op("Transpose", k, perm=[0, 1, 3, 2])))          # (B, H, R, n)
    if kb is not None:
        s = b.op("Add", s, unsq(kb, 2))
    if static_causal is not False:
        after = cmp("Greater", ar, rows4)
        if static_causal is None:
            after = b.op("And", causal, after, dtype=BOOL)
        s = where(after, f32(-math.inf), s)
    exact = b.op("MatMul", R.safe_softmax(b, s), v)               # (B, H, R, dv)
    ridx = b.op("Expand", rows4, cat(bh, r, unsq(dv, 0)))
    picked = where(unsq(cmp("Greater", vals, f32(0.5)), 3), exact, b.op("GatherElements", approx, ridx, axis=2))
    out = b.op("ScatterElements", approx, ridx, picked, axis=2)
    return b.cast(out, out_dt)


VARIANT = Variant("conv-basis", OP_NAME, PARAMS, reference, op, op_args, diagnostics,
                  onnx_lower=onnx_lower, cost_model=costing.conv_basis_model,
                  prepare=prepare,
                  needs_samples=needs_samples,
                  auto_ladder=auto_ladder)
