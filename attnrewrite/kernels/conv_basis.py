"""Template: conv-basis attention's steps around the FFTs.

The conv-basis op (variants/conv_basis/) stays a PyTorch pipeline — the start search and the
FFT apply H̃·[V·w | w] are torch code — and these kernels do the parts that touch q, k and v:

  cb_start_columns  the k start columns of the scores, col[i, t] = s[sᵢ + t, sᵢ] (scaled, soft-capped;
                    −inf past the end, and at t = 0 for the strictly upper part, which works on the
                    reversed sequence: its position p is token n − 1 − p). One program per (tile of
                    t, start i, head); each reads key sᵢ once and a tile of query rows.
  cb_normalise      out = (H̃V) / (H̃·1) row by row, and the reliability test: a row whose normaliser
                    is at or below `reliable` × its FFT error estimate is flagged (bad = 1).
  cb_exact_rows     exact attention for a list of rows (the flagged ones): one program per row, an
                    online softmax over every key it sees (the key bias, causal), written into the
                    output in place — O(rows·n·d).

Everything is computed in the pipeline's working precision (WORK_F64: float64, else float32),
from q/k/v in the site's dtype (kv head h // GROUP, a batch-1 K/V read with stride 0), so the
kernels give the reference's numbers up to the order of the sums. No tl.dot: every product is a
row against a tile (matrix-vector work), which float64 allows too. Forward only.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _work(x, WORK_F64: tl.constexpr):
    """x in the working precision."""
    if WORK_F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _recip(x, WORK_F64: tl.constexpr):
    """1 / x for x ≥ 1. In float64 without a division (ptxas makes one a subroutine call, whose frame
    counts as a spill): float32's reciprocal refined by two Newton steps, r ← r·(2 − x·r), each of
    which squares the relative error (1e-7 → 1e-14 → round-off); x past float32's range gives 0."""
    if WORK_F64:
        r = (1.0 / x.to(tl.float32)).to(tl.float64)
        r = r * (2.0 - x * r)
        return r * (2.0 - x * r)
    else:
        return 1.0 / x


@triton.jit
def _capped(s, SOFTCAP: tl.constexpr, WORK_F64: tl.constexpr):
    """SOFTCAP·tanh(s / SOFTCAP), tanh(y) = 1 − 2 / (e^{2y} + 1), saturating to ±1 (2y is capped at 80,
    where tanh is 1 to float64's precision and e^{2y} still fits float32, as _recip needs)."""
    if SOFTCAP != 0.0:
        two_y = tl.minimum(s * (2.0 / SOFTCAP), 80.0, propagate_nan=tl.PropagateNan.ALL)
        return SOFTCAP * (1.0 - 2.0 * _recip(tl.exp(two_y) + 1.0, WORK_F64))
    else:
        return s


