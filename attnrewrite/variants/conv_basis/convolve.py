"""H̃·x: the k causal convolutions Σᵢ cᵢ ∗ x[sᵢ:sᵢ₊₁], built densely for short n, by overlap-save FFTs
above DENSE_MAX_N (the package notes give the construction), with the normaliser's error estimate."""
from __future__ import annotations

import math

import torch

DENSE_MAX_N = 512         # up to this length H̃ is built densely (same matrix; FFTs cost more there)
FFT_CHUNK = 1 << 26       # elements of X̂ segments per chunk of heads (heads × segments × columns × size)
FFT_BLOCKS = 16           # the overlap-save block P is the power of two ≥ n / FFT_BLOCKS ...
FFT_MIN_BLOCK = 16        # ... and at least this
UNIT = {torch.float32: 2.0 ** -23, torch.float64: 2.0 ** -52}   # unit round-off of the working precisions


def is_dense(n: int) -> bool:
    """Whether H̃ is built densely at length n (n ≤ DENSE_MAX_N) rather than applied by FFT — the one
    reading of DENSE_MAX_N, so that moving it moves every choice that follows the path."""
    return n <= DENSE_MAX_N


def fft_block(n: int) -> int:
    """The overlap-save block P: the power of two ≥ n / FFT_BLOCKS, at least FFT_MIN_BLOCK."""
    return max(FFT_MIN_BLOCK, 1 << (max(1, -(-n // FFT_BLOCKS)) - 1).bit_length())


def _conv_apply(kern, starts, x):
    """H̃·x = Σᵢ kernᵢ ∗ x[sᵢ:sᵢ₊₁] for G heads: (G, n, m), and the normaliser's error estimate.

    kern (G, k, n) = exp(colᵢ − c), starts (G, k) sorted, x (G, n, m) with the normaliser's
    weights in its last column. n ≤ DENSE_MAX_N: H̃ built densely, one estimate per head
    (G, 1); else overlap-save (package notes), one estimate per row (G, n).
    """
    g, n, m = x.shape
    k = starts.shape[1]
    owner = torch.searchsorted(starts, torch.arange(n, device=x.device).expand(g, n).contiguous(),
                               right=True) - 1                     # start index owning column j
    if is_dense(n):                                                # short: H̃ itself is cheaper than FFTs
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

