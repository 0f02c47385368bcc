"""The helpers every template imports: tile loads and stores, scores, the online softmax and the
backward's pieces (device side, `@triton.jit`), and the launchers the exact, window and
block-sparse templates share (host side).

Nothing here reads a global setting: a site's specialisation reaches each kernel as
`tl.constexpr` arguments (KernelConfig.constants and its tiles, filled in at launch by
`KernelConfig.launch`), and each helper takes the ones it uses:

  HEAD_DIM, HEAD_DIM_V   the site's q/k and v head sizes; D_PAD, DV_PAD their next powers of two (≥ 16)
  GROUP                  query heads per kv head (GQA); 1 for plain multi-head attention
  CAUSAL                 bottom-right causal: key j is visible to query i iff j <= i + Lk - Lq
  WINDOW                 None, or the window template's (BEFORE, AFTER, SINKS): see `_visible`
  MASK                   "none", "key" (one bias row for every query: key padding), "additive", "boolean"
  SOFTCAP                0.0 for none, else scores become SOFTCAP * tanh(scores / SOFTCAP)
  DOT_PRECISION          fp32 sites: "tf32x3" on a GPU (about fp32's accuracy on tensor cores),
                         "ieee" in the interpreter; ignored for half types
  BLOCK_M, BLOCK_N       query rows and keys per tile

Scores are kept in base 2: s2 = (scale·q·kᵀ [soft-capped] + bias) · log2(e), so the softmax
uses exp2. A key that is not visible scores -inf; a row that sees no key ends with l = 0 and
returns zeros (its max is stored as +inf so that the backward's p = exp2(s2 - m) / l is 0).
"""
import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tanh(x):
    """tanh from exp2, saturating to ±1 (exp2 overflows to inf, 2 / inf = 0)."""
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def _load_rows(base, offs, stride, L, offs_d, DIM: tl.constexpr):
    """A (len(offs), len(offs_d)) tile of rows offs < L; padding reads 0."""
    ptrs = base + offs[:, None] * stride + offs_d[None, :]
    return tl.load(ptrs, mask=(offs[:, None] < L) & (offs_d[None, :] < DIM), other=0.0)


@triton.jit
def _load_cols(base, offs, stride, L, offs_d, DIM: tl.constexpr):
    """The same rows transposed, (len(offs_d), len(offs)), read straight from memory in that order
    (so the load can go to shared memory as the dot's operand without a register transpose)."""
    ptrs = base + offs[None, :] * stride + offs_d[:, None]
    return tl.load(ptrs, mask=(offs[None, :] < L) & (offs_d[:, None] < DIM), other=0.0)


@triton.jit
def _finite_floor(b):
    """A finite bias raised to at least -1e30 (so × log2(e) cannot overflow to -inf: a row whose
    every key carries fp32's lowest value stays a uniform row, as in the reference); -inf stays."""
    return tl.where(b == float("-inf"), b, tl.maximum(b, -1.0e30))


@triton.jit
def _bias(mask_base, smm, smn, offs_m, offs_n, Lq, Lk, MASK: tl.constexpr):
    """The mask's contribution to a (BLOCK_M, BLOCK_N) tile: an additive bias, or -inf where a
    boolean mask says False; 0.0 without a mask."""
    inside = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    if MASK == "key":
        b = tl.load(mask_base + offs_n * smn, mask=offs_n < Lk, other=0.0).to(tl.float32)
        return _finite_floor(b)[None, :]
    elif MASK == "additive":
        b = tl.load(mask_base + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=inside, other=0.0)
        return _finite_floor(b.to(tl.float32))
    elif MASK == "boolean":
        keep = tl.load(mask_base + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=inside, other=0)
        return tl.where(keep != 0, 0.0, float("-inf"))
    else:
        return 0.0


