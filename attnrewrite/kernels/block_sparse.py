"""Template: block-sparse attention over per-query-block lists of key blocks.

The layout is FlexAttention's: for query block I (SPARSE_M rows) of batch b, head h,
  kv_num[b, h, I]          how many *partial* key blocks it visits, listed first in kv_idx[b, h, I, :]
  full_num[b, h, I]        how many *full* key blocks, listed first in full_idx[b, h, I, :]
each entry a key-block index (SPARSE_N keys). A partial block applies the element mask (causal,
and keys past Lk); a full block is visible to every row of the query block and skips it (the
site's own mask, if any, still applies in both). Full blocks must lie inside [0, Lk). Rows keep
the union of their listed blocks and renormalise their softmax over it. The tiles (BLOCK_M,
BLOCK_N) divide SPARSE_M and SPARSE_N. Forward: one program per (query tile, batch·head); each
listed block is walked in BLOCK_N-key tiles.

Backward (the exact template's order: rerun the forward for O and each row's max and sum, then
Δ = rowsum(O∘dO)): dQ with one program per (query tile, batch·head) over the same lists; dK/dV
with one program per (key tile, batch·kv head), which needs the query blocks that visit its key
block — the layout's transpose, FlexAttention's
  q_num[b, h, J], q_idx[b, h, J, :]            the query blocks whose partial lists name key block J
  full_q_num[b, h, J], full_q_idx[b, h, J, :]  the query blocks whose full lists name it
built on the host (dispatch.transposed_lists) — and loops over the GROUP query heads sharing
its kv head, each with its own lists, so nothing is written twice and no atomics are needed.
"""
import triton
import triton.language as tl

from .common import (_attend, _ds, _finish, _load_rows, _query_tile, _row_stats, _store_grad, _store_out,
                     _store_stats, attn_bwd_delta, backward_buffers, backward_result, delta_launch, launch_rows)


@triton.jit
def _listed(acc, m_i, l_i, q, k_base, v_base, skn, svn, mask_base, smm, smn, sm_scale, offs_m,
            Num, Idx, s_idx, Lq, Lk,
            HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
            CAUSAL: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
            SPARSE_N: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr):
    """Fold every key block listed in Idx[0 : Num] (SPARSE_N keys each) into the online softmax."""
    count = tl.load(Num)
    for i in range(0, count):
        start = tl.load(Idx + i * s_idx) * SPARSE_N
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, skn, svn, mask_base, smm, smn, sm_scale,
                                offs_m, start, start + SPARSE_N, Lq, Lk, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD,
                                CAUSAL, None, MASK, SOFTCAP, DOT_PRECISION, BLOCK_N, EDGE)
    return acc, m_i, l_i