@triton.jit
def cb_start_columns(Q, K, Starts, Scale, Cols, sqb, sqh, sqm, skb, skh, skn, H, N, KB,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr, SOFTCAP: tl.constexpr,
                     WORK_F64: tl.constexpr, STRICT: tl.constexpr, BLOCK_N: tl.constexpr):
    tiles = tl.cdiv(N, BLOCK_N)
    i = tl.program_id(0) // tiles               # the start; axis 0 also walks the tiles (no 65535 limit)
    g = tl.program_id(1)
    off_b = g // H
    off_h = g % H
    off_hk = off_h // GROUP
    t = (tl.program_id(0) % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(Starts + g * KB + i)
    row = start + t
    live = row < N
    if STRICT:                                   # reversed coordinates, the diagonal excluded
        live = live & (t > 0)
        q_row = N - 1 - row
        k_row = N - 1 - start
    else:
        q_row = row
        k_row = start
    offs_d = tl.arange(0, D_PAD)
    key = tl.load(K + off_b * skb + off_hk * skh + k_row * skn + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
    key = _work(key, WORK_F64)
    q = tl.load(Q + off_b * sqb + off_h * sqh + q_row[:, None] * sqm + offs_d[None, :],
                mask=live[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    s = _capped(tl.sum((_work(q, WORK_F64) * tl.load(Scale)) * key[None, :], 1), SOFTCAP, WORK_F64)
    tl.store(Cols + (g * KB + i).to(tl.int64) * N + t, tl.where(live, s, float("-inf")), mask=t < N)


@triton.jit
def cb_normalise(Y, Noise, O, Bad, reliable, sng, snr, N, ROWS,
                 HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, WORK_F64: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)   # flat rows g·N + r (G·N < 2³¹)
    live = rows < ROWS
    offs = rows.to(tl.int64)                     # element offsets may pass 2³¹
    offs_dv = tl.arange(0, DV_PAD)
    inside = live[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    y = tl.load(Y + offs[:, None] * (HEAD_DIM_V + 1) + offs_dv[None, :], mask=inside, other=0.0)
    norm = tl.load(Y + offs * (HEAD_DIM_V + 1) + HEAD_DIM_V, mask=live, other=1.0)
    noise = tl.load(Noise + (rows // N) * sng + (rows % N) * snr, mask=live, other=0.0)
    if WORK_F64:                                 # no zero normaliser: at least the finfo's tiny
        norm_safe = tl.maximum(norm, 2.2250738585072014e-308)
    else:
        norm_safe = tl.maximum(norm, 1.1754943508222875e-38)
    out = y * (1.0 / norm_safe)[:, None]         # one division per row (float64's is a subroutine)
    tl.store(O + offs[:, None] * HEAD_DIM_V + offs_dv[None, :], out.to(O.dtype.element_ty), mask=inside)
    tl.store(Bad + offs, (norm <= reliable * noise).to(tl.int8), mask=live)


@triton.jit
def cb_exact_rows(Q, K, V, Bias, Scale, O, Rows, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sbg, H, N,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                  GROUP: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr,
                  WORK_F64: tl.constexpr, BLOCK_N: tl.constexpr):
    idx = tl.load(Rows + tl.program_id(0))       # flat row g·N + r, int32 (64-bit division is a subroutine)
    g = idx // N
    r = idx % N
    off_b = g // H
    off_h = g % H
    off_hk = off_h // GROUP
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = tl.load(Q + off_b * sqb + off_h * sqh + r * sqm + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
    q = _work(q, WORK_F64) * tl.load(Scale)
    k_base = K + off_b * skb + off_hk * skh
    v_base = V + off_b * svb + off_hk * svh
    m_i = _work(tl.full([1], float("-inf"), tl.float32), WORK_F64)
    l_i = _work(tl.zeros([1], tl.float32), WORK_F64)
    acc = _work(tl.zeros([DV_PAD], tl.float32), WORK_F64)
    hi = N
    if CAUSAL:
        hi = r + 1
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        live = offs_n < hi
        kt = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :],
                     mask=live[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        s = _capped(tl.sum(q[None, :] * _work(kt, WORK_F64), 1), SOFTCAP, WORK_F64)
        if MASK == "key":
            s = s + tl.load(Bias + g * sbg + offs_n, mask=live, other=0.0)
        s = tl.where(live, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :],
                    mask=live[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * _work(v, WORK_F64), 0)
        m_i = m_new
    out = acc * _recip(tl.where(l_i == 0.0, 1.0, l_i), WORK_F64)   # l ≥ 1 (its max term is 1); no key seen: zeros
    tl.store(O + idx.to(tl.int64) * HEAD_DIM_V + offs_dv, out.to(O.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)


# ---------------------------------------------------------------- host side

def _work_dtype(cfg):
    """The pipeline's working precision, which cfg's WORK_F64 names."""
    return torch.float64 if dict(cfg.params)["WORK_F64"] else torch.float32


def _rows_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _scale(cfg, scale, device):
    """The scale as a one-element tensor in the working precision (a float argument would be fp32)."""
    return torch.full((1,), float(scale), dtype=_work_dtype(cfg), device=device)


def start_columns(cfg, q, k, scale, starts, strict: bool):
    """(B·H, k, n) in the working precision: col[i, t] = s[sᵢ + t, sᵢ] for each head's starts
    (B·H, k), sorted or not; strict: the strictly upper part, in reversed coordinates."""
    b, h, n, _ = q.shape
    q, k = _rows_last(q), _rows_last(k)
    kx = k.expand(b, *k.shape[1:])
    starts = starts.contiguous()
    count = starts.shape[1]
    cols = torch.empty((b * h, count, n), dtype=_work_dtype(cfg), device=q.device)
    launch = cfg.launch(cb_start_columns)
    cb_start_columns[(triton.cdiv(n, launch["BLOCK_N"]) * count, b * h)](
        q, kx, starts, _scale(cfg, scale, q.device), cols, *q.stride()[:3], *kx.stride()[:3], h, n, count,
        STRICT=bool(strict), **launch)
    return cols


def normalise(cfg, y, noise, reliable: float, dtype):
    """(out (G, n, Dv) in dtype, bad (G, n) bool): y (G, n, Dv + 1) = [H̃V | H̃·1] in the working
    precision, noise (G, n) or (G, 1) its normaliser's error estimate."""
    g, n, m = y.shape
    if g * n >= 2 ** 31:
        raise ValueError(f"conv-basis kernels index rows in int32: {g} heads × {n} rows is too many")
    y = y.contiguous()
    out = torch.empty((g, n, m - 1), dtype=dtype, device=y.device)
    bad = torch.empty((g, n), dtype=torch.int8, device=y.device)
    launch = cfg.launch(cb_normalise)
    cb_normalise[(triton.cdiv(g * n, launch["BLOCK_M"]),)](
        y, noise, out, bad, float(reliable), noise.stride(0), noise.stride(1) if noise.shape[1] > 1 else 0,
        n, g * n, **launch)
    return out, bad.bool()


def exact_rows(cfg, q, k, v, bias, scale, rows, out):
    """Overwrite out's rows (flat indices g·n + r, g = b·H + h) with exact attention: bias (G, n)
    in the working precision, the key bias (None without one)."""
    b, h, n, _ = q.shape
    if rows.numel() == 0:
        return out
    q, k, v = _rows_last(q), _rows_last(k), _rows_last(v)
    kx, vx = k.expand(b, *k.shape[1:]), v.expand(b, *v.shape[1:])
    bias_t, sbg = (q, 0) if bias is None else (bias, bias.stride(0))
    cb_exact_rows[(rows.numel(),)](
        q, kx, vx, bias_t, _scale(cfg, scale, q.device), out, rows.to(torch.int32).contiguous(),
        *q.stride()[:3], *kx.stride()[:3], *vx.stride()[:3], sbg, h, n, **cfg.launch(cb_exact_rows))
    return out


def aot_kernels(cfg, dtype, mask_dtype):
    """(kernel, pointer types, launch keywords) for an ahead-of-time compile."""
    ptr, work = "*" + dtype, "*fp64" if dict(cfg.params)["WORK_F64"] else "*fp32"
    columns = {"Q": ptr, "K": ptr, "Starts": "*i64", "Scale": work, "Cols": work}
    return [(cb_start_columns, columns, {**cfg.launch(cb_start_columns), "STRICT": False}),
            (cb_start_columns, columns, {**cfg.launch(cb_start_columns), "STRICT": True}),
            (cb_normalise, {"Y": work, "Noise": work, "O": ptr, "Bad": "*i8"}, cfg.launch(cb_normalise)),
            (cb_exact_rows, {"Q": ptr, "K": ptr, "V": ptr, "Bias": work, "Scale": work, "O": ptr, "Rows": "*i32"},
             cfg.launch(cb_exact_rows))]
