"""The op's PyTorch path: the mask split into causal + key bias, attend_heads (starts, start columns,
H̃·[V·w | w], normalisation, exact fallback rows), the basis-error diagnostic, `reference`, and the
same steps on the generated kernels (`kernel_forward`)."""
from __future__ import annotations

import math

import torch

from ..base import MASK_REMOVED, expand_kv, safe_softmax
from ..exact import attention as exact_attention
from .convolve import _conv_apply, is_dense
from .selection import _start_columns, find_starts, scores, search_starts

RELIABLE = 1e6            # float64: a row's normaliser must exceed 1e6 × its FFT error estimate (≈ 6 digits)
RELIABLE_F32 = 1e3        # float32: the same test with float32's unit round-off (≈ 3 digits, worst case)
DIAG_ROWS = 64            # rows sampled per head for the basis-error diagnostic


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


def _exact_rows(q, k, v, rows, key_bias, causal, softcap):
    """softmax rows of one head recomputed directly, O(len(rows)·n·d)."""
    n, out = k.shape[0], []
    for part in rows.split(1024):                                  # O(1024·n) memory at a time
        s = scores(q[part], k.T, softcap)
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
        st = _choose_starts(qq, kk, ww, strict, starts, count, eps, delta, segment, softcap)
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
        out, bad = _normalise(y, noise, reliable, q, k, v, key_bias, causal, softcap)
    if stats is not None:
        _record(stats, bad, plans, q, k, key_bias, causal, softcap)
    return out


def _choose_starts(q, k, w, strict, starts, count, eps, delta, segment, softcap):
    """(G, k') start columns of one triangle: searched, ranked by norm, or the fixed ones (0 added)."""
    g, n, _ = q.shape
    if starts == "search":
        st = search_starts(q, k, count, delta, segment, strict, softcap)
    elif isinstance(starts, str) or starts is None:
        st = find_starts(q, k, count, eps, strict, w, softcap)
    else:
        st = torch.tensor(sorted({0, *[min(s, n - 1) for s in starts]}), device=q.device).expand(g, -1)
    return st.contiguous()


def _normalise(y, noise, reliable, q, k, v, key_bias, causal, softcap):
    """(out, bad): the rows of H̃·[V·w | w] divided by their normaliser; rows whose normaliser is not
    above `reliable` × its error estimate (bad) recomputed exactly."""
    norm = y[..., -1]
    out = y[..., :-1] / norm.clamp_min(torch.finfo(norm.dtype).tiny)[..., None]
    bad = norm <= reliable * noise
    for h in bad.any(-1).nonzero()[:, 0].tolist():
        rows = bad[h].nonzero()[:, 0]
        out[h, rows] = _exact_rows(q[h], k[h], v[h], rows, None if key_bias is None else key_bias[h],
                                   causal, softcap)
    return out, bad


def _record(stats, bad, plans, q, k, key_bias, causal, softcap):
    """Adds to `stats` the fallback rows, the rows, the distinct starts per head and the basis error
    of up to 8 heads."""
    g, n, _ = q.shape
    stats["fallback_rows"] = stats.get("fallback_rows", 0) + int(bad.sum())
    stats["rows"] = stats.get("rows", 0) + g * n
    stats.setdefault("starts", []).extend(
        sum(len(set(p[0][h].tolist())) for p in plans) / len(plans) for h in range(g))
    for h in torch.linspace(0, g - 1, min(g, 8)).round().long().unique().tolist():
        stats.setdefault("basis_err", []).append(_basis_error(
            q[h], k[h], None if key_bias is None else key_bias[h], causal, softcap,
            [p[0][h] for p in plans]))


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
    s = scores(q[rows], k.T, softcap)
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


def working_dtype(precision: str, dtype: torch.dtype, n: int) -> torch.dtype:
    """float32 or float64: as asked, or (auto) float32 on the FFT path for inputs that are not float64."""
    if precision in ("float32", "float64"):
        return getattr(torch, precision)
    return torch.float64 if dtype == torch.float64 or is_dense(n) else torch.float32


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