@triton.jit
def attn_fwd(Q, K, V, Mask, O, M, L, KvNum, KvIdx, FullNum, FullIdx, sm_scale,
             sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
             smb, smh, smm, smn, snb, snh, snm, sib, sih, sim, sin,
             H, Lq, Lk,
             HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
             GROUP: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr,
             DOT_PRECISION: tl.constexpr, SPARSE_M: tl.constexpr, SPARSE_N: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, offs_m, off_b, off_h, q, k_base, v_base, mask_base = _query_tile(
        Q, K, V, Mask, sqb, sqh, sqm, skb, skh, svb, svh, smb, smh, H, Lq, HEAD_DIM, D_PAD, GROUP, BLOCK_M)
    block = start_m // SPARSE_M
    num = off_b * snb + off_h * snh + block * snm
    idx = off_b * sib + off_h * sih + block * sim
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    acc, m_i, l_i = _listed(acc, m_i, l_i, q, k_base, v_base, skn, svn, mask_base, smm, smn, sm_scale, offs_m,
                            FullNum + num, FullIdx + idx, sin, Lq, Lk, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD,
                            CAUSAL, MASK, SOFTCAP, DOT_PRECISION, SPARSE_N, BLOCK_N, False)     # full blocks
    acc, m_i, l_i = _listed(acc, m_i, l_i, q, k_base, v_base, skn, svn, mask_base, smm, smn, sm_scale, offs_m,
                            KvNum + num, KvIdx + idx, sin, Lq, Lk, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD,
                            CAUSAL, MASK, SOFTCAP, DOT_PRECISION, SPARSE_N, BLOCK_N, True)      # partial blocks
    out, m_row, l_row = _finish(acc, m_i, l_i)
    _store_out(O, off_b, off_h, sob, soh, som, offs_m, Lq, out, HEAD_DIM_V, DV_PAD)
    _store_stats(M, L, tl.program_id(1) * Lq, offs_m, Lq, m_row, l_row)


@triton.jit
def _dq_listed(dq, q, do, m_row, l_row, delta, k_base, v_base, skn, svn, mask_base, smm, smn, sm_scale, offs_m,
               Num, Idx, s_idx, Lq, Lk,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
               CAUSAL: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
               SPARSE_N: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr):
    """Add to one query tile's dq the gradient through every key block listed in Idx[0 : Num]."""
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    tiles: tl.constexpr = SPARSE_N // BLOCK_N
    for t in range(0, tl.load(Num) * tiles):          # one loop over every listed block's tiles
        i = t // tiles                                 # (list entry, tile within its block)
        offs_n = tl.load(Idx + i * s_idx) * SPARSE_N + (t - i * tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, skn, Lk, offs_d, HEAD_DIM)
        v = _load_rows(v_base, offs_n, svn, Lk, offs_dv, HEAD_DIM_V)
        p, ds = _ds(q, tl.trans(k), v, do, m_row, l_row, delta, sm_scale, offs_m, offs_n, mask_base, smm, smn,
                    Lq, Lk, CAUSAL, MASK, SOFTCAP, DOT_PRECISION, EDGE)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dkdv_listed(dk, dv, k, v, q_base, do_base, mask_base, M, L, Delta, bh, sqm, sdom, smm, smn, sm_scale, offs_n,
                 Num, Idx, s_idx, Lq, Lk,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                 CAUSAL: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 SPARSE_M: tl.constexpr, BLOCK_M: tl.constexpr, EDGE: tl.constexpr):
    """Add to one key tile's (dk, dv) the gradient through every query block listed in Idx[0 : Num]
    (for the query head whose rows q_base, do_base and row statistics bh point at)."""
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    kt = tl.trans(k)
    tiles: tl.constexpr = SPARSE_M // BLOCK_M
    for t in range(0, tl.load(Num) * tiles):          # one loop over every listed block's row tiles
        i = t // tiles                                 # (list entry, tile within its block)
        offs_m = tl.load(Idx + i * s_idx) * SPARSE_M + (t - i * tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, offs_m, sqm, Lq, offs_d, HEAD_DIM)
        do = _load_rows(do_base, offs_m, sdom, Lq, offs_dv, HEAD_DIM_V)
        m_row, l_row, delta = _row_stats(M, L, Delta, bh * Lq, offs_m, Lq)
        p, ds = _ds(q, kt, v, do, m_row, l_row, delta, sm_scale, offs_m, offs_n, mask_base, smm, smn, Lq, Lk,
                    CAUSAL, MASK, SOFTCAP, DOT_PRECISION, EDGE)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PRECISION)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def attn_bwd_dkdv(Q, K, V, Mask, DO, M, L, Delta, DK, DV, QNum, QIdx, FullQNum, FullQIdx, sm_scale,
                  sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                  smb, smh, smm, smn, snb, snh, snn, sib, sih, sin, sim,
                  H, HKV, Lq, Lk,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                  GROUP: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, SPARSE_M: tl.constexpr, SPARSE_N: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    off_b = tl.program_id(1) // HKV
    off_hk = tl.program_id(1) % HKV
    block = start_n // SPARSE_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    k = _load_rows(K + off_b * skb + off_hk * skh, offs_n, skn, Lk, offs_d, HEAD_DIM)
    v = _load_rows(V + off_b * svb + off_hk * svh, offs_n, svn, Lk, offs_dv, HEAD_DIM_V)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        bh = off_b * H + off_h
        q_base = Q + off_b * sqb + off_h * sqh
        do_base = DO + off_b * sdob + off_h * sdoh
        mask_base = Mask + off_b * smb + off_h * smh
        num = off_b * snb + off_h * snh + block * snn
        idx = off_b * sib + off_h * sih + block * sin
        dk, dv = _dkdv_listed(dk, dv, k, v, q_base, do_base, mask_base, M, L, Delta, bh, sqm, sdom, smm, smn,
                              sm_scale, offs_n, FullQNum + num, FullQIdx + idx, sim, Lq, Lk,
                              HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, CAUSAL, MASK, SOFTCAP, DOT_PRECISION,
                              SPARSE_M, BLOCK_M, False)
        dk, dv = _dkdv_listed(dk, dv, k, v, q_base, do_base, mask_base, M, L, Delta, bh, sqm, sdom, smm, smn,
                              sm_scale, offs_n, QNum + num, QIdx + idx, sim, Lq, Lk,
                              HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, CAUSAL, MASK, SOFTCAP, DOT_PRECISION,
                              SPARSE_M, BLOCK_M, True)
    base = tl.program_id(1) * Lk
    _store_grad(DK, base, offs_n, Lk, dk * sm_scale, HEAD_DIM, D_PAD)
    _store_grad(DV, base, offs_n, Lk, dv, HEAD_DIM_V, DV_PAD)


@triton.jit
def attn_bwd_dq(Q, K, V, Mask, DO, M, L, Delta, DQ, KvNum, KvIdx, FullNum, FullIdx, sm_scale,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                smb, smh, smm, smn, snb, snh, snm, sib, sih, sim, sin,
                H, Lq, Lk,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                GROUP: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr,
                DOT_PRECISION: tl.constexpr, SPARSE_M: tl.constexpr, SPARSE_N: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, offs_m, off_b, off_h, q, k_base, v_base, mask_base = _query_tile(
        Q, K, V, Mask, sqb, sqh, sqm, skb, skh, svb, svh, smb, smh, H, Lq, HEAD_DIM, D_PAD, GROUP, BLOCK_M)
    block = start_m // SPARSE_M
    do = _load_rows(DO + off_b * sdob + off_h * sdoh, offs_m, sdom, Lq, tl.arange(0, DV_PAD), HEAD_DIM_V)
    m_row, l_row, delta = _row_stats(M, L, Delta, tl.program_id(1) * Lq, offs_m, Lq)
    num = off_b * snb + off_h * snh + block * snm
    idx = off_b * sib + off_h * sih + block * sim
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    dq = _dq_listed(dq, q, do, m_row, l_row, delta, k_base, v_base, skn, svn, mask_base, smm, smn, sm_scale, offs_m,
                    FullNum + num, FullIdx + idx, sin, Lq, Lk, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD,
                    CAUSAL, MASK, SOFTCAP, DOT_PRECISION, SPARSE_N, BLOCK_N, False)
    dq = _dq_listed(dq, q, do, m_row, l_row, delta, k_base, v_base, skn, svn, mask_base, smm, smn, sm_scale, offs_m,
                    KvNum + num, KvIdx + idx, sin, Lq, Lk, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD,
                    CAUSAL, MASK, SOFTCAP, DOT_PRECISION, SPARSE_N, BLOCK_N, True)
    _store_grad(DQ, tl.program_id(1) * Lq, offs_m, Lq, dq * sm_scale, HEAD_DIM, D_PAD)


# ---------------------------------------------------------------- host side

def _lists(num, idx, full_num, full_idx, b, h):
    """Four lists as the kernels read them: broadcast to (b, h, ...) (views), the two counts
    sharing one set of strides and the two index lists another."""
    n = num.shape[-1]
    num, full_num = (t.expand(b, h, n) for t in (num, full_num))
    idx, full_idx = (t.expand(b, h, n, t.shape[-1]) for t in (idx, full_idx))
    if num.stride() != full_num.stride():
        num, full_num = num.contiguous(), full_num.contiguous()
    if idx.stride() != full_idx.stride():
        idx, full_idx = idx.contiguous(), full_idx.contiguous()
    return num, idx, full_num, full_idx


def forward(cfg, q, k, v, mask, scale, kv_num, kv_idx, full_num, full_idx):
    """(out, (m, l)) as the exact template's forward; the four int32 lists broadcast over batch
    and heads (size-1 axes allowed), kv_idx and full_idx sharing one shape."""
    return launch_rows(cfg, attn_fwd, q, k, v, mask, scale, _lists(kv_num, kv_idx, full_num, full_idx, *q.shape[:2]))


def backward(cfg, grad, q, k, v, mask, scale, kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx):
    """(dq, dk, dv) in q, k, v's dtypes and shapes (a batch-broadcast k/v gets its gradient summed):
    the forward's four lists, then their transpose (per key block: q_num (B|1, H|1, Kblocks),
    q_idx (B|1, H|1, Kblocks, Qblocks), and the same for full blocks)."""
    b, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out, (m, l) = forward(cfg, q, k, v, mask, scale, kv_num, kv_idx, full_num, full_idx)
    grad, delta, kx, vx, (dq, dk, dv), strides = backward_buffers(cfg, out, m, grad, q, k, v, mask)
    by_key = _lists(q_num, q_idx, full_q_num, full_q_idx, b, h)
    launch = cfg.launch(attn_bwd_dkdv, "BWD")
    attn_bwd_dkdv[(triton.cdiv(lk, launch["BLOCK_N"]), b * hkv)](
        q, kx, vx, mask[0], grad, m, l, delta, dk, dv, *by_key, scale, *strides,
        *by_key[0].stride(), *by_key[1].stride(), h, hkv, lq, lk, **launch)
    by_query = _lists(kv_num, kv_idx, full_num, full_idx, b, h)
    launch = cfg.launch(attn_bwd_dq, "BWD")
    attn_bwd_dq[(triton.cdiv(lq, launch["BLOCK_M"]), b * h)](
        q, kx, vx, mask[0], grad, m, l, delta, dq, *by_query, scale, *strides,
        *by_query[0].stride(), *by_query[1].stride(), h, lq, lk, **launch)
    return backward_result(dq, dk, dv, q, k, v)


def aot_kernels(cfg, dtype, mask_dtype):
    """(kernel, pointer types, launch keywords) for every kernel above, for an ahead-of-time compile."""
    ptr, f32, i32 = "*" + dtype, "*fp32", "*i32"
    io = {"Q": ptr, "K": ptr, "V": ptr, "Mask": "*" + mask_dtype}
    by_query = {"KvNum": i32, "KvIdx": i32, "FullNum": i32, "FullIdx": i32}
    by_key = {"QNum": i32, "QIdx": i32, "FullQNum": i32, "FullQIdx": i32}
    grads = {**io, "DO": ptr, "M": f32, "L": f32, "Delta": f32}
    return [(attn_fwd, {**io, "O": ptr, "M": f32, "L": f32, **by_query}, cfg.launch(attn_fwd)),
            (attn_bwd_delta, {"O": ptr, "DO": ptr, "Delta": f32}, delta_launch(cfg)),
            (attn_bwd_dkdv, {**grads, "DK": f32, "DV": f32, **by_key}, cfg.launch(attn_bwd_dkdv, "BWD")),
            (attn_bwd_dq, {**grads, "DQ": f32, **by_query}, cfg.launch(attn_bwd_dq, "BWD"))]
