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
columns of q·kᵀ are computed (O(k·n·d)); H̃V and H̃·1 come from FFTs of size ≥ 2n.
Output O = (H̃V) / (H̃·1) row by row. Bidirectional sites add a second basis for the
strictly upper triangle: the same construction on the reversed sequence.

Start columns: the k − 1 columns with the largest difference norm ‖bⱼ‖ (estimated on ~40
sampled diagonals, O(n·d) each), column 0 always; `starts` fixes them instead, `eps`
drops candidates whose norm is below eps·max (fewer than k starts when H is nearly
conv). k ≥ n keeps every column: H̃ = H, exact to round-off.

Numerics: c is shared by all rows (a per-row max breaks the Toeplitz structure), so a row
whose scores sit far below the global maximum has a normaliser H̃·1 of the size of the
FFT's round-off. Everything runs in float64, and rows whose normaliser is below
`RELIABLE` times the FFT error estimate are recomputed exactly (O(n·d) each) and counted.
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

from ..passes import onnx_rewrite as R
from .exact import reference as exact_reference
from .base import BACKWARD_OPS, MASK_REMOVED, Param, define_attention_op, expand_kv, masked_scores, safe_softmax

NAME = "conv_basis"
OP_NAME = "conv_basis_attention"
PARAMS = {
    "k": Param(16, int, "number of basis (start) columns per head and triangle", minimum=1),
    "starts": Param(None, "ints", "fixed start columns (0 is always added); default: searched per input",
                    allow_none=True),
    "eps": Param(0.0, float, "skip start candidates with difference norm below eps × the largest", minimum=0.0),
}
RELIABLE = 1e6            # a row's normaliser must exceed 1e6 × the FFT error estimate (≈ 6 digits)
DIAG_CHUNK = 1 << 24      # elements of q gathered at once for the diagonal scores
SAMPLED_DIAGONALS = 40    # diagonals read to estimate ‖bⱼ‖ for the start search
DENSE_MAX_N = 512         # up to this length H̃ is built densely (same matrix; k FFTs cost more there)
FFT_CHUNK = 1 << 26       # elements per batched FFT (heads × starts × columns × size)
DIAG_ROWS = 64            # rows sampled per head for the basis-error diagnostic


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
    t = torch.tensor(offsets, device=q.device)
    gap = torch.tensor(gaps, dtype=q.dtype, device=q.device)
    j = torch.arange(n, device=q.device)
    rows = j[None, :] + t[:, None]                                 # (T, n): row j + t of diagonal t
    valid = rows < n
    qf, kf = q.float(), k.float()                                  # a ranking needs no float64
    d = torch.cat([torch.linalg.vecdot(qf[:, r.clamp(max=n - 1)], kf[:, None])   # s[j + t, j]
                   for r in rows.split(max(1, DIAG_CHUNK // max(n * q.shape[-1] * g, 1)))], dim=1).double()
    if softcap:
        d = softcap * torch.tanh(d / softcap)
    d = d.masked_fill(~valid, -math.inf)
    c = d.flatten(1).amax(-1)[:, None, None]
    h = torch.exp(d - c)                                           # H[j + t, j]
    b = torch.zeros_like(h)
    b[..., 1:] = h[..., 1:] - h[..., :-1]                          # bⱼ[t] = H[j+t, j] − H[j+t−1, j−1]
    b = b.masked_fill(~valid, 0.0)
    norm2 = (gap[:, None] * (b * b)).sum(1)
    norm2 = norm2 * weight
    norm2[:, 0] = math.inf
    top, idx = norm2.topk(count, dim=-1)
    floor = (eps * eps) * top[:, 1:2] if count > 1 else top[:, :1]
    idx = torch.where((top > floor) | (idx == 0), idx, torch.zeros_like(idx))
    return idx.sort(-1).values


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


def _conv_apply(cols, starts, c, x):
    """Σᵢ exp(colᵢ − c) ∗ x[sᵢ:sᵢ₊₁] by FFT over G heads: (G, n, m) and an error estimate (G, m).

    All k blocks of a head are transformed in one batched rfft (each block zero everywhere
    but its own rows) and combined in the frequency domain: k·m forward FFTs and m inverse
    ones of size ≥ 2n per head, heads chunked to bound memory.
    """
    g, n, m = x.shape
    k = starts.shape[1]
    size = 1 << (2 * n - 1).bit_length()
    owner = torch.searchsorted(starts, torch.arange(n, device=x.device).expand(g, n).contiguous(),
                               right=True) - 1                     # start index owning column j
    kern = torch.exp(cols - c[:, None, None])                      # (G, k, n): H[sᵢ + t, sᵢ]
    xt = x.transpose(1, 2)                                         # (G, m, n): FFTs along the last axis
    sq = torch.zeros(g, k, m, dtype=x.dtype, device=x.device).scatter_add_(
        1, owner[:, :, None].expand(g, n, m), x * x)              # ‖block‖² per start and column
    noise = (torch.linalg.vector_norm(kern, dim=-1)[..., None] * sq.sqrt()).sum(1)
    if n <= DENSE_MAX_N:                                           # short: H̃ itself is cheaper than k FFTs
        return _dense_apply(kern, owner, x), noise * 2.2e-16 * math.log2(size)
    per = max(1, FFT_CHUNK // (k * (m + 1) * size))
    ys = []
    for a in range(0, g, per):
        b = min(g, a + per)
        blocks = torch.zeros(b - a, k, m, n, dtype=x.dtype, device=x.device)
        blocks.scatter_(1, owner[a:b, None, None, :].expand(-1, 1, m, n), xt[a:b, None])
        spec = (torch.fft.rfft(blocks, n=size) * torch.fft.rfft(kern[a:b], n=size)[:, :, None]).sum(1)
        ys.append(torch.fft.irfft(spec, n=size)[..., :n].transpose(1, 2))
    return torch.cat(ys), noise * 2.2e-16 * math.log2(size)


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


def attend_heads(q, k, v, key_bias, causal, softcap, count, starts, eps, stats=None):
    """G heads, float64: q (G, n, d) already scaled, k (G, n, d), v (G, n, dv), key_bias (G, n) or None."""
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
        if starts is not None:
            st = torch.tensor(sorted({0, *[min(s, n - 1) for s in starts]}), device=q.device).expand(g, -1)
        else:
            st = find_starts(qq, kk, count, eps, strict, ww, softcap)
        plans.append((st.contiguous(), _start_columns(qq, kk, st, softcap, strict)))
    c = torch.stack([cols.flatten(1).amax(-1) for _, cols in plans], -1).amax(-1)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    y = torch.zeros_like(x)
    noise = torch.zeros(g, x.shape[-1], dtype=x.dtype, device=x.device)
    for (_, _, xx, _, strict), (st, cols) in zip(parts, plans):
        part, err = _conv_apply(cols, st, c, xx)
        y += part.flip(1) if strict else part
        noise += err
    norm = y[..., -1]
    out = y[..., :-1] / norm.clamp_min(1e-300)[..., None]
    bad = norm <= RELIABLE * noise[:, -1:]
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
                [(p[0][h].tolist(), p[1][h]) for p in plans], float(c[h])))
    return out


def _basis_error(q, k, key_bias, causal, softcap, plans, c):
    """‖Ã − A‖_F / ‖A‖_F on sampled rows of one head, Ã the normalised rows of H̃ (before the fallback)."""
    n = q.shape[0]
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

def _attend(q, k, v, mask, scale, softcap, causal, dropout_p, count, starts, eps, stats=None):
    lq, n = q.shape[-2], k.shape[-2]
    split = split_mask(mask, causal, n) if lq == n else None
    if split is None or dropout_p:                                 # not representable: exact
        if stats is not None:
            stats["exact_fallback"] = "mask is not causal + per-key" if split is None else "dropout"
        return exact_reference(q, k, v, mask, scale, softcap, causal, dropout_p)
    causal, key_bias = split
    q64 = q.double() * scale
    k64, v64 = expand_kv(q, k).double(), expand_kv(q, v).double()
    b, h, n, d = q64.shape
    kb = None
    if key_bias is not None:
        kb = key_bias.expand(b, h, n).reshape(b * h, n)
    out = attend_heads(q64.reshape(b * h, n, d), k64.reshape(b * h, n, d), v64.reshape(b * h, n, -1), kb,
                       causal, softcap, count, starts, eps, stats)
    return out.reshape(b, h, n, -1).to(q.dtype)


def reference(q, k, v, mask, scale: float, softcap: float, causal: bool, dropout_p: float,
              k_basis: int, starts: list[int] | None, eps: float):
    return _attend(q, k, v, mask, scale, softcap, causal, dropout_p, k_basis, starts, eps)


op = define_attention_op(OP_NAME, reference, "int k_basis, int[]? starts, float eps")
backward_op = BACKWARD_OPS[OP_NAME]


def op_args(site, options: dict) -> tuple:
    return int(options["k"]), options.get("starts"), float(options["eps"])


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


def auto_ladder(site, options: dict) -> list[dict]:
    n = site.kv_len if isinstance(site.kv_len, int) else 1 << 15
    ladder, k = [], 1
    while k < n:
        ladder.append({"k": k})
        k *= 2
    return ladder + [{"k": n}]


def diagnostics(q, k, v, mask, scale, softcap, causal, options: dict) -> dict:
    stats: dict = {}
    _attend(q, k, v, mask, scale, softcap, causal, 0.0, int(options["k"]), options.get("starts"),
            float(options["eps"]), stats)
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


def onnx_lower(b, site, q, k, v, mask, options: dict) -> str:
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
    count, fixed, eps = op_args(site, options)
    out_dt = b.dtype(q)
    F64, I64, BOOL = TP.DOUBLE, TP.INT64, TP.BOOL
    q, k, v = (b.cast(x, F64) for x in (q, k, v))
    if isinstance(site.heads, int) and isinstance(site.kv_heads, int) and site.heads != site.kv_heads:
        k, v = R.repeat_kv(b, k, site.heads, site.kv_heads), R.repeat_kv(b, v, site.heads, site.kv_heads)
    f = lambda x: b.const(np.array(x, np.float64))                # noqa: E731 - a 0-d double
    i = lambda x: b.const(np.array(x, np.int64))                  # noqa: E731 - a 0-d int64
    ninf = f(-math.inf)
    big = np.iinfo(np.int64)

    def reduce(op, x, axes, keepdims=1):
        if (op == "ReduceSum" and b.opset >= 13) or b.opset >= 18:     # axes as an input
            return b.op(op, x, b.ints(*axes), keepdims=keepdims)
        return b.op(op, x, axes=list(axes), keepdims=keepdims)

    def where(c, x, y):
        return b.op("Where", c, x, y, dtype=b.dtype(x))

    def cmp(op, x, y):
        return b.op(op, x, y, dtype=BOOL)

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
