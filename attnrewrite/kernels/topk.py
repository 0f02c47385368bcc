"""Template: sparse attention, top-k mode — each query attends to its own k kept keys.

The selection (the k highest masked scores of each row) happens before the kernel, in PyTorch
(dispatch.topk_indices); the kernel gathers only the kept keys: one program per (query row,
batch·head) walks the row's KEPT indices in BLOCK_N chunks, loads those K and V rows, scores
them (scale, soft-cap, the site's mask at those keys, causal), and keeps an online softmax over
them. Work per row is O(KEPT·D), never Lk. Forward only: the op's backward runs the reference.
"""
import torch
import triton
import triton.language as tl

from .common import LOG2E, _finite_floor, _tanh


@triton.jit
def attn_fwd(Q, K, V, Mask, O, Idx, sm_scale,
             sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
             smb, smh, smm, smn, sib, sih, sim, H, Lq, Lk, KEPT,
             HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
             GROUP: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr,
             BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    off_b = tl.program_id(1) // H
    off_h = tl.program_id(1) % H
    off_hk = off_h // GROUP
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = tl.load(Q + off_b * sqb + off_h * sqh + row * sqm + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
    q = q.to(tl.float32)
    k_base = K + off_b * skb + off_hk * skh
    v_base = V + off_b * svb + off_hk * svh
    mask_base = Mask + off_b * smb + off_h * smh
    idx_base = Idx + off_b * sib + off_h * sih + row * sim
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([DV_PAD], tl.float32)
    for start in range(0, KEPT, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        live = offs < KEPT
        j = tl.load(idx_base + offs, mask=live, other=0)
        kt = tl.load(k_base + j[None, :] * skn + offs_d[:, None], mask=live[None, :] & (offs_d[:, None] < HEAD_DIM),
                     other=0.0).to(tl.float32)
        raw = tl.sum(q[:, None] * kt, 0) * sm_scale
        if SOFTCAP != 0.0:
            s = SOFTCAP * _tanh(raw / SOFTCAP)
        else:
            s = raw
        if MASK == "key":
            s = s + _finite_floor(tl.load(mask_base + j * smn, mask=live, other=0.0).to(tl.float32))
        elif MASK == "additive":
            s = s + _finite_floor(tl.load(mask_base + row * smm + j * smn, mask=live, other=0.0).to(tl.float32))
        elif MASK == "boolean":
            keep = tl.load(mask_base + row * smm + j * smn, mask=live, other=0)
            s = tl.where(keep != 0, s, float("-inf"))
        visible = live
        if CAUSAL:
            visible = visible & (j <= row + Lk - Lq)
        s2 = tl.where(visible, s * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s2 - m_safe)
        v = tl.load(v_base + j[:, None] * svn + offs_dv[None, :], mask=live[:, None] & (offs_dv[None, :] < HEAD_DIM_V),
                    other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(O + off_b * sob + off_h * soh + row * som + offs_dv, out.to(O.dtype.element_ty),
             mask=offs_dv < HEAD_DIM_V)


# ---------------------------------------------------------------- host side

def forward(cfg, q, k, v, mask, scale, idx):
    """(out, None): idx (B, H, Lq, kept) int32/int64, each row's kept key indices."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    out = q.new_empty((b, h, lq, v.shape[-1]))
    kx, vx = k.expand(b, *k.shape[1:]), v.expand(b, *v.shape[1:])
    idx = idx.to(torch.int32).contiguous()
    attn_fwd[(lq, b * h)](
        q, kx, vx, mask[0], out, idx, scale, *q.stride()[:3], *kx.stride()[:3], *vx.stride()[:3],
        *out.stride()[:3], *mask[1], *idx.stride()[:3], h, lq, lk, idx.shape[-1], **cfg.launch(attn_fwd))
    return out, None


def aot_kernels(cfg, dtype, mask_dtype):
    """(kernel, pointer types, launch keywords) for an ahead-of-time compile."""
    ptr = "*" + dtype
    io = {"Q": ptr, "K": ptr, "V": ptr, "Mask": "*" + mask_dtype, "O": ptr, "Idx": "*i32"}
    return [(attn_fwd, io, cfg.launch(attn_fwd))]
