"""Block selection: the exact ranking by dense softmax mass, block statistics from the mask,
per-head budgets, the pooled ranking from block means, and attention over gathered key blocks."""
from __future__ import annotations

import heapq
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..base import compute_dtype, expand_kv
from . import scores as S
from .scores import NEG_INF, _apply_mask, _chunks, _dense_scores, _dropout, _mask_rows, _scores, _softmax


def _block_keep(s, p, block: int, density: float, mass: float, n_keep=None):
    """Ω for block mode from a chunk of dense scores s and their softmax p (B, H, c, Lk), the
    chunk's first row starting a block; `n_keep` (…, nq, 1): blocks per query block, else the
    density budget."""
    keep = _block_choice(s, p, block, density, mass, n_keep)
    c, lk = s.shape[-2:]
    return keep.repeat_interleave(block, -2)[..., :c, :].repeat_interleave(block, -1)[..., :lk]


def _block_choice(s, p, block: int, density: float, mass: float, n_keep=None):
    """_block_keep's choice per block: (B, H, ⌈c/block⌉, ⌈Lk/block⌉) bool."""
    b = block
    bsz, h, c, lk = s.shape
    nq, nk = -(-c // b), -(-lk // b)
    live = s > NEG_INF
    pad = (0, nk * b - lk, 0, nq * b - c)
    blocks = lambda t: F.pad(t, pad).view(bsz, h, nq, b, nk, b).sum((3, 5))  # noqa: E731
    blk_mass = blocks(p)                                               # Σ over the block's rows and keys
    n_vis = (blocks(live.to(p.dtype)) > 0).sum(-1, keepdim=True)       # visible key blocks per query block
    rows = F.pad(live.any(-1).to(p.dtype), pad[2:]).view(bsz, h, nq, b).sum(-1, keepdim=True)
    mass_sorted, order = blk_mass.sort(-1, descending=True)
    rank = torch.arange(nk, device=s.device)
    budget = torch.ceil(density * n_vis).clamp(min=1) if n_keep is None else n_keep
    keep = rank < budget.expand(*mass_sorted.shape[:-1], 1)             # the budget
    if mass < 1.0:                                                      # keep until the mass target is met:
        before = mass_sorted.cumsum(-1) - mass_sorted                   # mass of the better-ranked blocks
        keep &= before < mass * rows                                    # (the block crossing it is kept)
    return torch.zeros_like(keep).scatter(-1, order, keep)


# ---------------------------------------------------------------- block statistics, budgets, pooled selection


def _as4d(m):
    while m.dim() < 4:
        m = m[None]
    return m


def _block_stats(mask, causal: bool, lq: int, lk: int, bs: int, device):
    """(count, bias) per (query block, key block), shaped (B', H', nq, nk) with the mask's own
    broadcast axes: the number of visible (row, key) pairs, and the float mask's bias summed
    over them (None for no or a bool mask). Built from prefix sums of the mask over keys, read
    at each key block's ends: O(Lq·nk) work beside reading the mask, no scores."""
    nk = -(-lk // bs)
    starts = torch.arange(nk, device=device) * bs
    ends = (starts + bs).clamp(max=lk)
    m = None if mask is None else _as4d(mask).expand(*_as4d(mask).shape[:-1], lk)
    full_rows = m is not None and m.shape[-2] == lq and lq > 1
    counts, biases = [], []
    for i0, i1 in _chunks(lq, (lk + 1) * m.shape[0] * m.shape[1] if full_rows else nk, bs):
        rows = torch.arange(i0, i1, device=device)[:, None]
        hi = ends.expand(i1 - i0, nk)
        if causal:                                                   # keys j ≤ i' = i + Lk − Lq
            hi = torch.minimum(hi, (rows + lk - lq + 1).clamp(min=0))
        lo = torch.minimum(starts.expand_as(hi), hi)
        bias = None
        if m is None:
            cnt = (hi - lo).to(torch.float32)[None, None]
        else:
            mr = m[..., i0:i1, :] if full_rows else m
            vis = mr if mr.dtype == torch.bool else mr > NEG_INF
            read = _prefix_reader(hi, lo, full_rows)
            cnt = read(vis.to(torch.int32))
            if mr.dtype != torch.bool:
                bias = read(torch.where(vis, mr, 0.0).to(torch.float32))
        pad = (0, 0, 0, -(i1 - i0) % bs)
        fold = lambda t: F.pad(t, pad).view(*t.shape[:-2], -1, bs, nk).sum(-2)   # noqa: E731 - rows → blocks
        counts.append(fold(cnt))
        biases.append(None if bias is None else fold(bias))
    count = torch.cat(counts, -2)
    return count, None if biases[0] is None else torch.cat(biases, -2)


def _prefix_reader(hi, lo, full_rows: bool):
    """x (…, r, Lk) → Σ x[…, row, lo:hi] per row and key block, (…, c, nk), by prefix sums."""
    def read(x):
        p = F.pad(x.cumsum(-1, dtype=torch.float32 if x.is_floating_point() else torch.int32), (1, 0))
        if full_rows:
            ix = lambda t: t.expand(*p.shape[:-2], *t.shape)   # noqa: E731
            out = p.gather(-1, ix(hi)) - p.gather(-1, ix(lo))
        else:                                                        # one mask row for every query
            out = p[..., 0, :][..., hi] - p[..., 0, :][..., lo]
        return out.to(torch.float32)
    return read


def _n_keep(count, o: dict, heads: int):
    """Key blocks each query block keeps, (B', H'', nq, 1), never more than it sees nor fewer than 1.

    ⌈density · n_I⌉, n_I = query block I's visible key blocks (the exact path's rule), with one
    density per query head under budget=global (head_density). topk with select=pooled scores at
    least ⌈k / block⌉ + 1 blocks, so k ≥ Lk still reaches every key.
    """
    n = (count > 0).sum(-1, keepdim=True)
    if o["head_density"]:
        d = torch.tensor(o["head_density"], dtype=torch.float64, device=count.device).view(1, -1, 1, 1)
        if d.shape[1] != heads:
            raise ValueError(f"sparse: {d.shape[1]} head densities for {heads} heads")
        keep = _ceil_share(d, n)
    else:
        keep = torch.ceil(o["density"] * n)
    if o["mode"] == "topk":
        keep = keep.clamp(min=-(-o["k"] // o["block"]) + 1)
    return torch.minimum(keep.clamp(min=1), n.clamp(min=1)).long()


def _ceil_share(d, n):
    """⌈d·n⌉ in float64, d·n within 1e-9 of a whole number counting as it (d = m/n gives m)."""
    return torch.ceil(d * n - 1e-9)


def _block_means(x, bs: int):
    """The mean row of each block of `bs` rows: (B, H, L, D) → (B, H, ⌈L/bs⌉, D)."""
    b, h, n, d = x.shape
    nb = -(-n // bs)
    sizes = (torch.arange(nb, device=x.device) * bs).neg().add(n).clamp(max=bs).to(x.dtype)
    return F.pad(x, (0, 0, 0, nb * bs - n)).view(b, h, nb, bs, d).sum(-2) / sizes[:, None]


def _pooled_offset(count, bias):
    """log(visible pairs) + the mean bias over them, per block: the pooled logit's terms that do not
    depend on q and k (−inf for a block with no visible pair)."""
    z = torch.log(count)
    return z if bias is None else z + torch.where(count > 0, bias / count.clamp(min=1), 0.0)


def _pooled_select(qmean, kmean, offset, n_keep, kb: int, o: dict, scale: float, softcap: float):
    """(idx, valid), each (B, H, cq, kb): for query blocks with mean rows qmean (B, H, cq, D) —
    offset and n_keep sliced to the same blocks — the kb best key blocks, best first, and
    whether each is kept. The rank is the pooled logit

        z_IJ = scale·q̄_I·k̄_J (soft-capped) + mean bias over the block + log(visible pairs),

    the log of block (I, J)'s share of the softmax mass were every score in it the pooled one:
    O(nq·nk·D) for the whole call. With mass < 1, blocks are also dropped once the pooled
    shares of the better-ranked blocks reach `mass`."""
    z = _scores(qmean, kmean, scale, softcap) + offset
    top, idx = z.topk(kb, dim=-1)
    valid = (torch.arange(top.shape[-1], device=z.device) < n_keep) & (top > NEG_INF)
    if o["mass"] < 1.0:
        lse = z.logsumexp(-1, keepdim=True)
        share = torch.where(valid, (top - lse.masked_fill(lse == NEG_INF, 0.0)).exp(), 0.0)
        valid &= (share.cumsum(-1) - share) < o["mass"]
    return idx, valid


def _blocks_scores(q, kp, mask, scale, softcap, causal, o, i0, i1, lq, lk, idx, valid):
    """Masked scores of rows i0..i1 against only the chosen key blocks: (B, H, cq, b, kb·b),
    and the flat rows of those keys in kp's (B·H·nk, b·D) view, for gathering V the same way.
    kp: the keys padded to whole blocks; rows past i1 and keys past Lk score −inf."""
    b, h, _, d = q.shape
    bs = o["block"]
    cq, kb = idx.shape[-2:]
    nk = kp.shape[2] // bs
    flat = (idx + nk * torch.arange(b * h, device=q.device).view(b, h, 1, 1)).flatten()
    kg = kp.reshape(b * h * nk, bs * d).index_select(0, flat).view(b, h, cq, kb * bs, d)
    qb = q[:, :, i0:i0 + cq * bs].view(b, h, cq, bs, d)             # (q is padded to whole blocks)
    s = _scores(qb, kg, scale, softcap)
    j = (idx[..., None] * bs + torch.arange(bs, device=q.device)).flatten(-2)      # key positions (B, H, cq, K)
    i = (i0 + torch.arange(cq * bs, device=q.device)).view(cq, bs, 1) + (lk - lq)  # rows' diagonal keys
    if mask is None and not softcap and bool(valid.all()):
        # idx is sorted, so only a suffix of the chosen blocks can hold keys past Lk or past a
        # row's diagonal: mask just those (in place; the matmul does not keep its output)
        first = i[:, :1, 0].view(cq, 1)
        part = (idx * bs + bs > lk) | (idx * bs + bs - 1 > first) if causal else idx * bs + bs > lk
        t = int(part.sum(-1).max()) * bs
        if t:
            dead = j[..., None, -t:] >= lk
            s[..., -t:].masked_fill_(dead | (j[..., None, -t:] > i) if causal else dead, NEG_INF)
        return s, flat
    s = s.masked_fill((~valid.repeat_interleave(bs, -1) | (j >= lk))[..., None, :], NEG_INF)
    if causal:
        s = s.masked_fill(j[..., None, :] > i, NEG_INF)
    if mask is not None:
        s = _apply_mask(s, _mask_at(mask, i0, i1, lq, lk, j.clamp(max=lk - 1), bs))
    return s, flat


def _mask_at(mask, i0, i1, lq, lk, j, bs):
    """The mask's values for rows i0..i1 at key positions j (B, H, cq, K): (B, H, cq, b or 1, K)."""
    m = _as4d(_mask_rows(mask, i0, i1, lq))
    m = m.expand(*j.shape[:2], *m.shape[2:-1], lk)
    bsz, h, cq, kk = j.shape
    if m.shape[-2] == 1:                                   # one row for every query
        return m[:, :, 0].gather(-1, j.flatten(2)).view(bsz, h, cq, 1, kk)
    c = m.shape[-2]
    jr = j[..., None, :].expand(bsz, h, cq, bs, kk).reshape(bsz, h, cq * bs, kk)[:, :, :c]
    g = m.gather(-1, jr)
    pad = torch.ones if g.dtype == torch.bool else torch.zeros
    g = torch.cat([g, pad(bsz, h, cq * bs - c, kk, dtype=g.dtype, device=g.device)], 2)
    return g.view(bsz, h, cq, bs, kk)


def _pooled_out(q, kp, vp, mask, scale, softcap, causal, dropout_p, o, i0, i1, lq, lk, idx, valid):
    """Rows i0..i1 of the op with select=pooled: block mode attends over the chosen blocks' keys,
    topk takes its k best scores among them."""
    b, h, d = q.shape[0], q.shape[1], vp.shape[-1]
    bs, c = o["block"], i1 - i0
    s, flat = _blocks_scores(q, kp, mask, scale, softcap, causal, o, i0, i1, lq, lk, idx, valid)
    cq, kk = s.shape[2], s.shape[-1]
    vg = vp.reshape(-1, bs * d).index_select(0, flat).view(b, h, cq, kk, d)
    if o["mode"] == "topk":                   # the k best weights scattered back over the candidates
        top, pos = s.topk(min(o["k"], kk), dim=-1)
        w = torch.zeros_like(s).scatter(-1, pos, _dropout(_softmax(top), dropout_p))
        out = w @ vg
    else:                                     # every row sees a key unless a mask or Lq > Lk (causal) hides them all
        seen = mask is None and not (causal and lq > lk) and bool(valid.all())
        out = _dropout(torch.softmax(s, -1) if seen else _softmax(s), dropout_p) @ vg
    return out.reshape(b, h, cq * bs, d)[:, :, :c]


def _block_plan(qc, kx, mask, causal: bool, o: dict, scale: float, softcap: float) -> dict | None:
    """What a call with select=pooled (block/topk) or per-head densities (block) needs once:
    the block counts, the blocks kept per query block and (pooled) every query block's ranked
    key blocks, computed for ≤ S.CHUNK_ELEMENTS logits at a time."""
    pooled = o["select"] == "pooled" and o["mode"] in ("block", "topk")
    if not (pooled or (o["mode"] == "block" and o["head_density"])):
        return None
    lq, lk = qc.shape[-2], kx.shape[-2]
    with torch.no_grad():
        count, bias = _block_stats(mask, causal, lq, lk, o["block"], qc.device)
        plan = {"pooled": pooled, "count": count, "n_keep": _n_keep(count, o, qc.shape[1])}
        if pooled:
            offset, n_keep = _pooled_offset(count, bias), plan["n_keep"]
            qmean, kmean = _block_means(qc.detach(), o["block"]), _block_means(kx.detach(), o["block"])
            kb = min(int(n_keep.max()), kmean.shape[-2])
            step = max(1, S.CHUNK_ELEMENTS // (qc.shape[0] * qc.shape[1] * kmean.shape[-2]))
            parts = [_pooled_select(qmean[..., s:s + step, :], kmean, offset[..., s:s + step, :],
                                  n_keep[..., s:s + step, :], kb, o, scale, softcap)
                     for s in range(0, qmean.shape[-2], step)]
            plan |= {"idx": torch.cat([p[0] for p in parts], -2), "valid": torch.cat([p[1] for p in parts], -2)}
    return plan


def _plan_rows(plan: dict, i0: int, i1: int, bs: int) -> dict:
    """The plan's per-query-block entries for rows i0..i1 (i0 a block start)."""
    q0, q1 = i0 // bs, -(-i1 // bs)
    return {k: (v[..., q0:q1, :] if k in ("count", "n_keep", "idx", "valid") else v) for k, v in plan.items()}


def _budget_chunks(n_keep, lq: int, bh: int, o: dict):
    """Row ranges of whole query blocks that keep the same number of key blocks (so no chunk pads
    a query block's choice), each ≤ S.CHUNK_ELEMENTS / 4 scores (topk: scores and weights) — on CPU
    ~1 MB score tensors ran 9× faster at n = 16k than 4 MB ones (a query block per chunk at least)."""
    bs = o["block"]
    kb = n_keep.amax(dim=tuple(range(n_keep.dim() - 2)) + (-1,)).tolist()   # per query block
    out, start = [], 0
    for qb in range(1, len(kb) + 1):
        keys = kb[start] * bs
        per_row = bh * keys * (2 if o["mode"] == "topk" else 1)          # topk: the scores and the weights
        if qb == len(kb) or kb[qb] != kb[start] or (qb + 1 - start) * bs * per_row > S.CHUNK_ELEMENTS // 4:
            out.append((start * bs, min(qb * bs, lq)))
            start = qb
    return out


def _select(plan: dict, o: dict, i0: int, i1: int):
    """(idx, valid) for the query blocks of rows i0..i1: their kept key blocks in key order (so
    blocks a row sees only in part come last), as many slots as the chunk's largest budget."""
    p = _plan_rows(plan, i0, i1, o["block"])
    kb = int(p["n_keep"].max())
    idx, order = p["idx"][..., :kb].sort(-1)
    return idx, p["valid"][..., :kb].gather(-1, order)


# ---------------------------------------------------------------- the reference


# ---------------------------------------------------------------- per-head budgets from example inputs

def block_masses(qc, kx, mask, causal: bool, scale: float, softcap: float, bs: int):
    """The dense softmax mass of every (query block, key block), summed over the block's rows:
    (B, H, nq, nk) in float64 (each row's mass sums to 1), chunked like the op."""
    b, h, lq, _ = qc.shape
    lk = kx.shape[-2]
    nk = -(-lk // bs)
    parts = []
    for i0, i1 in _chunks(lq, b * h * lk, bs):
        p = _softmax(_dense_scores(qc, kx, mask, scale, softcap, causal, i0, i1).double())
        c, n = p.shape[-2:]
        cq, nb = -(-c // bs), -(-n // bs)
        pm = F.pad(p, (0, nb * bs - n, 0, cq * bs - c)).view(b, h, cq, bs, nb, bs).sum((3, 5))
        parts.append(F.pad(pm, (0, nk - nb)))
    return torch.cat(parts, -2)


class Sample(NamedTuple):
    """One example input as calibration reads it: q and k in the compute dtype (k expanded to q's
    heads), the call's mask and scalars, its block statistics and its dense block masses."""
    qc: torch.Tensor
    kx: torch.Tensor
    mask: torch.Tensor | None
    causal: bool
    scale: float
    softcap: float
    count: torch.Tensor
    bias: torch.Tensor | None
    mass: torch.Tensor


def sample_blocks(samples, bs: int):
    """The captured calls `samples` as Samples with blocks of `bs` (call under torch.no_grad())."""
    for smp in samples:
        q, k, mask, causal = smp["q"], smp["k"], smp["mask"], bool(smp["causal"])
        cdt = compute_dtype(q.dtype)
        qc, kx = q.detach().to(cdt), expand_kv(q, k).detach().to(cdt)
        count, bias = _block_stats(mask, causal, qc.shape[-2], kx.shape[-2], bs, q.device)
        yield Sample(qc, kx, mask, causal, smp["scale"], smp["softcap"], count, bias,
                     block_masses(qc, kx, mask, causal, smp["scale"], smp["softcap"], bs))


def ranked_mass(mass, rank, count):
    """(cumulative mass of the best j blocks by `rank`, visible blocks per query block) for one
    sequence: ((B, H, nq, nk + 1), (B, H, nq)) — one entry of head_curves' input."""
    order = rank.argsort(-1, descending=True)
    cum = F.pad(mass.gather(-1, order).cumsum(-1), (1, 0))
    return cum, (count > 0).sum(-1).expand(*mass.shape[:2], -1)


def head_curves(seqs):
    """(densities (M,), blocks kept (H, M), mass kept (H, M), visible blocks (H,)) summed over the
    sequences [(cum, visible)] of ranked_mass; the densities are every m/n_I (m ≤ n_I), where some
    query block's ⌈d·n_I⌉ steps, and a head keeps _n_keep's ⌈d·n_I⌉ at each."""
    sizes = sorted({int(x) for _, n in seqs for x in n.unique().tolist() if x > 0}) or [1]
    dens = sorted({math.ceil(m / nb * 1e12) / 1e12 for nb in sizes for m in range(1, nb + 1)})
    d = torch.tensor(dens, dtype=torch.float64).view(1, 1, -1, 1)
    cost = gain = 0.0
    for cum, n in seqs:
        nn = n[:, :, None, :]
        keep = torch.minimum(_ceil_share(d, nn).clamp(min=1), nn.clamp(min=1)).long()   # (B, H, M, nq)
        got = cum[:, :, None].expand(*keep.shape, cum.shape[-1]).gather(-1, keep[..., None])[..., 0]
        cost = cost + keep.sum(-1).sum(0).double()
        gain = gain + got.sum(-1).sum(0)
    visible = sum(n.sum((0, 2)) for _, n in seqs)
    return dens, cost, gain, visible


def spread_budget(heads, target: float) -> list[int]:
    """Greedy shares of one block budget: heads [(cost curve, gain curve)] all start at step 0;
    while the total cost stays ≤ target, the head whose next step adds the most gain per added
    cost takes it. Returns each head's step."""
    step = [0] * len(heads)
    total = sum(cost[0] for cost, _ in heads)
    queue = []

    def offer(i):
        cost, gain = heads[i]
        j = step[i]
        if j + 1 < len(cost):
            dc, dg = cost[j + 1] - cost[j], gain[j + 1] - gain[j]
            heapq.heappush(queue, (-dg / dc if dc > 0 else -math.inf, i))
    for i in range(len(heads)):
        offer(i)
    while queue:
        _, i = heapq.heappop(queue)
        cost, j = heads[i][0], step[i]
        if total + cost[j + 1] - cost[j] > target + 1e-9:
            continue                                                   # this head stops here
        total += cost[j + 1] - cost[j]
        step[i] = j + 1
        offer(i)
    return step
