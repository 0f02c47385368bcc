"""Template: sparse attention, window mode — a band around each query's diagonal plus sink keys.

Row i (its key position i' = i + Lk - Lq) keeps key j iff
    i' - BEFORE <= j <= i' + AFTER   or   j < SINKS,   and j <= i' when CAUSAL
(common._visible with WINDOW = (BEFORE, AFTER, SINKS)), and renormalises its softmax over those
keys (the site's mask still applies). One program per (query block, batch·head) visits three
disjoint key ranges: the sink blocks below the band, the band's blocks, and sink blocks above the
band (two-sided windows only), so the work per row is O(BLOCK_M + BEFORE + AFTER + SINKS), never
Lk. Forward only: the op's backward runs the PyTorch reference.
"""
import triton
import triton.language as tl

from .common import _attend, _finish, _query_tile, _store_out, _store_stats, launch_rows


@triton.jit
def attn_fwd(Q, K, V, Mask, O, M, L, sm_scale,
             sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
             smb, smh, smm, smn, H, Lq, Lk,
             HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
             GROUP: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr,
             DOT_PRECISION: tl.constexpr, BEFORE: tl.constexpr, AFTER: tl.constexpr, SINKS: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, offs_m, off_b, off_h, q, k_base, v_base, mask_base = _query_tile(
        Q, K, V, Mask, sqb, sqh, sqm, skb, skh, svb, svh, smb, smh, H, Lq, HEAD_DIM, D_PAD, GROUP, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    first = start_m + Lk - Lq                              # the block's first and last diagonal
    last = tl.minimum(start_m + BLOCK_M, Lq) - 1 + Lk - Lq
    band_end = last + AFTER
    if CAUSAL:
        band_end = last
    band_lo = tl.minimum(tl.maximum(first - BEFORE, 0), Lk) // BLOCK_N * BLOCK_N
    band_hi = tl.cdiv(tl.minimum(tl.maximum(band_end + 1, 0), Lk), BLOCK_N) * BLOCK_N
    band_hi = tl.maximum(band_hi, band_lo)
    sinks_hi = tl.cdiv(tl.minimum(SINKS, Lk), BLOCK_N) * BLOCK_N
    window = (BEFORE, AFTER, SINKS)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, skn, svn, mask_base, smm, smn, sm_scale, offs_m,
                            0, tl.minimum(sinks_hi, band_lo), Lq, Lk, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD,
                            CAUSAL, window, MASK, SOFTCAP, DOT_PRECISION, BLOCK_N, True)      # sinks below the band
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, skn, svn, mask_base, smm, smn, sm_scale, offs_m,
                            band_lo, band_hi, Lq, Lk, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD,
                            CAUSAL, window, MASK, SOFTCAP, DOT_PRECISION, BLOCK_N, True)      # the band
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, skn, svn, mask_base, smm, smn, sm_scale, offs_m,
                            band_hi, sinks_hi, Lq, Lk, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD,
                            CAUSAL, window, MASK, SOFTCAP, DOT_PRECISION, BLOCK_N, True)      # sinks above it
    out, m_row, l_row = _finish(acc, m_i, l_i)
    _store_out(O, off_b, off_h, sob, soh, som, offs_m, Lq, out, HEAD_DIM_V, DV_PAD)
    _store_stats(M, L, tl.program_id(1) * Lq, offs_m, Lq, m_row, l_row)


# ---------------------------------------------------------------- host side

def forward(cfg, q, k, v, mask, scale):
    """(out, (m, l)) as the exact template's forward, over the band and sinks only."""
    return launch_rows(cfg, attn_fwd, q, k, v, mask, scale)


def aot_kernels(cfg, dtype, mask_dtype):
    """(kernel, pointer types, launch keywords) for an ahead-of-time compile."""
    ptr = "*" + dtype
    io = {"Q": ptr, "K": ptr, "V": ptr, "Mask": "*" + mask_dtype, "O": ptr, "M": "*fp32", "L": "*fp32"}
    return [(attn_fwd, io, cfg.launch(attn_fwd))]
