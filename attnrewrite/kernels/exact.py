"""Template: exact attention, FlashAttention-2 style.

Forward: one program per (query block, batch·head); it walks the key blocks the block can
see (all of them, or up to its last diagonal when causal), keeps the online softmax in base
2, and writes O and each row's max and sum. GQA reads kv head h // GROUP; K/V are never
repeated. Backward (recomputes O and each row's max and sum with the forward kernel first, since
the op's backward receives only the inputs): Δ = rowsum(O∘dO); dK, dV with one program per
(key block, batch·kv head) that loops over the GROUP query heads sharing it (no atomics);
dQ with one program per (query block, batch·head).

The tl.constexpr arguments are the site's specialisation (common.py lists them), filled from
its KernelConfig at launch; the host functions below take that configuration first.
"""
import triton
import triton.language as tl

from .common import (_attend, _ds, _finish, _key_range, _load_rows, _query_tile, _row_stats, _store_grad,
                     _store_out, _store_stats, attn_bwd_delta, backward_buffers, backward_result, delta_launch,
                     launch_rows)


@triton.jit
def attn_fwd(Q, K, V, Mask, O, M, L, sm_scale,
             sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
             smb, smh, smm, smn, H, Lq, Lk,
             HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
             GROUP: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr,
             DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, offs_m, off_b, off_h, q, k_base, v_base, mask_base = _query_tile(
        Q, K, V, Mask, sqb, sqh, sqm, skb, skh, svb, svh, smb, smh, H, Lq, HEAD_DIM, D_PAD, GROUP, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    # the key blocks every row sees whole (no element mask), then those the diagonal or Lk cuts
    full, hi = _key_range(start_m, Lq, Lk, CAUSAL, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, skn, svn, mask_base, smm, smn, sm_scale, offs_m,
                            0, full, Lq, Lk, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, CAUSAL, None, MASK, SOFTCAP,
                            DOT_PRECISION, BLOCK_N, False)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, skn, svn, mask_base, smm, smn, sm_scale, offs_m,
                            full, hi, Lq, Lk, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, CAUSAL, None, MASK, SOFTCAP,
                            DOT_PRECISION, BLOCK_N, True)
    out, m_row, l_row = _finish(acc, m_i, l_i)
    _store_out(O, off_b, off_h, sob, soh, som, offs_m, Lq, out, HEAD_DIM_V, DV_PAD)
    _store_stats(M, L, tl.program_id(1) * Lq, offs_m, Lq, m_row, l_row)


@triton.jit
def attn_bwd_dkdv(Q, K, V, Mask, DO, M, L, Delta, DK, DV, sm_scale,
                  sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                  smb, smh, smm, smn, H, HKV, Lq, Lk,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                  GROUP: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    off_b = tl.program_id(1) // HKV
    off_hk = tl.program_id(1) % HKV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    k = _load_rows(K + off_b * skb + off_hk * skh, offs_n, skn, Lk, offs_d, HEAD_DIM)
    v = _load_rows(V + off_b * svb + off_hk * svh, offs_n, svn, Lk, offs_dv, HEAD_DIM_V)
    kt = tl.trans(k)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    lo = 0
    if CAUSAL:     # query i sees key j iff i >= j - (Lk - Lq)
        lo = tl.maximum(start_n - (Lk - Lq), 0) // BLOCK_M * BLOCK_M
    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        bh = off_b * H + off_h
        q_base = Q + off_b * sqb + off_h * sqh
        do_base = DO + off_b * sdob + off_h * sdoh
        mask_base = Mask + off_b * smb + off_h * smh
        for start_m in range(lo, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_rows(q_base, offs_m, sqm, Lq, offs_d, HEAD_DIM)
            do = _load_rows(do_base, offs_m, sdom, Lq, offs_dv, HEAD_DIM_V)
            m_row, l_row, delta = _row_stats(M, L, Delta, bh * Lq, offs_m, Lq)
            p, ds = _ds(q, kt, v, do, m_row, l_row, delta, sm_scale, offs_m, offs_n, mask_base, smm, smn, Lq, Lk,
                        CAUSAL, MASK, SOFTCAP, DOT_PRECISION, True)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PRECISION)
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PRECISION)
    base = tl.program_id(1) * Lk
    _store_grad(DK, base, offs_n, Lk, dk * sm_scale, HEAD_DIM, D_PAD)
    _store_grad(DV, base, offs_n, Lk, dv, HEAD_DIM_V, DV_PAD)


@triton.jit
def attn_bwd_dq(Q, K, V, Mask, DO, M, L, Delta, DQ, sm_scale,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                smb, smh, smm, smn, H, Lq, Lk,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                GROUP: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, offs_m, off_b, off_h, q, k_base, v_base, mask_base = _query_tile(
        Q, K, V, Mask, sqb, sqh, sqm, skb, skh, svb, svh, smb, smh, H, Lq, HEAD_DIM, D_PAD, GROUP, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    do = _load_rows(DO + off_b * sdob + off_h * sdoh, offs_m, sdom, Lq, offs_dv, HEAD_DIM_V)
    m_row, l_row, delta = _row_stats(M, L, Delta, tl.program_id(1) * Lq, offs_m, Lq)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    full, hi = _key_range(start_m, Lq, Lk, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, skn, Lk, offs_d, HEAD_DIM)
        v = _load_rows(v_base, offs_n, svn, Lk, offs_dv, HEAD_DIM_V)
        p, ds = _ds(q, tl.trans(k), v, do, m_row, l_row, delta, sm_scale, offs_m, offs_n, mask_base, smm, smn,
                    Lq, Lk, CAUSAL, MASK, SOFTCAP, DOT_PRECISION, True)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    _store_grad(DQ, tl.program_id(1) * Lq, offs_m, Lq, dq * sm_scale, HEAD_DIM, D_PAD)


# ---------------------------------------------------------------- host side

def forward(cfg, q, k, v, mask, scale):
    """(out, (m, l)): q (B, H, Lq, D), k/v (B|1, Hkv, Lk, D|Dv), mask = (tensor, its 4 strides)
    as the dispatcher prepares it; out in q's dtype; m, l (B·H, Lq) fp32: each row's max (base 2)
    and sum, for the backward."""
    return launch_rows(cfg, attn_fwd, q, k, v, mask, scale)


def backward(cfg, grad, q, k, v, mask, scale):
    """(dq, dk, dv) in q, k, v's dtypes and shapes (a batch-broadcast k/v gets its gradient summed)."""
    b, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out, (m, l) = forward(cfg, q, k, v, mask, scale)
    grad, delta, kx, vx, (dq, dk, dv), strides = backward_buffers(cfg, out, m, grad, q, k, v, mask)
    launch_dkdv, launch_dq = cfg.launch(attn_bwd_dkdv, "BWD"), cfg.launch(attn_bwd_dq, "BWD")
    attn_bwd_dkdv[(triton.cdiv(lk, launch_dkdv["BLOCK_N"]), b * hkv)](
        q, kx, vx, mask[0], grad, m, l, delta, dk, dv, scale, *strides, h, hkv, lq, lk, **launch_dkdv)
    attn_bwd_dq[(triton.cdiv(lq, launch_dq["BLOCK_M"]), b * h)](
        q, kx, vx, mask[0], grad, m, l, delta, dq, scale, *strides, h, lq, lk, **launch_dq)
    return backward_result(dq, dk, dv, q, k, v)


def aot_kernels(cfg, dtype, mask_dtype):
    """(kernel, pointer types, launch keywords) for every kernel above, for an ahead-of-time
    compile: dtype is q/k/v's Triton type ("fp16"), mask_dtype the mask's."""
    ptr, f32 = "*" + dtype, "*fp32"
    io = {"Q": ptr, "K": ptr, "V": ptr, "Mask": "*" + mask_dtype}
    grads = {**io, "DO": ptr, "M": f32, "L": f32, "Delta": f32}
    return [(attn_fwd, {**io, "O": ptr, "M": f32, "L": f32}, cfg.launch(attn_fwd)),
            (attn_bwd_delta, {"O": ptr, "DO": ptr, "Delta": f32}, delta_launch(cfg)),
            (attn_bwd_dkdv, {**grads, "DK": f32, "DV": f32}, cfg.launch(attn_bwd_dkdv, "BWD")),
            (attn_bwd_dq, {**grads, "DQ": f32}, cfg.launch(attn_bwd_dq, "BWD"))]
