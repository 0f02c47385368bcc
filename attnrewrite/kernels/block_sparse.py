"""Template: block-sparse attention over per-query-block lists of key blocks (read by
generate.py, never imported).

The layout is FlexAttention's: for query block I (SPARSE_M rows) of batch b, head h,
  kv_num[b, h, I]          how many *partial* key blocks it visits, listed first in kv_idx[b, h, I, :]
  full_num[b, h, I]        how many *full* key blocks, listed first in full_idx[b, h, I, :]
each entry a key-block index (SPARSE_N keys). A partial block applies the element mask (causal,
and keys past Lk); a full block is visible to every row of the query block and skips it (the
site's own mask, if any, still applies in both). Full blocks must lie inside [0, Lk). Rows keep
the union of their listed blocks and renormalise their softmax over it. One program per
(query tile of BLOCK_M rows, batch·head); each listed block is walked in BLOCK_N-key tiles.
Forward only here; the op's backward runs the PyTorch reference.
"""
import torch
import triton
import triton.language as tl

# --- template body ---


@triton.jit
def _visible(offs_m, offs_n, Lq, Lk):
    return _causal(offs_m, offs_n, Lq, Lk)


@triton.jit
def _listed(acc, m_i, l_i, q, k_base, v_base, skn, svn, mask_base, smm, smn, sm_scale, offs_m,
            Num, Idx, s_idx, Lq, Lk, BLOCK_N: tl.constexpr, EDGE: tl.constexpr):
    """Fold every key block listed in Idx[0 : Num] (SPARSE_N keys each) into the online softmax."""
    count = tl.load(Num)
    for i in range(0, count):
        start = tl.load(Idx + i * s_idx) * SPARSE_N
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, skn, svn, mask_base, smm, smn, sm_scale,
                                offs_m, start, start + SPARSE_N, Lq, Lk, BLOCK_N, EDGE)
    return acc, m_i, l_i


@triton.jit
def attn_fwd(Q, K, V, Mask, O, M, L, KvNum, KvIdx, FullNum, FullIdx, sm_scale,
             sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
             smb, smh, smm, smn, snb, snh, snm, sib, sih, sim, sin,
             H, Lq, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    off_b = tl.program_id(1) // H
    off_h = tl.program_id(1) % H
    off_hk = off_h // GROUP
    block = start_m // SPARSE_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, DV_PAD)
    q = _load_rows(Q + off_b * sqb + off_h * sqh, offs_m, sqm, Lq, tl.arange(0, D_PAD), HEAD_DIM)
    k_base = K + off_b * skb + off_hk * skh
    v_base = V + off_b * svb + off_hk * svh
    mask_base = Mask + off_b * smb + off_h * smh
    num = off_b * snb + off_h * snh + block * snm
    idx = off_b * sib + off_h * sih + block * sim
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    acc, m_i, l_i = _listed(acc, m_i, l_i, q, k_base, v_base, skn, svn, mask_base, smm, smn, sm_scale, offs_m,
                            FullNum + num, FullIdx + idx, sin, Lq, Lk, BLOCK_N, False)
    acc, m_i, l_i = _listed(acc, m_i, l_i, q, k_base, v_base, skn, svn, mask_base, smm, smn, sm_scale, offs_m,
                            KvNum + num, KvIdx + idx, sin, Lq, Lk, BLOCK_N, True)
    out, m_row, l_row = _finish(acc, m_i, l_i)
    o_ptrs = O + off_b * sob + off_h * soh + offs_m[:, None] * som + offs_dv[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(M + tl.program_id(1) * Lq + offs_m, m_row, mask=offs_m < Lq)
    tl.store(L + tl.program_id(1) * Lq + offs_m, l_row, mask=offs_m < Lq)


# ---------------------------------------------------------------- host side

def forward(q, k, v, mask, scale, kv_num, kv_idx, full_num, full_idx):
    """(out, (m, l)) as the exact template's forward; the four int32 lists broadcast over batch
    and heads (size-1 axes allowed), kv_idx and full_idx sharing one shape."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    out = q.new_empty((b, h, lq, v.shape[-1]))
    m = torch.empty((b * h, lq), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    kx, vx = k.expand(b, *k.shape[1:]), v.expand(b, *v.shape[1:])
    nblk = kv_num.shape[-1]
    kv_num, full_num = (t.expand(b, h, nblk) for t in (kv_num, full_num))
    kv_idx, full_idx = (t.expand(b, h, nblk, t.shape[-1]) for t in (kv_idx, full_idx))
    if kv_idx.stride() != full_idx.stride():
        kv_idx, full_idx = kv_idx.contiguous(), full_idx.contiguous()
    attn_fwd[(triton.cdiv(lq, FWD_BLOCK_M), b * h)](
        q, kx, vx, mask[0], out, m, l, kv_num, kv_idx, full_num, full_idx, scale,
        *q.stride()[:3], *kx.stride()[:3], *vx.stride()[:3], *out.stride()[:3], *mask[1],
        *kv_num.stride(), *kv_idx.stride(), h, lq, lk, BLOCK_M=FWD_BLOCK_M, BLOCK_N=FWD_BLOCK_N,
        num_warps=FWD_WARPS, num_stages=FWD_STAGES)
    return out, (m, l)


def aot_kernels(dtype, mask_dtype):
    """(kernel, pointer types, constexprs, warps, stages) for an ahead-of-time compile."""
    ptr = "*" + dtype
    io = {"Q": ptr, "K": ptr, "V": ptr, "Mask": "*" + mask_dtype, "O": ptr, "M": "*fp32", "L": "*fp32",
          "KvNum": "*i32", "KvIdx": "*i32", "FullNum": "*i32", "FullIdx": "*i32"}
    return [(attn_fwd, io, dict(BLOCK_M=FWD_BLOCK_M, BLOCK_N=FWD_BLOCK_N), FWD_WARPS, FWD_STAGES)]
