"""mode=heads — every query head keeps key blocks by its own pattern and its own budget, both
chosen at rewrite time on the example inputs.

All three patterns work on blocks (query block I keeps key blocks J, `block` rows/keys each) and
only *rank* the key blocks of each query block; a head keeps its best ⌈dₕ·n_I⌉ of the n_I
visible ones (dₕ its density), so every pattern runs on the same gathered-block attention as
select=pooled, the same block-sparse kernel and the same ONNX gather:

  window  local + sinks (A-shape): the diagonal block and the one before it, the first key block,
          then the blocks nearest the diagonal.
          A fixed ranking: nothing is estimated at run time.
  vslash  vertical-slash, estimated at run time from the last `last` queries (MInference): their
          softmax gives every key column's mass vⱼ and every diagonal's mass s_δ (δ = i' − j, the
          key's distance behind the query), each per last query. Block (I, J) ranks by the mass
          a row of it would hold were the pattern those columns and diagonals,
              z_IJ = Σ_{j∈J} vⱼ + Σ_δ s_δ·max(0, b − |δ − δ_IJ|)/b,   δ_IJ = (I − J)·b + Lk − Lq,
          the triangle being the share of block (I, J)'s rows that diagonal δ crosses.
  blocks  pooled, self-similarity guarded, mass threshold (SpargeAttn): the pooled logit of
          select=pooled (block means of q and k). A key block whose keys are not alike — mean
          cosine to their own mean below SELF_SIMILAR — is ranked before every alike one (by its
          logit among its kind) and never dropped by the threshold: its mean does not speak for it. Blocks are kept best-first until the pooled shares of those before reach `mass`
          (1: off), within the head's budget; a query block whose queries are not alike keeps its
          whole budget (its mean ranks poorly, so the threshold is not trusted there).

Calibration (`calibrate`): on the example inputs each head's dense block masses are ranked by
every allowed pattern's own scores, as the op would rank them on those inputs. A head takes the
pattern that keeps the most mass at the site's `density` — or the cheapest estimate (window,
then vslash, then blocks) that keeps within CLOSE of it; then the blocks every head would keep
at `density` (⌈density·n_I⌉ each) are spread over the heads by blocks.spread_budget, each head's
curve being its chosen pattern's: the same cost, moved to where it keeps the most mass (or left
uniform, where the greedy spread would keep less). Without calibration (head_pattern empty) every head is vslash at `density`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import scores as S
from .blocks import (_block_means, _block_stats, _n_keep, _pooled_offset, head_curves, ranked_mass, sample_blocks,
                     spread_budget)
from .options import PATTERNS
from .scores import NEG_INF, _dense_scores, _scores, _softmax, heads_of

SELF_SIMILAR = 0.5    # a block whose rows' mean cosine to their mean is below this is "not alike"
FIRST = 1e4           # added to the rank of a block kept first (guarded), so guarded blocks still rank by logit
CLOSE = 0.005         # calibration: a cheaper pattern keeping ≥ (1 − CLOSE) × the most mass is chosen
WINDOW, VSLASH, BLOCKS = range(len(PATTERNS))


# ---------------------------------------------------------------- each pattern's ranking of key blocks

def window_rank(nq: int, nk: int, lq: int, lk: int, bs: int, device):
    """(nq, nk): the block of query block I's last diagonal key (i' = i + Lk − Lq) first, the block
    before it, the sink block, then the others by their distance from the first (those behind it
    first: no two blocks rank alike, so every TopK keeps the same ones)."""
    i_last = (torch.arange(nq, device=device) * bs + bs - 1).clamp(max=lq - 1) + (lk - lq)
    diag = (i_last.clamp(min=0) // bs).clamp(max=nk - 1)
    after = torch.arange(nk, device=device)[None, :] - diag[:, None]
    z = -after.abs().to(torch.float32) - 0.25 * (after > 0)              # (behind the diagonal before ahead)
    return torch.where(z > -2, z, z.masked_fill(torch.arange(nk, device=device) == 0, -1.5))


def _triangle(bs: int, device):
    """The share of a block's rows that a diagonal at distance x from its corner diagonal crosses,
    for x = −(b−1) … b−1: (b − |x|)/b."""
    return (bs - torch.arange(1 - bs, bs, device=device).abs()).to(torch.float32) / bs


def vslash_rank(qc, kx, mask, causal: bool, scale: float, softcap: float, bs: int, last: int):
    """(B, H, nq, nk): the vertical-slash estimate z_IJ from the softmax of the last `last` queries."""
    b, h, lq, _ = qc.shape
    lk = kx.shape[-2]
    nq, nk, nl = -(-lq // bs), -(-lk // bs), min(last, lq)
    nd = lk + nl - 1                                          # diagonals δ = 1 − nl … Lk − 1
    r = torch.arange(nl, device=qc.device)
    diag_of = ((lk - nl) + r[:, None] - torch.arange(lk, device=qc.device)[None, :] + nl - 1)   # δ + nl − 1
    corner = ((torch.arange(nq, device=qc.device)[:, None] - torch.arange(nk, device=qc.device)[None, :]) * bs
              + (lk - lq) + nl - 1)                           # δ_IJ + nl − 1, (nq, nk)
    inside = (corner >= 0) & (corner < nd)
    tri = _triangle(bs, qc.device).view(1, 1, -1)
    group = max(1, 4 * S.CHUNK_ELEMENTS // max(b * nl * lk, 1))          # heads per step
    parts = []
    for h0 in range(0, h, group):
        h1 = min(h, h0 + group)
        m = heads_of(mask, torch.arange(h0, h1, device=qc.device), h)
        s = _dense_scores(qc[:, h0:h1], kx[:, h0:h1], m, scale, softcap, causal, lq - nl, lq)
        p = F.pad(_softmax(s.float()), (0, lk - s.shape[-1])) / nl          # (B, g, nl, Lk), per last query
        g = h1 - h0
        vert = F.pad(p.sum(-2), (0, nk * bs - lk)).view(b, g, nk, bs).sum(-1)            # (B, g, nk)
        slash = p.new_zeros(b, g, nd).scatter_add_(-1, diag_of.expand(b, g, nl, lk).reshape(b, g, -1),
                                                   p.reshape(b, g, -1))
        slash = F.conv1d(slash.view(b * g, 1, nd), tri, padding=bs - 1).view(b, g, nd)
        at = torch.where(inside, slash[..., corner.clamp(0, nd - 1)], 0.0)               # (B, g, nq, nk)
        parts.append(vert[:, :, None, :] + at)
    return torch.cat(parts, 1)


def _alike(x, means, bs: int):
    """Whether each block of rows is alike: the mean cosine of its rows to their mean ≥ SELF_SIMILAR,
    (B, H, nb). (A block whose rows are all zero counts as alike.)"""
    b, h, n, d = x.shape
    nb = means.shape[-2]
    xb = F.pad(x, (0, 0, 0, nb * bs - n)).view(b, h, nb, bs, d)
    cos = F.cosine_similarity(xb, means[..., None, :], dim=-1, eps=1e-12)               # (B, H, nb, bs)
    real = (torch.arange(nb * bs, device=x.device) < n).view(nb, bs)
    zero = xb.abs().amax(-1) == 0
    cos = torch.where(zero, 1.0, cos)
    return (torch.where(real, cos, 0.0).sum(-1) / real.sum(-1)) >= SELF_SIMILAR


def blocks_rank(qc, kx, count, bias, scale: float, softcap: float, bs: int):
    """(rank (B, H, nq, nk), pooled shares (B, H, nq, nk), query blocks alike (B, H, nq))."""
    qm, km = _block_means(qc, bs), _block_means(kx, bs)
    z = _scores(qm, km, scale, softcap) + _pooled_offset(count, bias)
    lse = z.logsumexp(-1, keepdim=True)
    share = (z - lse.masked_fill(lse == NEG_INF, 0.0)).exp()
    unlike_keys = ~_alike(kx, km, bs)[:, :, None, :]
    return torch.where(unlike_keys, z + FIRST, z), share, _alike(qc, qm, bs)


def pattern_rank(pattern: int, qc, kx, mask, causal, scale, softcap, o: dict, count, bias):
    """(rank (B, H, nq, nk) with −inf at invisible blocks, shares, query blocks alike) for one
    pattern over all of qc's heads (shares and alike: the blocks pattern's, else None)."""
    bs = o["block"]
    (b, h, lq, _), lk = qc.shape, kx.shape[-2]
    share = alike = None
    if pattern == WINDOW:
        z = window_rank(-(-lq // bs), -(-lk // bs), lq, lk, bs, qc.device).expand(b, h, -1, -1)
    elif pattern == VSLASH:
        z = vslash_rank(qc, kx, mask, causal, scale, softcap, bs, o["last"])
    else:
        z, share, alike = blocks_rank(qc, kx, count, bias, scale, softcap, bs)
    return z.masked_fill(count.expand(b, h, -1, -1) == 0, NEG_INF), share, alike


# ---------------------------------------------------------------- the op's selection

def head_patterns(o: dict, heads: int) -> list[int]:
    """The pattern of each query head: head_pattern, or vslash for every head when uncalibrated."""
    chosen = [int(x) for x in o["head_pattern"]] or [VSLASH] * heads
    if len(chosen) != heads:
        raise ValueError(f"sparse heads: {len(chosen)} head patterns for {heads} heads")
    if any(not 0 <= x < len(PATTERNS) for x in chosen):
        raise ValueError(f"sparse heads: head patterns {chosen} are not all in 0..{len(PATTERNS) - 1}")
    return chosen


def plan(qc, kx, mask, causal: bool, o: dict, scale: float, softcap: float) -> dict:
    """The plan select=pooled's path runs on (count, n_keep, idx, valid): per head its pattern's
    ranking, its budget ⌈dₕ·n_I⌉ and, for blocks heads with mass < 1, the threshold."""
    bs = o["block"]
    (b, h, lq, _), lk = qc.shape, kx.shape[-2]
    nq, nk = -(-lq // bs), -(-lk // bs)
    chosen = head_patterns(o, h)
    with torch.no_grad():
        count, bias = _block_stats(mask, causal, lq, lk, bs, qc.device)
        n_keep = _n_keep(count, o, h).expand(b, h, nq, 1)
        z = qc.new_full((b, h, nq, nk), NEG_INF, dtype=torch.float32)
        share = torch.zeros_like(z)
        alike = torch.ones(b, h, nq, dtype=torch.bool, device=qc.device)
        for pattern in sorted(set(chosen)):
            hs = torch.tensor([i for i, x in enumerate(chosen) if x == pattern], device=qc.device)
            zp, sp, ap = pattern_rank(pattern, qc.index_select(1, hs), kx.index_select(1, hs), heads_of(mask, hs, h),
                                      causal, scale, softcap, o, heads_of(count, hs, h), heads_of(bias, hs, h))
            z[:, hs] = zp.float()
            if sp is not None:
                share[:, hs], alike[:, hs] = sp.float(), ap
        kb = min(int(n_keep.max()), nk)
        top, idx = z.topk(kb, dim=-1)
        valid = (torch.arange(kb, device=qc.device) < n_keep) & (top > NEG_INF)
        if o["mass"] < 1.0:                   # blocks heads: stop once the pooled shares reach `mass`
            got = share.gather(-1, idx)
            stop = (got.cumsum(-1) - got >= o["mass"]) & (top < FIRST / 2) & alike[..., None]
            is_blocks = torch.tensor([x == BLOCKS for x in chosen], device=qc.device).view(1, h, 1, 1)
            valid &= ~(stop & is_blocks)
    return {"pooled": True, "count": count, "n_keep": n_keep, "idx": idx, "valid": valid}


# ---------------------------------------------------------------- calibration

def calibrate(samples, o: dict) -> tuple[list[int], list[float]]:
    """(a pattern per query head, a density per query head) from the example inputs (see the
    module's docstring): the pattern that keeps the most dense mass at `density`, then one
    budget spread over the heads by the mass their patterns keep."""
    allowed = [PATTERNS.index(p) for p in o["patterns"].split(",")]
    seqs = {p: [] for p in allowed}
    with torch.no_grad():
        for x in sample_blocks(samples, o["block"]):
            for p in allowed:
                z, _, _ = pattern_rank(p, x.qc, x.kx, x.mask, x.causal, x.scale, x.softcap, o, x.count, x.bias)
                seqs[p].append(ranked_mass(x.mass, z.double(), x.count))
    curves = {p: head_curves(s) for p, s in seqs.items()}
    dens, _, _, visible = curves[allowed[0]]
    at = next((i for i, x in enumerate(dens) if x >= o["density"] - 1e-12), len(dens) - 1)   # ⌈d·n_I⌉ steps there
    heads = int(visible.numel())
    chosen = []
    for hd in range(heads):                   # the cheapest pattern within CLOSE of the most mass kept
        gains = [float(curves[p][2][hd, at]) for p in allowed]
        chosen.append(allowed[next(i for i, g in enumerate(gains) if g >= (1 - CLOSE) * max(gains))])
    curve = [(curves[p][1][hd].tolist(), curves[p][2][hd].tolist()) for hd, p in enumerate(chosen)]
    steps = spread_budget(curve, sum(c[at] for c, _ in curve))             # what uniform `density` keeps
    if sum(g[j] for (_, g), j in zip(curve, steps)) < sum(g[at] for _, g in curve):
        steps = [at] * heads                  # (greedy steps can miss uniform on curves that are not concave)
    return chosen, [dens[j] for j in steps]


def pattern_names(head_pattern) -> list[str]:
    return [PATTERNS[int(x)] for x in head_pattern]


__all__ = ["calibrate", "plan", "pattern_rank", "pattern_names", "window_rank", "vslash_rank", "blocks_rank",
           "SELF_SIMILAR", "WINDOW", "VSLASH", "BLOCKS"]