@triton.jit
def _scores(q, kt, sm_scale, mask_base, smm, smn, offs_m, offs_n, Lq, Lk,
            MASK: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(s2, t): a tile's scores in base 2 (soft-capped, plus the mask's bias; visibility is the
    caller's) and tanh(raw / SOFTCAP), whose 1 - t² the backward needs (t = raw without a cap)."""
    raw = tl.dot(q, kt, input_precision=DOT_PRECISION) * sm_scale
    if SOFTCAP != 0.0:
        t = _tanh(raw / SOFTCAP)
        s = SOFTCAP * t
    else:
        t = raw
        s = raw
    s = s + _bias(mask_base, smm, smn, offs_m, offs_n, Lq, Lk, MASK)
    return s * LOG2E, t


@triton.jit
def _visible(offs_m, offs_n, Lq, Lk, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Which keys of a tile each row keeps. Row i's diagonal is i' = i + Lk - Lq. WINDOW None:
    every key, or (CAUSAL) those at or below the diagonal. WINDOW (BEFORE, AFTER, SINKS): the
    band i' - BEFORE <= j <= i' + AFTER and the sinks j < SINKS (and j <= i' when CAUSAL)."""
    diag = offs_m[:, None] + (Lk - Lq)
    if WINDOW is None:
        if CAUSAL:
            return offs_n[None, :] <= diag
        else:
            return offs_n[None, :] >= 0
    else:
        keep = (offs_n[None, :] >= diag - WINDOW[0]) & (offs_n[None, :] <= diag + WINDOW[1])
        keep = keep | (offs_n[None, :] < WINDOW[2])
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= diag)
        return keep


@triton.jit
def _online(acc, m_i, l_i, s2, v, DOT_PRECISION: tl.constexpr):
    """One step of the online softmax: fold a tile of base-2 scores and its values into
    (acc, running max, running sum). Fully -inf rows stay at acc = 0, l = 0."""
    m_new = tl.maximum(m_i, tl.max(s2, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s2 - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend(acc, m_i, l_i, q, k_base, v_base, skn, svn, mask_base, smm, smn, sm_scale, offs_m, lo, hi, Lq, Lk,
            HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
            CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr,
            DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr):
    """Fold key blocks lo, lo + BLOCK_N, ... < hi into the online softmax. EDGE: the blocks may
    hold keys a row must not see (`_visible`, or past Lk), so each tile is masked; without it
    every key of every block is visible and no element mask is built."""
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = _load_cols(k_base, offs_n, skn, Lk, offs_d, HEAD_DIM)
        v = _load_rows(v_base, offs_n, svn, Lk, offs_dv, HEAD_DIM_V)
        s2, t = _scores(q, kt, sm_scale, mask_base, smm, smn, offs_m, offs_n, Lq, Lk, MASK, SOFTCAP, DOT_PRECISION)
        if EDGE:
            keep = _visible(offs_m, offs_n, Lq, Lk, CAUSAL, WINDOW) & (offs_n[None, :] < Lk)
            s2 = tl.where(keep, s2, float("-inf"))
        acc, m_i, l_i = _online(acc, m_i, l_i, s2, v, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _finish(acc, m_i, l_i):
    """(out, m, l): the normalised output tile, and each row's running max (base 2) and sum as
    the backward rebuilds p = exp2(s2 - m) / l from them. A row that saw no key has out = 0,
    m = +inf (so its p is 0) and l = 1. (m and l are kept apart, not folded into one log-sum-exp:
    m + log2(l) loses l when a bias near fp32's lowest value makes |m| ~ 1e30.)"""
    dead = l_i == 0.0
    out = acc / tl.where(dead, 1.0, l_i)[:, None]
    return out, tl.where(dead, float("inf"), m_i), tl.where(dead, 1.0, l_i)


@triton.jit
def attn_bwd_delta(O, DO, Delta, Lq, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, ROWS: tl.constexpr):
    """Δ = rowsum(O ∘ dO) over contiguous (B·H·Lq, Dv) rows."""
    offs_m = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs_dv = tl.arange(0, DV_PAD)
    base = tl.program_id(1) * Lq * HEAD_DIM_V
    inside = (offs_m[:, None] < Lq) & (offs_dv[None, :] < HEAD_DIM_V)
    o = tl.load(O + base + offs_m[:, None] * HEAD_DIM_V + offs_dv[None, :], mask=inside, other=0.0)
    do = tl.load(DO + base + offs_m[:, None] * HEAD_DIM_V + offs_dv[None, :], mask=inside, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + tl.program_id(1) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _key_range(start_m, Lq, Lk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full, hi): a query block starting at start_m sees keys [0, hi); the key blocks below
    `full` are visible to every row of it (no element mask needed)."""
    if CAUSAL:
        hi = tl.maximum(tl.minimum(Lk, start_m + BLOCK_M + Lk - Lq), 0)
        full = tl.maximum(tl.minimum(Lk, start_m + 1 + Lk - Lq), 0) // BLOCK_N * BLOCK_N
    else:
        hi = Lk
        full = Lk // BLOCK_N * BLOCK_N
    return full, hi


@triton.jit
def _query_tile(Q, K, V, Mask, sqb, sqh, sqm, skb, skh, svb, svh, smb, smh, H, Lq,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's query tile — rows start_m … start_m + BLOCK_M of head program_id(1) — as
    (start_m, offs_m, off_b, off_h, q, k_base, v_base, mask_base): its batch and query head, its
    q rows, and where its (GQA-shared) keys and values and its mask start."""
    start_m = tl.program_id(0) * BLOCK_M
    off_b = tl.program_id(1) // H
    off_h = tl.program_id(1) % H
    off_hk = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + off_b * sqb + off_h * sqh, offs_m, sqm, Lq, tl.arange(0, D_PAD), HEAD_DIM)
    return (start_m, offs_m, off_b, off_h, q, K + off_b * skb + off_hk * skh, V + off_b * svb + off_hk * svh,
            Mask + off_b * smb + off_h * smh)


@triton.jit
def _store_out(O, off_b, off_h, sob, soh, som, offs_m, Lq, out, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr):
    """The tile's output rows, in O's dtype."""
    offs_dv = tl.arange(0, DV_PAD)
    tl.store(O + off_b * sob + off_h * soh + offs_m[:, None] * som + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _row_stats(M, L, Delta, row0, offs_m, Lq):
    """The forward's row max and normaliser and the backward's Δ for rows offs_m of one (batch, head)
    whose first row is row0 of the (B·H·Lq,) buffers; rows past Lq read as dead (p = 0)."""
    live = offs_m < Lq
    return (tl.load(M + row0 + offs_m, mask=live, other=float("inf")),
            tl.load(L + row0 + offs_m, mask=live, other=1.0),
            tl.load(Delta + row0 + offs_m, mask=live, other=0.0))


@triton.jit
def _store_stats(M, L, row0, offs_m, Lq, m_row, l_row):
    """The forward's row max and normaliser, kept for the backward."""
    tl.store(M + row0 + offs_m, m_row, mask=offs_m < Lq)
    tl.store(L + row0 + offs_m, l_row, mask=offs_m < Lq)


@triton.jit
def _store_grad(G, row0, offs, Ln, x, DIM: tl.constexpr, PAD: tl.constexpr):
    """A gradient tile x (rows offs, PAD columns) into the contiguous (·, DIM) buffer G from row row0."""
    offs_d = tl.arange(0, PAD)
    tl.store(G + (row0 + offs[:, None]) * DIM + offs_d[None, :], x, mask=(offs[:, None] < Ln) & (offs_d[None, :] < DIM))


@triton.jit
def _ds(q, kt, v, do, m_row, l_row, delta, sm_scale, offs_m, offs_n, mask_base, smm, smn, Lq, Lk,
        CAUSAL: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
        EDGE: tl.constexpr):
    """(p, dS) of one tile: the softmax weights rebuilt from each row's stored max and sum, and
    the gradient with respect to the scaled scores (through the soft-cap). EDGE as in `_attend`:
    the tile may hold keys a row must not see, so it is masked."""
    s2, t = _scores(q, kt, sm_scale, mask_base, smm, smn, offs_m, offs_n, Lq, Lk, MASK, SOFTCAP, DOT_PRECISION)
    if EDGE:
        s2 = tl.where(_visible(offs_m, offs_n, Lq, Lk, CAUSAL, None) & (offs_n[None, :] < Lk), s2, float("-inf"))
    p = tl.exp2(s2 - m_row[:, None]) / l_row[:, None]
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if SOFTCAP != 0.0:
        ds = ds * (1.0 - t * t)
    return p, ds


# ---------------------------------------------------------------- host side

def backward_buffers(cfg, out, m, grad, q, k, v, mask):
    """What the backward kernels share once the forward has been rerun (out, and each row's max
    m): the gradient made contiguous in q's dtype, Δ = rowsum(O∘dO) (attn_bwd_delta), k/v
    broadcast over the batch, fp32 dq/dk/dv buffers and the strides every backward kernel takes
    (q, k, v, dO, mask)."""
    b, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    grad = grad.to(q.dtype).contiguous()
    delta = torch.empty_like(m)
    launch = delta_launch(cfg)
    attn_bwd_delta[(triton.cdiv(lq, launch["ROWS"]), b * h)](out, grad, delta, lq, **launch)
    kx, vx = k.expand(b, *k.shape[1:]), v.expand(b, *v.shape[1:])
    dq = torch.empty((b, h, lq, q.shape[-1]), dtype=torch.float32, device=q.device)
    dk = torch.empty((b, hkv, lk, k.shape[-1]), dtype=torch.float32, device=q.device)
    dv = torch.empty((b, hkv, lk, v.shape[-1]), dtype=torch.float32, device=q.device)
    strides = (*q.stride()[:3], *kx.stride()[:3], *vx.stride()[:3], *grad.stride()[:3], *mask[1])
    return grad, delta, kx, vx, (dq, dk, dv), strides


def delta_launch(cfg):
    """attn_bwd_delta's launch keywords: 64 rows a program, 4 warps, one stage."""
    return {**cfg.constexprs(attn_bwd_delta), "ROWS": 64, "num_warps": 4, "num_stages": 1}


def backward_result(dq, dk, dv, q, k, v):
    """The fp32 gradients in q, k, v's dtypes and shapes (a batch-broadcast k/v's summed)."""
    b = q.shape[0]
    if k.shape[0] != b:
        dk, dv = dk.sum(0, keepdim=True), dv.sum(0, keepdim=True)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def launch_rows(cfg, kernel, q, k, v, mask, scale, lists=()):
    """Launch a forward kernel with the (Q, K, V, Mask, O, M, L, scale, strides…) signature of
    the exact and window templates — or, given the block-sparse template's four `lists`,
    (…, L, *lists, scale, strides…, the counts' and the indices' strides, …) — one program per
    BLOCK_M query rows of one (batch, head); returns (out, (m, l)): each row's max (base 2)
    and sum in fp32, for the backward."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    out = q.new_empty((b, h, lq, v.shape[-1]))
    m = torch.empty((b * h, lq), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    kx, vx = k.expand(b, *k.shape[1:]), v.expand(b, *v.shape[1:])
    list_strides = [s for t in lists[:2] for s in t.stride()]          # counts, then indices
    launch = cfg.launch(kernel)
    kernel[(triton.cdiv(lq, launch["BLOCK_M"]), b * h)](
        q, kx, vx, mask[0], out, m, l, *lists, scale, *q.stride()[:3], *kx.stride()[:3], *vx.stride()[:3],
        *out.stride()[:3], *mask[1], *list_strides, h, lq, lk, **launch)
    return out, (m, l)
