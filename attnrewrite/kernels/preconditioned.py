"""Template: preconditioned attention.

The exact flash loop with two changes, chosen by EQUILIBRATE:
  row-equilibrate  a second accumulator l2 = Σ exp(2s) beside l = Σ exp(s) (both rescaled as the
                   running max moves, l2 by alpha²); the output is acc / sqrt(l2), i.e. weights
                   e^s / (Σ e^{2s})^{1/2} (the softmax row divided by its L2 norm);
  output-norm      the epilogue divides each output row by its L2 norm (0 for a zero row).
Both then multiply by the head's gain (GAIN[h], a fp32 vector). Forward only: the op's backward
runs the PyTorch reference.
"""
import triton
import triton.language as tl

from .common import _key_range, _load_cols, _load_rows, _query_tile, _scores, _store_out, _visible


@triton.jit
def attn_fwd(Q, K, V, Mask, O, Gain, sm_scale,
             sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
             smb, smh, smm, smn, H, Lq, Lk,
             HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
             GROUP: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr,
             DOT_PRECISION: tl.constexpr, EQUILIBRATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, offs_m, off_b, off_h, q, k_base, v_base, mask_base = _query_tile(
        Q, K, V, Mask, sqb, sqh, sqm, skb, skh, svb, svh, smb, smh, H, Lq, HEAD_DIM, D_PAD, GROUP, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    l2_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    _, hi = _key_range(start_m, Lq, Lk, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = _load_cols(k_base, offs_n, skn, Lk, offs_d, HEAD_DIM)
        v = _load_rows(v_base, offs_n, svn, Lk, offs_dv, HEAD_DIM_V)
        s2, t = _scores(q, kt, sm_scale, mask_base, smm, smn, offs_m, offs_n, Lq, Lk, MASK, SOFTCAP, DOT_PRECISION)
        s2 = tl.where(_visible(offs_m, offs_n, Lq, Lk, CAUSAL, None) & (offs_n[None, :] < Lk), s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s2 - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        l2_i = l2_i * alpha * alpha + tl.sum(p * p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    if EQUILIBRATE:
        out = acc / tl.sqrt(tl.where(l2_i == 0.0, 1.0, l2_i))[:, None]
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        norm = tl.sqrt(tl.sum(out * out, 1))
        out = out / tl.where(norm == 0.0, 1.0, norm)[:, None]
    out = out * tl.load(Gain + off_h)
    _store_out(O, off_b, off_h, sob, soh, som, offs_m, Lq, out, HEAD_DIM_V, DV_PAD)


# ---------------------------------------------------------------- host side

def forward(cfg, q, k, v, mask, scale, gain):
    """(out, None): gain is a fp32 vector with one entry per query head."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    out = q.new_empty((b, h, lq, v.shape[-1]))
    kx, vx = k.expand(b, *k.shape[1:]), v.expand(b, *v.shape[1:])
    launch = cfg.launch(attn_fwd)
    attn_fwd[(triton.cdiv(lq, launch["BLOCK_M"]), b * h)](
        q, kx, vx, mask[0], out, gain, scale, *q.stride()[:3], *kx.stride()[:3], *vx.stride()[:3],
        *out.stride()[:3], *mask[1], h, lq, lk, **launch)
    return out, None


def aot_kernels(cfg, dtype, mask_dtype):
    """(kernel, pointer types, launch keywords) for an ahead-of-time compile."""
    ptr = "*" + dtype
    io = {"Q": ptr, "K": ptr, "V": ptr, "Mask": "*" + mask_dtype, "O": ptr, "Gain": "*fp32"}
    return [(attn_fwd, io, cfg.launch(attn_fwd))]
