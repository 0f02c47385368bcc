"""sparse — each query keeps a set Ωᵢ of keys and renormalises its softmax over it.

Math. With sᵢⱼ = scale·qᵢ·kⱼ (soft-capped) + biasᵢⱼ and the dense row pᵢ = softmax(sᵢ),

    qᵢⱼ = pᵢⱼ / mᵢ  for j ∈ Ωᵢ (else 0),   mᵢ = Σ_{j∈Ωᵢ} pᵢⱼ   (the dense mass kept),
    oᵢ = Σⱼ qᵢⱼ vⱼ  — the same as softmax over the kept scores only.

Error identity (every mode): ‖pᵢ − qᵢ‖₁ = (1 − mᵢ) + mᵢ(1/mᵢ − 1) = 2(1 − mᵢ), hence
‖oᵢ − ôᵢ‖₂ ≤ 2(1 − mᵢ)·maxⱼ‖vⱼ‖₂. The rewrite is exact iff mᵢ = 1, i.e. when Ωᵢ covers
every unmasked key. `diagnostics` reports mᵢ (min, mean, per head) and the measured
identity gap. A row with no visible key (or whose Ωᵢ holds none) returns zeros, never NaN.

Modes (Lq, Lk the query/key lengths; i' = i + Lk − Lq is query i's key position, the
bottom-right alignment `causal` uses in base.py):
  topk    Ωᵢ = the k highest scores of row i (torch.topk: exactly k, ties broken by it), taken
          *after* the mask and causal bias, so a masked key is never chosen over a visible one.
          k is clamped to Lk; k ≥ Lk is exact.
  window  Ωᵢ = band ∪ sinks, intersected with the causal visibility when `causal`:
            band "backward" (default for causal sites):  i' − window < j ≤ i'   (`window` keys
                                                          ending at the diagonal)
            band "two-sided" (default otherwise):       |j − i'| ≤ window // 2
            sinks:                                      j < sinks   (StreamingLLM's first tokens)
          `band=auto` means backward when the site is causal — its causal flag or, at rewrite
          time, a mask that removes exactly the keys after the diagonal — else two-sided.
          A chunk of c ≤ max(width, 64) rows scores only the sinks and its band's contiguous
          span (c + width − 1 keys, width = the band's key count): O(Lq·(window + sinks)·D)
          work, never all Lk keys.
          window ≥ Lk (backward) or window ≥ 2·max(Lq, Lk) (two-sided) is exact.
  block   queries and keys cut in blocks of `block` (block I holds rows I·b … I·b+b−1).
          For each query block, key blocks are ranked by their dense softmax mass summed
          over the block's rows and kept best-first; selection stops at whichever target is
          met first: `density` (kept ≤ ⌈density · #visible key blocks⌉) or `mass` (stop once the
          mean row mass kept in the query block reaches `mass`; mass = 1 switches this stop
          off, so the default selects by density alone). density = 1 is exact.
          select=pooled ranks key blocks without scoring any key: by the pooled logit
            z_IJ = scale·q̄_I·k̄_J (soft-capped) + mean bias over the block + log(visible pairs)
          (q̄, k̄ the block means; the log of the block's mass were all its scores equal), O(nq·nk·D);
          then each chunk gathers only its kept key blocks and scores those: O(Lq·kept·b·D) work
          in all. The mass stop then uses the pooled shares. density = 1 is still exact.
          budget=global replaces the one density by one per query head (`head_density`, filled in
          at rewrite time by share_budget from the example inputs); each head keeps ⌈dₕ · n_I⌉.
  topk with select=pooled: the candidates are the keys of the key blocks block mode would keep at
          `density` (at least ⌈k/b⌉ + 1 blocks, so k ≥ Lk is exact); Ωᵢ = the k best among them.

Normal form, GQA, masks and the causal convention are base.py's; half inputs are computed in
fp32; dropout (training) applies to the renormalised weights, as in exact. Chunks run in order
and each draws its mask from the RNG in turn; a checkpointed chunk restores the RNG state it
started from before recomputing (torch.utils.checkpoint's preserve_rng_state), so a seeded
call and its backward see the same masks.

Memory: queries are processed in chunks of ≤ CHUNK_ELEMENTS scores (chunk·Lk for topk/block —
causal chunks score only the keys up to their last diagonal — chunk·(chunk + window + sinks)
for window, chunk·kept blocks·b for select=pooled), so no (Lq, Lk) tensor ever exists; topk also
keeps O(chunk·k·D); under autograd each
chunk is checkpointed (recomputed in backward, as Gupta et al. 2021 do), keeping backward
memory linear as well. Selections (top-k, block ranking) are data-dependent and happen per
input at run time; gradients flow through the kept scores, not through the selection.
"""
from __future__ import annotations

import functools
import heapq
import math

import numpy as np
import torch
import torch.nn.functional as F
from onnx import helper
from torch.utils.checkpoint import checkpoint

from ..kernels.dispatch import KernelPlan, selected_lists, topk_indices
from ..passes import onnx_rewrite as R
from . import costing, flex
from .impl import Implementation
from .base import (BACKWARD_OPS, Param, compute_dtype, define_attention_op, expand_kv, is_causal_mask,
                   Variant)

NAME = "sparse"
OP_NAME = "sparse_attention"
CHUNK_ELEMENTS = 1 << 20     # scores per query chunk (4 MB in fp32): peak memory is a few such tensors
_GENEROUS = 1 << 20          # ladder ceiling when kv_len is symbolic (runtime clamps it to Lk)
NEG_INF = -math.inf


class _Fraction(Param):
    """A float in (0, 1]."""

    def parse(self, key, value):
        value = super().parse(key, value)
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{key}={value} is not in (0, 1]")
        return value


PARAMS = {
    "mode": Param("topk", str, "which keys each query keeps: topk | window | block",
                  choices=("topk", "window", "block")),
    "k": Param(64, int, "topk: keys kept per query (clamped to kv_len)", minimum=1),
    "window": Param(256, int, "window: band width (backward: keys ending at the diagonal; "
                    "two-sided: |j - i| <= window // 2)", minimum=1),
    "sinks": Param(4, int, "window: the first `sinks` keys are always kept", minimum=0),
    "band": Param("auto", str, "window: backward | two-sided | auto (backward on causal sites)",
                  choices=("auto", "backward", "two-sided")),
    "block": Param(64, int, "block: query/key block size", minimum=1),
    "density": _Fraction(0.25, float, "block: at most this fraction of the visible key blocks per query block"),
    "mass": _Fraction(1.0, float, "block: stop once the kept dense softmax mass reaches this (1 = off)"),
    "select": Param("exact", str, "block/topk: how key blocks are ranked: exact (dense softmax mass) | "
                    "pooled (block means of q and k; topk then scores only the kept blocks' keys)",
                    choices=("exact", "pooled")),
    "budget": Param("uniform", str, "block: uniform (every head keeps `density`) | global (one density "
                    "target shared by every head of every site, by the mass each keeps on the example inputs)",
                    choices=("uniform", "global")),
}
MODE_KEYS = {"topk": ("k",), "window": ("window", "sinks", "band"), "block": ("block", "density", "mass")}
_ORDER = ("mode", "k", "window", "sinks", "band", "block", "density", "mass", "select",
          "head_density")                                                        # op argument order


APPLIES = {"k": ("topk",), "window": ("window",), "sinks": ("window",), "band": ("window",),
           "block": ("block", "topk"), "density": ("block", "topk"), "mass": ("block",),
           "select": ("block", "topk"), "budget": ("block",)}


def inapplicable(given: dict, options: dict) -> str | None:
    """Why an explicitly given option does nothing in the chosen mode (None: all apply)."""
    mode = options["mode"]
    for key in given:
        if mode not in APPLIES.get(key, (mode,)):
            modes = " or ".join(f"mode={m}" for m in APPLIES[key])
            return f"sparse option {key} applies to {modes}, not mode={mode} (set mode as well)"
    return None


def _options(options: dict) -> dict:
    known = {k: v for k, v in options.items() if k in PARAMS or k == "head_density"}
    return {**{k: p.default for k, p in PARAMS.items()}, "head_density": (), **known}


# ---------------------------------------------------------------- pieces shared by op and diagnostics

def _chunks(lq: int, per_row: int, align: int = 1, most: int | None = None):
    """Row ranges [i0, i1) of ≤ CHUNK_ELEMENTS // per_row rows (≤ most), a multiple of `align`."""
    rows = max(1, CHUNK_ELEMENTS // max(per_row, 1))
    rows = max(align, min(rows, most or rows) // align * align)
    return [(i, min(i + rows, lq)) for i in range(0, lq, rows)]


def _mask_rows(mask, i0: int, i1: int, lq: int):
    """The mask's rows for queries i0..i1 (a broadcast row axis stays as it is)."""
    if mask is None or mask.dim() < 2 or mask.shape[-2] != lq or lq == 1:
        return mask
    return mask[..., i0:i1, :]


def _apply_mask(s, m):
    """s + the bias m stands for: bool True = attend, float added."""
    if m is None:
        return s
    return s.masked_fill(~m, NEG_INF) if m.dtype == torch.bool else s + m.to(s.dtype)


def _scores(q, keys, scale: float, softcap: float):
    """scale·q·kᵀ, soft-capped; the scale goes on q (c×D, not c×Lk)."""
    s = (q * scale) @ keys.transpose(-1, -2)
    return softcap * torch.tanh(s / softcap) if softcap else s


def _dense_scores(q, kx, mask, scale, softcap, causal, i0, i1):
    """Masked scores of queries i0..i1 against every key they may see: (B, H, i1 − i0, n).

    n = Lk, or with `causal` only the keys up to the chunk's last diagonal (those after it are
    invisible to every row of the chunk: half the work on average).
    """
    lq, lk = q.shape[-2], kx.shape[-2]
    n = min(lk, max(i1 + lk - lq, 1)) if causal else lk
    m = _mask_rows(mask, i0, i1, lq)
    s = _apply_mask(_scores(q[:, :, i0:i1], kx[:, :, :n], scale, softcap),
                    m[..., :n] if m is not None and m.shape[-1] == lk else m)
    if causal:                                                  # key j visible iff j <= i + Lk − Lq
        i = torch.arange(i0, i1, device=q.device)[:, None] + (lk - lq)
        s = s.masked_fill(torch.arange(n, device=q.device) > i, NEG_INF)
    return s


def _softmax(s):
    """Softmax over keys; a row with no finite score gives zeros (and zero, not NaN, gradients)."""
    top = s.detach().amax(-1, keepdim=True)
    return _normalise(torch.exp(s - top.masked_fill(top == NEG_INF, 0.0)))  # a dead row: all exp(−inf) = 0


def _normalise(w):
    """w / Σw over keys; an all-zero row stays zero (divided by 1, so its gradient stays finite)."""
    z = w.sum(-1, keepdim=True)
    return w / torch.where(z > 0, z, 1.0)


def _band(o: dict, lq: int, lk: int, causal: bool):
    """(before, after): row i's band is i' − before ≤ j ≤ i' + after, i' = i + Lk − Lq."""
    if o["band"] == "backward" or (o["band"] == "auto" and causal):
        return min(o["window"], lk) - 1, 0                     # `window` keys ending at the diagonal
    half = min(o["window"] // 2, max(lq, lk))                   # |j − i'| ≤ window // 2
    return half, half


def _in_window(i, j, o, lq, lk, causal):
    """Ωᵢ membership for window mode: broadcast rows i (c, 1) against keys j (m,)."""
    before, after = _band(o, lq, lk, causal)
    ip = i + (lk - lq)
    keep = ((j >= ip - before) & (j <= ip + after)) | (j < o["sinks"])
    return keep & (j <= ip) if causal else keep


def _window_keys(i0, i1, o, lq, lk, causal, device):
    """The keys any row in i0..i1 may keep: the sinks and the band's contiguous span, sorted, distinct."""
    before, after = _band(o, lq, lk, causal)
    j0 = min(max(i0 + lk - lq - before, 0), lk)
    j1 = min(max(i1 - 1 + lk - lq + after + 1, 0), lk)
    j = torch.cat([torch.arange(min(o["sinks"], lk), device=device), torch.arange(j0, j1, device=device)]).unique()
    return j if j.numel() else torch.zeros(1, dtype=torch.long, device=device)   # (a row set with no key)


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
    bs, c = o["block"], i1 - i0
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
    key blocks, computed for ≤ CHUNK_ELEMENTS logits at a time."""
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
            step = max(1, CHUNK_ELEMENTS // (qc.shape[0] * qc.shape[1] * kmean.shape[-2]))
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
    a query block's choice), each ≤ CHUNK_ELEMENTS / 4 scores (topk: scores and weights) — on CPU
    ~1 MB score tensors ran 9× faster at n = 16k than 4 MB ones (a query block per chunk at least)."""
    bs = o["block"]
    kb = n_keep.amax(dim=tuple(range(n_keep.dim() - 2)) + (-1,)).tolist()   # per query block
    out, start = [], 0
    for qb in range(1, len(kb) + 1):
        keys = kb[start] * bs
        per_row = bh * keys * (2 if o["mode"] == "topk" else 1)          # topk: the scores and the weights
        if qb == len(kb) or kb[qb] != kb[start] or (qb + 1 - start) * bs * per_row > CHUNK_ELEMENTS // 4:
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

def _chunk_out(q, kx, vx, mask, scale, softcap, causal, dropout_p, o, i0, i1, n_keep=None):
    lq, lk = q.shape[-2], kx.shape[-2]
    if o["mode"] == "window":                  # score only the sinks + the chunk's band span
        j = _window_keys(i0, i1, o, lq, lk, causal, q.device)
        s = _scores(q[:, :, i0:i1], kx.index_select(2, j), scale, softcap)
        s = s.masked_fill(~_in_window(torch.arange(i0, i1, device=q.device)[:, None], j, o, lq, lk, causal), NEG_INF)
        m = _mask_rows(mask, i0, i1, lq)
        p = _softmax(_apply_mask(s, m if m is None or m.shape[-1] == 1 else m[..., j]))
        return _dropout(p, dropout_p) @ vx.index_select(2, j)
    s = _dense_scores(q, kx, mask, scale, softcap, causal, i0, i1)      # (B, H, c, n ≤ Lk): c rows
    if o["mode"] == "topk":                    # softmax over the k best scores only, V at their keys
        top, idx = s.topk(min(o["k"], s.shape[-1]), dim=-1)
        return (_dropout(_softmax(top), dropout_p)[..., None, :] @ _take(vx, idx)).squeeze(-2)
    p = _softmax(s)                            # block: qᵢ = pᵢ·1_Ω / mᵢ (selection not differentiated)
    kept = p * _block_keep(s.detach(), p.detach(), o["block"], o["density"], o["mass"], n_keep)
    return _dropout(_normalise(kept), dropout_p) @ vx[:, :, :s.shape[-1]]


def _dropout(p, dropout_p: float):
    return F.dropout(p, dropout_p, training=True) if dropout_p else p


def _take(vx, idx):
    """Rows of a contiguous vx (B, H, Lk, D) at key indices idx (B, H, c, k): (B, H, c, k, D)."""
    b, h, lk, d = vx.shape
    flat = idx + lk * torch.arange(b * h, device=idx.device).view(b, h, 1, 1)   # row in (B·H·Lk, D)
    return vx.view(b * h * lk, d).index_select(0, flat.flatten()).view(*idx.shape, d)


def _row_chunks(q, kx, vx_dim, o, causal, plan=None):
    b, h, lq, _ = q.shape
    lk = kx.shape[-2]
    if o["mode"] == "window":                  # a chunk of c rows scores c + band + sinks keys
        width = sum(_band(o, lq, lk, causal)) + 1
        return _chunks(lq, b * h * (2 * width + min(o["sinks"], lk)), most=max(width, 64))
    if plan is not None and plan["pooled"]:    # c rows score kb blocks of keys
        return _budget_chunks(plan["n_keep"], lq, b * h, o)
    if o["mode"] == "topk":                    # c rows: c·Lk scores, then V gathered at c·k keys
        return _chunks(lq, b * h * (lk + min(o["k"], lk) * vx_dim))
    return _chunks(lq, b * h * lk, o["block"])


def reference(q, k, v, mask, scale: float, softcap: float, causal: bool, dropout_p: float,
              mode: str, top_k: int, window: int, sinks: int, band: str, block: int,
              density: float, mass: float, select: str = "exact", head_density=()):
    o = dict(zip(_ORDER, (mode, top_k, window, sinks, band, block, density, mass, select, tuple(head_density))))
    if mode not in MODE_KEYS:
        raise ValueError(f"sparse: unknown mode {mode!r}")
    cdt = compute_dtype(q.dtype)               # half inputs computed in fp32
    qc, kx, vx = q.to(cdt), expand_kv(q, k).to(cdt), expand_kv(q, v).to(cdt).contiguous()
    lq, lk = qc.shape[-2], kx.shape[-2]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    plan = _block_plan(qc, kx, mask, causal, o, scale, softcap) if lq and lk else None
    chunks = _row_chunks(qc, kx, vx.shape[-1], o, causal, plan)
    if plan is not None and plan["pooled"]:    # queries, keys and values padded to whole blocks, once
        qc, kx, vx = (F.pad(x, (0, 0, 0, -x.shape[-2] % block)) for x in (qc, kx, vx))
    outs = []
    for i0, i1 in chunks:
        kw = dict(mask=mask, scale=scale, softcap=softcap, causal=causal, dropout_p=dropout_p, o=o, i0=i0, i1=i1)
        if plan is None:
            fn = functools.partial(_chunk_out, **kw)
        elif plan["pooled"]:
            idx, valid = _select(plan, o, i0, i1)
            fn = functools.partial(_pooled_out, **kw, lq=lq, lk=lk, idx=idx, valid=valid)
        else:                                  # exact ranking, per-head budgets
            fn = functools.partial(_chunk_out, **kw, n_keep=_plan_rows(plan, i0, i1, block)["n_keep"])
        # under autograd, recompute each chunk in backward instead of keeping its scores
        outs.append(checkpoint(fn, qc, kx, vx, use_reentrant=False) if grad else fn(qc, kx, vx))
    if not outs:
        return q.new_zeros((*q.shape[:-1], v.shape[-1]))
    return torch.cat(outs, 2).to(q.dtype)


def kept_blocks(q, k, v, mask, scale: float, softcap: float, causal: bool, dropout_p: float,
                mode: str, top_k: int, window: int, sinks: int, band: str, block: int,
                density: float, mass: float, select: str = "exact", head_density=()):
    """Block mode's selection alone, as `reference` makes it: (B, H, ⌈Lq/block⌉, ⌈Lk/block⌉) bool,
    the key blocks each query block keeps (the same chunks, ranking and budgets; no output).
    The block-sparse kernel runs on it (KERNEL below)."""
    o = dict(zip(_ORDER, (mode, top_k, window, sinks, band, block, density, mass, select, tuple(head_density))))
    cdt = compute_dtype(q.dtype)
    with torch.no_grad():
        qc, kx = q.to(cdt), expand_kv(q, k).to(cdt)
        (b, h, lq, _), lk = qc.shape, kx.shape[-2]
        keep = torch.zeros(b, h, -(-lq // block), -(-lk // block), dtype=torch.bool, device=q.device)
        plan = _block_plan(qc, kx, mask, causal, o, scale, softcap) if lq and lk else None
        if plan is not None and plan["pooled"]:
            return keep.scatter_(-1, plan["idx"], plan["valid"])
        for i0, i1 in _row_chunks(qc, kx, v.shape[-1], o, causal, plan):
            s = _dense_scores(qc, kx, mask, scale, softcap, causal, i0, i1)
            n_keep = None if plan is None else _plan_rows(plan, i0, i1, block)["n_keep"]
            chosen = _block_choice(s, _softmax(s), block, density, mass, n_keep)
            keep[:, :, i0 // block:i0 // block + chosen.shape[-2], :chosen.shape[-1]] = chosen
    return keep


# ---------------------------------------------------------------- window on FlexAttention

FLEX_MIN_KEYS = 1024         # below this many keys the chunked reference is as fast, with nothing to compile


def _flex_window_covers(q, k, v, mask, scale, softcap, causal, dropout_p, mode, *params):
    if mode != "window":
        return f"mode={mode}: FlexAttention serves window mode"
    why = flex.covers(q, k, v, mask, dropout_p)
    if why is None and k.shape[-2] < FLEX_MIN_KEYS:
        why = f"{k.shape[-2]} keys: below {FLEX_MIN_KEYS} the chunked reference is as fast as FlexAttention"
    return why


def _flex_window(q, k, v, mask, scale, softcap, causal, dropout_p, mode, top_k, window, sinks, band,
                 *rest, traced: bool = False):
    """Window mode as FlexAttention: the band and sinks (and causal) as its mask_mod, and the key
    blocks they touch as its BlockMask — blocks the band or the sinks cover whole are full."""
    o = {"window": window, "sinks": sinks, "band": band}
    lq, lk = q.shape[-2], k.shape[-2]
    before, after = _band(o, lq, lk, causal)
    after = min(after, 0) if causal else after
    off = lk - lq

    def keep(b, h, i, j):
        ip = i + off
        kept = ((j >= ip - before) & (j <= ip + after)) | (j < sinks)
        return kept & (j <= ip) if causal else kept

    q_lo, q_hi, k_lo, k_hi, whole = flex.block_ranges(lq, lk, q.device)
    sink_any, sink_full = k_lo < sinks, k_hi < sinks
    if causal:
        sink_any, sink_full = sink_any & (k_lo <= q_hi), sink_full & (k_hi <= q_lo)
    blocks = ((k_hi >= q_lo - before) & (k_lo <= q_hi + after)) | sink_any
    full = (((k_lo >= q_hi - before) & (k_hi <= q_lo + after)) | sink_full) & whole & blocks
    return flex.flex(q, k, v, mask, scale, softcap, keep, (blocks, full), traced=traced)


FLEX_WINDOW = Implementation("flex", _flex_window_covers, _flex_window,
                             lower=functools.partial(_flex_window, traced=True), seeded=False)

# ---------------------------------------------------------------- the generated kernels

def _kernel_template(params: tuple, causal: bool):
    """Which template covers a call with these op arguments (op_args' order): window → window
    (its band as BEFORE/AFTER, and SINKS), top-k with an exact selection → topk, block →
    block_sparse on the blocks `kept_blocks` picks (blocks a multiple of 16)."""
    mode, _, window, sinks, band, block = params[:6]
    if mode == "window":
        backward = band == "backward" or (band == "auto" and causal)
        before, after = (window - 1, 0) if backward else (window // 2, window // 2)
        return "window", (("BEFORE", int(before)), ("AFTER", int(after)), ("SINKS", int(sinks)))
    if mode == "topk":
        select = params[8] if len(params) > 8 else "exact"
        if select != "exact":
            return None, (f"sparse mode=topk select={select}: its candidates come from pooled block "
                          "scores; the top-k template gathers an exact selection only")
        return "topk", ()
    if mode == "block":
        if int(block) % 16:
            return None, (f"sparse mode=block block={block}: the block-sparse kernel needs blocks that are a "
                          "multiple of 16 (its tiles divide them, and a GPU dot takes at least 16 rows)")
        return "block_sparse", (("SPARSE_M", int(block)), ("SPARSE_N", int(block)))
    return None, f"sparse mode={mode!r} has no template"


def _kernel_extra(cfg, args, backward: bool) -> tuple:
    """The top-k template's indices, or the block-sparse template's layout of the kept blocks."""
    q, k, v, mask, scale, softcap, causal, dropout_p, *params = args
    if cfg.template == "topk":
        return (topk_indices(q, k, mask, scale, softcap, causal, params[1]),)
    if cfg.template == "block_sparse":
        return selected_lists(kept_blocks(*args), args, dict(cfg.params)["SPARSE_M"], backward)
    return ()


KERNEL = KernelPlan(_kernel_template, _kernel_extra)
op = define_attention_op(OP_NAME, reference, "str mode, int top_k, int window, int sinks, str band, "
                                             "int block, float density, float mass, str select, "
                                             "float[] head_density", fast=(FLEX_WINDOW,), kernel=KERNEL)
backward_op = BACKWARD_OPS[OP_NAME]


def op_args(site, options: dict) -> tuple:
    o = _options(options)
    return (str(o["mode"]), int(o["k"]), int(o["window"]), int(o["sinks"]), str(o["band"]),
            int(o["block"]), float(o["density"]), float(o["mass"]), str(o["select"]),
            [float(x) for x in o["head_density"]])


# ---------------------------------------------------------------- rewrite time

def prepare(site, samples, options: dict) -> dict:
    """The active mode's options; `band=auto` resolved from the site, k clamped to a static kv_len.

    Sparse represents any mask, bias and softcap, so no site is kept exact.
    """
    o = _options(options)
    if o["mode"] == "window" and o["band"] == "auto":
        causal = bool(site.causal) or bool(samples) and all(
            s["causal"] or is_causal_mask(s["mask"]) for s in samples)
        o["band"] = "backward" if causal else "two-sided"
    if o["mode"] == "topk" and isinstance(site.kv_len, int):
        o["k"] = min(o["k"], site.kv_len)
    keys = MODE_KEYS[o["mode"]]
    if o["select"] == "pooled" and o["mode"] != "window":      # (topk's candidates come in blocks)
        keys += ("select",) + (("block", "density") if o["mode"] == "topk" else ())
    if o["budget"] == "global" and o["mode"] == "block":        # share_budget adds head_density
        keys += ("budget",)
    return {"mode": o["mode"], **{key: o[key] for key in keys}}


def needs_samples(site, options: dict) -> bool:
    """Whether planning reads the site's captured values beyond what a mask needs (the pipeline
    captures every masked site): `budget=global` measures per-head curves on them. Otherwise the
    site record is enough, and with the check off the pipeline plans without running the model."""
    o = _options(options)
    return o["mode"] == "block" and o["budget"] == "global"


def auto_ladder(site, options: dict) -> list[dict]:
    """Overrides from cheapest to exact for the active mode (the last rung is always exact)."""
    o = _options(options)
    lk = site.kv_len if isinstance(site.kv_len, int) else None
    lq = site.q_len if isinstance(site.q_len, int) else None
    if o["mode"] == "block":                  # per-head densities (budget=global) scale with the rung
        def rung(d, **more):
            hd = [min(1.0, x * d / o["density"]) for x in o["head_density"]] if d < 1 else []
            return {"density": d, **more, **({"head_density": hd} if o["head_density"] else {})}
        return [rung(d) for d in (1 / 16, 1 / 8, 1 / 4, 1 / 2)] + [rung(1.0, mass=1.0)]
    if o["mode"] == "topk":
        key, need = "k", lk or _GENEROUS
    else:
        backward = o["band"] == "backward" or (o["band"] == "auto" and bool(site.causal))
        key = "window"
        need = (lk if backward else (lk and lq and 2 * max(lq, lk))) or _GENEROUS
    ladder, x = [], 4
    while x < need:
        ladder.append({key: x})
        x *= 2
    return ladder + [{key: need}]


def share_budget(planned: dict, seen: dict) -> dict:
    """budget=global: one density target spread over every head of every block-mode site that asks.

    seen: {site id: (site, samples)}, the example inputs `prepare` saw. On them each query head's
    curve is measured (_head_curves): at every density where ⌈d·n_I⌉ steps for some query block,
    the blocks the op would keep (_n_keep's rule, the same as budget=uniform's) and the softmax
    mass they hold, ranked as the op ranks them. Every head starts at one block per query block;
    then, while the blocks kept stay within density × the visible blocks of all of them, the head
    whose next step adds the most mass per added block takes it. So the total never exceeds the
    target (uniform's ⌈·⌉ can) and falls short of it by less than one step of one head. Each such
    site's options gain `head_density` (one per query head).
    """
    ids = [sid for sid, o in planned.items()
           if o.get("mode") == "block" and o.get("budget") == "global" and sid in seen]
    heads, target = [], 0.0
    for sid in ids:
        o = _options(planned[sid])
        dens, cost, gain, visible = _head_curves(seen[sid][1], o)
        target += o["density"] * float(visible.sum())
        heads += [[sid, dens, cost[h].tolist(), gain[h].tolist(), 0] for h in range(cost.shape[0])]
    total = sum(hd[2][0] for hd in heads)
    queue = []

    def offer(i):
        _, _, cost, gain, j = heads[i]
        if j + 1 < len(cost):
            dc, dg = cost[j + 1] - cost[j], gain[j + 1] - gain[j]
            heapq.heappush(queue, (-dg / dc if dc > 0 else -math.inf, i))
    for i in range(len(heads)):
        offer(i)
    while queue:
        _, i = heapq.heappop(queue)
        j, cost = heads[i][4], heads[i][2]
        if total + cost[j + 1] - cost[j] > target + 1e-9:
            continue                                                   # this head stops here
        total += cost[j + 1] - cost[j]
        heads[i][4] = j + 1
        offer(i)
    out = dict(planned)
    for sid in ids:
        out[sid] = {**planned[sid], "head_density": [hd[1][hd[4]] for hd in heads if hd[0] == sid]}
    return out


def _head_curves(samples, o: dict):
    """(densities (M,), blocks kept (H, M), mass kept (H, M), visible blocks (H,)) over every
    sequence of `samples`; the densities are every m/n_I (m ≤ n_I), where some query block's
    ⌈d·n_I⌉ steps. Mass is summed over rows (each row's softmax sums to 1); p in float64."""
    bs = o["block"]
    seqs = []
    for smp in samples:
        q, k, mask, causal = smp["q"], smp["k"], smp["mask"], bool(smp["causal"])
        scale, softcap = smp["scale"], smp["softcap"]
        cdt = compute_dtype(q.dtype)
        qc, kx = q.detach().to(cdt), expand_kv(q, k).detach().to(cdt)
        b, h, lq, _ = qc.shape
        lk = kx.shape[-2]
        nk = -(-lk // bs)
        with torch.no_grad():
            count, bias = _block_stats(mask, causal, lq, lk, bs, q.device)
            parts = []
            for i0, i1 in _chunks(lq, b * h * lk, bs):
                p = _softmax(_dense_scores(qc, kx, mask, scale, softcap, causal, i0, i1).double())
                c, n = p.shape[-2:]
                cq, nb = -(-c // bs), -(-n // bs)
                pm = F.pad(p, (0, nb * bs - n, 0, cq * bs - c)).view(b, h, cq, bs, nb, bs).sum((3, 5))
                parts.append(F.pad(pm, (0, nk - nb)))
            mass = torch.cat(parts, -2)                                  # (B, H, nq, nk)
            rank = mass
            if o["select"] == "pooled":
                rank = _scores(_block_means(qc, bs), _block_means(kx, bs), scale, softcap) + _pooled_offset(count, bias)
            order = rank.argsort(-1, descending=True)
            cum = F.pad(mass.gather(-1, order).cumsum(-1), (1, 0))       # mass of the best j blocks
            seqs.append((cum, (count > 0).sum(-1).expand(b, h, -1)))
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


def _omega(s, o: dict, i0, i1, lq, lk, causal, n_keep=None, chosen=None):
    """Ω as a (B, H, c, n) indicator for a chunk of dense scores s (n = s's key count): what the op
    keeps. chosen: select=pooled's (idx, valid) key blocks; n_keep: per-head budgets (exact ranking)."""
    n = s.shape[-1]
    if chosen is not None:                    # the keys of the chosen blocks
        idx, valid = chosen
        bs, nk = o["block"], -(-lk // o["block"])
        blocks = torch.zeros(*idx.shape[:-1], nk, dtype=torch.bool, device=s.device).scatter_(-1, idx, valid)
        cand = blocks.repeat_interleave(bs, -2)[..., :s.shape[-2], :].repeat_interleave(bs, -1)[..., :n]
        if o["mode"] == "block":
            return cand
        s = s.masked_fill(~cand, NEG_INF)     # topk among the candidates (a pick scoring −inf keeps nothing)
    if o["mode"] == "topk":
        idx = s.topk(min(o["k"], n), dim=-1).indices
        picked = torch.zeros(s.shape, dtype=torch.bool, device=s.device).scatter_(-1, idx, True)
        return picked if chosen is None else picked & (s > NEG_INF)
    if o["mode"] == "block":
        return _block_keep(s, _softmax(s), o["block"], o["density"], o["mass"], n_keep)
    i = torch.arange(i0, i1, device=s.device)[:, None]
    return _in_window(i, torch.arange(n, device=s.device), o, lq, lk, causal)


def diagnostics(q, k, v, mask, scale, softcap, causal, options: dict) -> dict:
    """Retained dense mass mᵢ (min/mean overall and per head), the measured gap
    max |‖pᵢ − qᵢ‖₁ − 2(1 − mᵢ)| and the mean |Ωᵢ ∩ visible|; chunked like the op, p in float64.

    Rows with no visible key are exact (zeros both ways) and left out; a row whose Ωᵢ holds
    no visible key has mᵢ = 0 and qᵢ = 0, where the identity does not apply (also left out of the gap).
    """
    o = _options(options)
    cdt = compute_dtype(q.dtype)
    qc, kx = q.detach().to(cdt), expand_kv(q, k).detach().to(cdt)
    b, h, lq, _ = qc.shape
    lo = torch.full((h,), math.inf, dtype=torch.float64)
    total = torch.zeros(h, dtype=torch.float64)
    rows = torch.zeros(h, dtype=torch.float64)
    gap, kept = 0.0, 0.0
    plan = _block_plan(qc, kx, mask, causal, o, scale, softcap) if lq and kx.shape[-2] else None
    align = o["block"] if o["mode"] == "block" or plan is not None else 1
    with torch.no_grad():
        for i0, i1 in _chunks(lq, b * h * kx.shape[-2], align):
            s = _dense_scores(qc, kx, mask, scale, softcap, causal, i0, i1)
            chosen = _select(plan, o, i0, i1) if plan is not None and plan["pooled"] else None
            n_keep = None if plan is None else _plan_rows(plan, i0, i1, o["block"])["n_keep"]
            keep = _omega(s, o, i0, i1, lq, kx.shape[-2], causal, n_keep, chosen).expand(s.shape)
            p = _softmax(s.double())
            live = s.amax(-1) > NEG_INF                                  # rows with a visible key
            m = (p * keep).sum(-1)
            qrow = torch.where(keep, p, 0.0) / m.clamp(min=1e-300)[..., None]
            ok = live & (m > 0)
            if ok.any():
                gap = max(gap, ((p - qrow).abs().sum(-1) - 2 * (1 - m))[ok].abs().max().item())
            lo = torch.minimum(lo, torch.where(live, m, math.inf).amin((0, 2)))
            total += torch.where(live, m, 0.0).sum((0, 2))
            rows += live.sum((0, 2))
            kept += (keep & (s > NEG_INF)).sum().item()
    per_min = [1.0 if math.isinf(x) else x for x in lo.tolist()]
    per_mean = [t / r if r else 1.0 for t, r in zip(total.tolist(), rows.tolist())]
    n = rows.sum().item()
    return {"mode": o["mode"],
            "retained_mass_min": min(per_min, default=1.0),
            "retained_mass_mean": total.sum().item() / n if n else 1.0,
            "retained_mass_min_per_head": per_min,
            "retained_mass_mean_per_head": per_mean,
            "l1_identity_gap": gap,
            "kept_keys_mean": kept / n if n else 0.0}


# ---------------------------------------------------------------- ONNX lowering

def onnx_lower(b, site, q, k, v, mask, options: dict) -> str:
    """Standard ONNX ops (onnxruntime CPU).

    window, and block with select=pooled, score only the keys they keep (`_onnx_window`,
    `_onnx_pooled_block`: no (Lq, Lk) tensor); a short window (c + band + sinks ≥ a static Lk)
    and the other modes build the full score matrix and mask it:
      topk    TopK over keys with k' = Min(k, Lk) at run time; the threshold is the k'-th value,
              and every score ≥ it is kept. Ties at the threshold therefore keep *all* tied keys
              (torch.topk keeps exactly k, breaking ties by index); with no ties the two agree.
      window  (short) the band ∪ sinks keep mask from Range over the run-time Lq/Lk (bottom-right
              i' = i + Lk − Lq).
      block   (select=exact) Pad to whole blocks, block masses by ReduceSum over a (B, H, nq, b, nk, b) view,
              TopK ranks them; kept blocks are those ≥ the n-th mass, n = the density (and mass)
              budget — ties at that mass keep every tied block.
    Every mode ends in a masked softmax whose rows with no kept visible key give zeros.
    Half inputs are computed in fp32 and cast back, as in the reference. A constant mask that
    is exactly the causal pattern (the dynamo exporter's) is taken as the causal flag.
    """

    TP = R.TensorProto
    o = _options(options)
    if o["mode"] not in MODE_KEYS:
        raise R.Unsupported(f"sparse: unknown mode {o['mode']!r}")
    causal = bool(site.causal)
    out_dt = b.dtype(q)
    if out_dt in (TP.FLOAT16, TP.BFLOAT16):                      # computed in fp32
        q, k, v = (b.cast(x, TP.FLOAT) for x in (q, k, v))
    if isinstance(site.heads, int) and isinstance(site.kv_heads, int) and site.heads != site.kv_heads:
        k, v = R.repeat_kv(b, k, site.heads, site.kv_heads), R.repeat_kv(b, v, site.heads, site.kv_heads)
    if o["mode"] != "block" and not causal and R.constant_causal(b, mask):
        mask, causal = None, True                                 # a constant causal mask: the flag
    if o["mode"] == "window" and not _onnx_window_dense(site, o, causal):
        return b.cast(_onnx_window(b, site, q, k, v, mask, o, causal), out_dt)
    if o["mode"] == "block" and o["select"] == "pooled":
        return b.cast(_onnx_pooled_block(b, site, q, k, v, mask, o, causal), out_dt)
    if o["select"] == "pooled" or o["head_density"]:
        raise R.Unsupported(f"sparse {o['mode']}: select=pooled / per-head densities have no ONNX lowering here")
    s = R.decomposed_scores(b, site, q, k, mask, causal)          # mask and causal before selection
    ninf = b.scalar_like(-math.inf, s)
    i64 = lambda x: b.const(np.array(x, np.int64))                # noqa: E731 - a 0-d int64
    if o["mode"] == "topk":
        kk = b.op("Min", b.ints(int(o["k"])), b.shape_of(s, 3, 4))   # k clamped to the run-time Lk
        top = _onnx_topk(b, s, kk)
        kth = b.op("Slice", top, b.ints(-1), b.ints(np.iinfo(np.int64).max), b.ints(-1))
        s = b.op("Where", b.op("GreaterOrEqual", s, kth, dtype=TP.BOOL), s, ninf)
    elif o["mode"] == "window":                                   # short: the band over the dense scores
        before, after, _ = _onnx_band(o, causal)
        lq, lk = (b.op("Squeeze", b.shape_of(x, 2, 3), b.ints(0)) for x in (q, k))
        ip = b.op("Sub", b.op("Unsqueeze", b.op("Range", lk, b.op("Add", lk, lq), i64(1)), b.ints(1)), lq)
        j = b.op("Range", i64(0), lk, i64(1))                     # rows i' = i + Lk − Lq (Lq, 1), keys (Lk,)
        keep = b.op("And", b.op("GreaterOrEqual", j, b.op("Sub", ip, i64(before)), dtype=TP.BOOL),
                    b.op("LessOrEqual", j, b.op("Add", ip, i64(after)), dtype=TP.BOOL))
        keep = b.op("Or", keep, b.op("Less", j, i64(int(o["sinks"])), dtype=TP.BOOL))
        s = b.op("Add", s, b.op("Where", keep, b.scalar_like(0.0, s), ninf))   # (causal is already in s)
        y = b.op("MatMul", b.op("Softmax", s, axis=-1), b.cast(v, b.dtype(s)))
        dies = mask is not None or R.rows_can_die(b, site, None, True)      # (else every row keeps key i')
        return b.cast(R.zero_nan_rows(b, y) if dies else y, out_dt)
    p = R.safe_softmax(b, s)
    if o["mode"] == "block":
        p = _onnx_block_keep(b, s, p, o, R, i64)
    return b.cast(b.op("MatMul", p, b.cast(v, b.dtype(p))), out_dt)


def _onnx_band(o, causal: bool) -> tuple[int, int, int]:
    """(before, after, c): row i' keeps keys i' − before … i' + after; c rows per query block."""
    backward = o["band"] == "backward" or (o["band"] == "auto" and causal)
    before, after = (int(o["window"]) - 1, 0) if backward else (o["window"] // 2, o["window"] // 2)
    return before, after, max(int(o["window"]), 32)


def _onnx_window_dense(site, o, causal: bool) -> bool:
    """Whether a query block would score about every key anyway (a static Lk no longer than
    c + band + sinks): then the band masks the dense scores instead, with fewer ops."""
    before, after, c = _onnx_band(o, causal)
    return isinstance(site.kv_len, int) and c + before + after + int(o["sinks"]) >= site.kv_len


def _onnx_window(b, site, q, k, v, mask, o, causal: bool) -> str:
    """Window mode as blocked local attention: O(Lq·(c + band + sinks)·D), no (Lq, Lk) tensor.

    Queries are cut in blocks of c = max(window, 32) rows (padded to whole blocks). Block I's
    rows i can only see keys i' − before … i' + after (i' = i + Lk − Lq), one contiguous span
    of c + before + after keys starting at I·c + Lk − Lq − before: those are gathered for the
    block (positions outside 0..Lk−1 clamped and masked), the first `sinks` keys are scored
    for every row beside them, and the band, causal and sink rules of `_in_window` become a
    (nq, c, keys) keep mask shared by every batch and head. A given mask is read at the same
    positions (a key-only mask by Gather, a full one by GatherElements on row blocks).
    """
    TP, I64 = R.TensorProto, R.TensorProto.INT64
    before, after, c = _onnx_band(o, causal)
    span = c + before + after
    i64 = lambda x: b.const(np.array(x, np.int64))                 # noqa: E731 - a 0-d int64
    lq1, lk1 = b.shape_of(q, 2, 3), b.shape_of(k, 2, 3)            # (1,)
    lq, lk = b.op("Squeeze", lq1, b.ints(0)), b.op("Squeeze", lk1, b.ints(0))
    nq1 = b.op("Div", b.op("Add", lq1, b.ints(c - 1)), b.ints(c))   # ⌈Lq / c⌉, (1,)
    nq = b.op("Squeeze", nq1, b.ints(0))
    off = b.op("Sub", lk, lq)
    # positions: rows i (nq, c, 1) as i' = i + Lk − Lq, band keys j (nq, 1, span), sinks js (S,)
    start = b.op("Add", b.op("Mul", b.op("Range", i64(0), nq, i64(1), dtype=I64), i64(c)), off)   # (nq,)
    rows = b.op("Add", b.op("Unsqueeze", start, b.ints(1)), b.op("Range", i64(0), i64(c), i64(1), dtype=I64))
    j = b.op("Add", b.op("Unsqueeze", b.op("Sub", start, i64(before)), b.ints(1)),
             b.op("Range", i64(0), i64(span), i64(1), dtype=I64))  # (nq, span)
    ip, jj = b.op("Unsqueeze", rows, b.ints(2)), b.op("Unsqueeze", j, b.ints(1))
    le, ge, lt = (lambda x, y, op=op: b.op(op, x, y, dtype=TP.BOOL) for op in ("LessOrEqual", "GreaterOrEqual", "Less"))
    keep = b.op("And", ge(jj, b.op("Sub", ip, i64(before))), le(jj, b.op("Add", ip, i64(after))), dtype=TP.BOOL)
    keep = b.op("And", keep, b.op("And", ge(jj, i64(int(o["sinks"]))), lt(jj, lk), dtype=TP.BOOL), dtype=TP.BOOL)
    if causal:
        keep = b.op("And", keep, le(jj, ip), dtype=TP.BOOL)          # (nq, c, span)
    jc = b.op("Min", b.op("Max", j, i64(0)), b.op("Sub", lk, i64(1)))   # clamped for Gather
    qs = b.op("Mul", q, b.scalar_like(R.resolve_scale(b, site), q))
    pad_rows = b.op("Concat", b.ints(0, 0, 0, 0, 0, 0), b.op("Sub", b.op("Mul", nq1, b.ints(c)), lq1), b.ints(0),
                    axis=0, dtype=I64)
    qp = b.op("Pad", qs, pad_rows, b.scalar_like(0.0, q))          # (B, H, nq·c, D)
    qb = b.op("Reshape", qp, b.op("Concat", b.ints(0, 0), nq1, b.ints(c, -1), axis=0, dtype=I64))
    kg = b.op("Gather", k, jc, axis=2)                             # (B, H, nq, span, D)
    s = b.op("MatMul", qb, b.op("Transpose", kg, perm=[0, 1, 2, 4, 3]))   # (B, H, nq, c, span)
    vg = b.op("Gather", v, jc, axis=2)
    sinks = int(o["sinks"])
    if sinks:
        ns1 = b.op("Min", b.ints(sinks), lk1)
        ks, vs = (b.op("Slice", x, b.ints(0), ns1, b.ints(2)) for x in (k, v))        # (B, H, S, ·)
        ss = b.op("MatMul", qp, b.op("Transpose", ks, perm=[0, 1, 3, 2]))             # (B, H, nq·c, S)
        s = b.op("Concat", b.op("Reshape", ss, b.op("Concat", b.ints(0, 0), nq1, b.ints(c, -1), axis=0,
                                                   dtype=I64)), s, axis=-1)
        vshape = b.op("Concat", b.shape_of(vs, 0, 2), nq1, b.shape_of(vs, 2, 4), axis=0, dtype=I64)
        vg = b.op("Concat", b.op("Expand", b.op("Unsqueeze", vs, b.ints(2)), vshape), vg, axis=3)
        js = b.op("Range", i64(0), b.op("Squeeze", ns1, b.ints(0)), i64(1), dtype=I64)   # (S,)
        sk = le(js, ip) if causal else b.op("Expand", b.const(np.array(True)),
                                            b.op("Concat", nq1, b.ints(c), ns1, axis=0, dtype=I64))
        keep = b.op("Concat", sk, keep, axis=-1)                   # (nq, c, S + span)
    if site.softcap:
        cap = b.scalar_like(float(site.softcap), s)
        s = b.op("Mul", b.op("Tanh", b.op("Div", s, cap)), cap)
    if mask is not None:
        m = _onnx_window_mask(b, q, mask, jc, c, nq1, ns1 if sinks else None)
        if b.dtype(m) == TP.BOOL:
            keep = b.op("And", keep, m, dtype=TP.BOOL)
        else:
            s = b.op("Add", s, b.cast(m, b.dtype(s)))
    p = b.op("Softmax", b.op("Where", keep, s, b.scalar_like(-math.inf, s)), axis=-1)
    y = b.op("MatMul", p, vg)                                        # (B, H, nq, c, Dv)
    y = b.op("Reshape", y, b.op("Concat", b.ints(0, 0, -1), b.shape_of(y, 4, 5), axis=0, dtype=I64))
    y = b.op("Slice", y, b.ints(0), lq1, b.ints(2))
    dies = mask is not None or R.rows_can_die(b, site, None, True)      # (else every row keeps key i')
    return R.zero_nan_rows(b, y) if dies else y


def _onnx_window_mask(b, q, mask, jc, c, nq1, ns1):
    """The mask at the window's (row, key) pairs: (B', H', nq, 1 or c, [S +] span)."""
    I64 = R.TensorProto.INT64
    m = b.op("Expand", mask, b.ints(1, 1, 1, 1))                    # rank 4 (normal-form masks have ≤ 4)
    shape = b.g.shape(mask)
    if shape and len(shape) >= 2 and shape[-2] == 1:                 # key-only: one row for every query
        g = b.op("Transpose", b.op("Gather", m, jc, axis=3), perm=[0, 1, 3, 2, 4])   # (B', H', nq, 1, span)
        if ns1 is not None:
            ms = b.op("Unsqueeze", b.op("Slice", m, b.ints(0), ns1, b.ints(3)), b.ints(2))   # (B', H', 1, 1, S)
            shp = b.op("Concat", b.shape_of(m, 0, 2), nq1, b.ints(1), ns1, axis=0, dtype=I64)
            g = b.op("Concat", b.op("Expand", ms, shp), g, axis=-1)
        return g
    m = R.full_query_rows(b, m, q)                                   # (B', H', Lq, Lk)
    lq1 = b.shape_of(q, 2, 3)
    pad = b.op("Concat", b.ints(0, 0, 0, 0, 0, 0), b.op("Sub", b.op("Mul", nq1, b.ints(c)), lq1), b.ints(0),
               axis=0, dtype=I64)
    fill = b.const(np.array(True)) if b.dtype(m) == R.TensorProto.BOOL else b.scalar_like(0.0, m)
    m = b.op("Reshape", b.op("Pad", m, pad, fill), b.op("Concat", b.ints(0, 0), nq1, b.ints(c, -1), axis=0,
                                                         dtype=I64))   # (B', H', nq, c, Lk)
    shp = b.op("Concat", b.shape_of(m, 0, 2), nq1, b.ints(c), b.shape_of(jc, 1, 2), axis=0, dtype=I64)
    g = b.op("GatherElements", m, b.op("Expand", b.op("Unsqueeze", jc, b.ints(1)), shp), axis=4)
    if ns1 is not None:
        g = b.op("Concat", b.op("Slice", m, b.ints(0), ns1, b.ints(4)), g, axis=-1)
    return g


def _onnx_pooled_block(b, site, q, k, v, mask, o, causal: bool) -> str:
    """Block mode with select=pooled as gathered block attention: O(Lq·kb·block·D), kb the most
    key blocks any query block keeps, never an (Lq, Lk) tensor.

    The rank is the reference's pooled logit (`_pooled_select`): block means of q and k, scaled
    and soft-capped, plus log(visible pairs) and the mean bias. The per-block pair counts, bias
    and budgets depend only on the lengths and the mask, so for static lengths with no mask or
    a constant causal one they are the reference's own (`_block_stats`, `_n_keep`), computed
    once here and stored as constants; the TopK over the pooled logits runs in the graph. Each
    query block then gathers its chosen key (and value) blocks from (B·H·nk, block·D) views,
    scores them, masks keys past Lk, unchosen slots and the causal pattern, and attends.
    A constant causal mask is taken as the causal flag, as the reference sees it with
    `causal=True` and no mask (with finfo.min fills the reference would sum them into the bias).
    """
    TP, I64 = R.TensorProto, R.TensorProto.INT64
    lq, lk = site.q_len, site.kv_len
    if not (isinstance(lq, int) and isinstance(lk, int) and lq > 0 and lk > 0):
        raise R.Unsupported("sparse block select=pooled: ONNX needs static sequence lengths")
    if o["head_density"]:
        raise R.Unsupported("sparse block: per-head densities (budget=global) have no ONNX lowering")
    if mask is not None:
        if causal or not R.constant_causal(b, mask):
            raise R.Unsupported("sparse block select=pooled: ONNX supports no mask or a constant causal one")
        causal = True                  # the constant causal mask as the flag: counts are the causal pattern's
    bs = int(o["block"])
    nq, nk = -(-lq // bs), -(-lk // bs)
    with torch.no_grad():
        count, bias = _block_stats(None, causal, lq, lk, bs, "cpu")
        n_keep = _n_keep(count, o, site.heads if isinstance(site.heads, int) else 1)
    dt = b.dtype(q)
    np_dt = R.helper.tensor_dtype_to_np_dtype(dt)
    i64 = lambda x: b.const(np.array(x, np.int64))                 # noqa: E731 - a 0-d int64
    scale = R.resolve_scale(b, site)

    def blocks(x, n, nb):                                          # (B, H, n, D) → (B, H, nb, bs, D), zero-padded
        x = b.op("Pad", x, b.ints(0, 0, 0, 0, 0, 0, nb * bs - n, 0), b.scalar_like(0.0, x))
        return b.op("Reshape", x, b.ints(0, 0, nb, bs, -1))

    def means(xb, n, nb):
        sizes = np.minimum(bs, n - np.arange(nb) * bs).astype(np_dt).reshape(nb, 1)
        return b.op("Div", b.op("ReduceSum", xb, b.ints(3), keepdims=0), b.const(sizes))

    qb, kb_, vb = blocks(q, lq, nq), blocks(k, lk, nk), blocks(v, lk, nk)
    z = b.op("MatMul", b.op("Mul", means(qb, lq, nq), b.scalar_like(scale, q)),
             b.op("Transpose", means(kb_, lk, nk), perm=[0, 1, 3, 2]))          # (B, H, nq, nk)
    if site.softcap:
        cap = b.scalar_like(float(site.softcap), z)
        z = b.op("Mul", b.op("Tanh", b.op("Div", z, cap)), cap)
    cnt = count.double().numpy()
    extra = np.log(cnt, where=cnt > 0, out=np.full_like(cnt, -np.inf))
    if bias is not None:
        extra = extra + np.where(cnt > 0, bias.double().numpy() / np.maximum(cnt, 1), 0.0)
    z = b.op("Add", z, b.const(extra.astype(np_dt)))
    kb = int(n_keep.max())
    top, idx = _onnx_topk(b, z, b.ints(kb), indices=True)                         # (B, H, nq, kb)
    valid = b.op("And", b.op("Less", b.const(np.arange(kb, dtype=np.int64)), b.const(n_keep.numpy()), dtype=TP.BOOL),
                 b.op("Greater", top, b.scalar_like(-math.inf, top), dtype=TP.BOOL), dtype=TP.BOOL)
    if o["mass"] < 1.0:
        lse = b.op("ReduceLogSumExp", z, b.ints(-1), keepdims=1) if b.opset >= 18 else \
            b.op("ReduceLogSumExp", z, axes=[-1], keepdims=1)
        lse = b.op("Where", b.op("IsInf", lse, dtype=TP.BOOL), b.scalar_like(0.0, lse), lse)
        share = b.op("Where", valid, b.op("Exp", b.op("Sub", top, lse)), b.scalar_like(0.0, top))
        before = b.op("Sub", b.op("CumSum", share, i64(-1)), share)
        valid = b.op("And", valid, b.op("Less", before, b.scalar_like(float(o["mass"]), top), dtype=TP.BOOL),
                     dtype=TP.BOOL)
    # gather the chosen key/value blocks from (B·H·nk, bs·D) views
    bh = b.op("Mul", b.shape_of(q, 0, 1), b.shape_of(q, 1, 2), dtype=I64)
    base = b.op("Reshape", b.op("Mul", b.op("Range", i64(0), b.op("Squeeze", bh, b.ints(0)), i64(1), dtype=I64),
                                 i64(nk)), b.op("Concat", b.shape_of(q, 0, 2), b.ints(1, 1), axis=0, dtype=I64))
    flat = b.op("Add", idx, base)                                                 # (B, H, nq, kb)

    def gathered(xb):
        shape = b.op("Concat", b.ints(-1), b.shape_of(xb, 3, 5), axis=0, dtype=I64)
        x = b.op("Reshape", xb, shape)                                            # (B·H·nk, bs, D)
        g = b.op("Gather", x, flat, axis=0)                                       # (B, H, nq, kb, bs, D)
        return b.op("Reshape", g, b.ints(0, 0, 0, kb * bs, -1))

    kg, vg = gathered(kb_), gathered(vb)
    s = b.op("MatMul", b.op("Mul", qb, b.scalar_like(scale, q)), b.op("Transpose", kg, perm=[0, 1, 2, 4, 3]))
    if site.softcap:
        cap = b.scalar_like(float(site.softcap), s)
        s = b.op("Mul", b.op("Tanh", b.op("Div", s, cap)), cap)                   # (B, H, nq, bs, kb·bs)
    j = b.op("Reshape", b.op("Add", b.op("Unsqueeze", b.op("Mul", idx, i64(bs)), b.ints(4)),
                             b.const(np.arange(bs, dtype=np.int64))), b.ints(0, 0, 0, kb * bs))  # key positions
    ok = b.op("And", b.op("Unsqueeze", b.op("Less", j, i64(lk), dtype=TP.BOOL), b.ints(3)),
              b.op("Reshape", b.op("Expand", b.op("Unsqueeze", valid, b.ints(4)), b.ints(1, 1, 1, 1, bs)),
                   b.ints(0, 0, 0, 1, kb * bs)), dtype=TP.BOOL)                   # (B, H, nq, 1, kb·bs)
    if causal:
        rows = (np.arange(nq * bs).reshape(nq, bs, 1) + (lk - lq)).astype(np.int64)
        ok = b.op("And", ok, b.op("LessOrEqual", b.op("Unsqueeze", j, b.ints(3)), b.const(rows), dtype=TP.BOOL),
                  dtype=TP.BOOL)
    p = b.op("Softmax", b.op("Where", ok, s, b.scalar_like(-math.inf, s)), axis=-1)
    y = b.op("Reshape", b.op("MatMul", p, vg), b.ints(0, 0, nq * bs, -1))
    y = b.op("Slice", y, b.ints(0), b.ints(lq), b.ints(2))
    return R.zero_nan_rows(b, y) if R.rows_can_die(b, site, None, causal) else y


def _onnx_topk(b, x, k: str, indices: bool = False):
    """The k largest values of x over the last axis, sorted descending (TopK's values output;
    with `indices`, (values, indices))."""
    values, index = b.fresh("TopK"), b.fresh("TopK_indices")
    b.nodes.append(helper.make_node("TopK", [x, k], [values, index], name=b.fresh("TopK_node"),
                                    axis=-1, largest=1, sorted=1))
    b.types[values], b.types[index] = b.dtype(x), R.TensorProto.INT64
    return (values, index) if indices else values


def _onnx_block_keep(b, s, p, o, R, i64):
    """Block mode: p restricted to the kept key blocks and renormalised (see _block_keep)."""
    TP = R.TensorProto
    bs = int(o["block"])
    zero = b.scalar_like(0.0, p)
    lq, lk = b.shape_of(s, 2, 3), b.shape_of(s, 3, 4)
    nq = b.op("Div", b.op("Add", lq, b.ints(bs - 1)), b.ints(bs))           # ⌈L / b⌉ (int64 Div floors)
    nk = b.op("Div", b.op("Add", lk, b.ints(bs - 1)), b.ints(bs))
    pads = b.op("Concat", b.ints(0, 0, 0, 0, 0, 0), b.op("Sub", b.op("Mul", nq, b.ints(bs)), lq),
                b.op("Sub", b.op("Mul", nk, b.ints(bs)), lk), axis=0, dtype=TP.INT64)
    view = b.op("Concat", b.ints(0, 0), nq, b.ints(bs), nk, b.ints(bs), axis=0, dtype=TP.INT64)

    def blocks(x):                                                          # Σ over each block: (B, H, nq, nk)
        return b.op("ReduceSum", b.op("Reshape", b.op("Pad", x, pads, zero), view), b.ints(3, 5), keepdims=0)

    live = b.op("Cast", b.op("Greater", s, b.scalar_like(-math.inf, s), dtype=TP.BOOL), to=b.dtype(p),
                dtype=b.dtype(p))
    mass = blocks(p)
    n_vis = b.op("ReduceSum", b.op("Cast", b.op("Greater", blocks(live), zero, dtype=TP.BOOL), to=b.dtype(p),
                                   dtype=b.dtype(p)), b.ints(-1), keepdims=1)
    budget = b.op("Max", b.op("Ceil", b.op("Mul", n_vis, b.scalar_like(float(o["density"]), p))),
                  b.scalar_like(1.0, p))                                    # blocks kept per query block
    top = _onnx_topk(b, mass, nk)                                           # masses, best first
    if o["mass"] < 1.0:                                                     # + stop once `mass` is reached
        alive = b.op("Cast", b.op("Greater", b.op("ReduceSum", live, b.ints(-1), keepdims=0), zero, dtype=TP.BOOL),
                     to=b.dtype(p), dtype=b.dtype(p))                       # (B, H, Lq): rows seeing a key
        row_pads = b.op("Concat", b.ints(0, 0, 0, 0, 0), b.op("Sub", b.op("Mul", nq, b.ints(bs)), lq),
                        axis=0, dtype=TP.INT64)
        alive = b.op("Pad", alive, row_pads, zero)
        rows = b.op("ReduceSum", b.op("Reshape", alive, b.op("Concat", b.ints(0, 0), nq, b.ints(bs), axis=0,
                                                              dtype=TP.INT64)), b.ints(-1), keepdims=1)
        before = b.op("Sub", b.op("CumSum", top, i64(-1)), top)            # mass of the better-ranked blocks
        n_mass = b.op("ReduceSum", b.op("Cast", b.op("Less", before, b.op("Mul", rows, b.scalar_like(
            float(o["mass"]), p)), dtype=TP.BOOL), to=b.dtype(p), dtype=b.dtype(p)), b.ints(-1), keepdims=1)
        budget = b.op("Min", budget, n_mass)                                 # (the block crossing it is kept)
    idx = b.op("Sub", b.op("Cast", budget, to=TP.INT64, dtype=TP.INT64), b.ints(1))
    thr = b.op("GatherElements", top, idx, axis=3)                          # the budget-th best mass
    keep = b.op("GreaterOrEqual", mass, thr, dtype=TP.BOOL)                 # (B, H, nq, nk)
    full = b.op("Concat", b.shape_of(keep, 0, 2), nq, b.ints(bs), nk, b.ints(bs), axis=0, dtype=TP.INT64)
    keep = b.op("Expand", b.op("Unsqueeze", keep, b.ints(3, 5)), full)      # (B, H, nq, b, nk, b)
    keep = b.op("Reshape", keep, b.op("Concat", b.ints(0, 0), b.op("Mul", nq, b.ints(bs)),
                                      b.op("Mul", nk, b.ints(bs)), axis=0, dtype=TP.INT64))
    keep = b.op("Slice", keep, b.ints(0, 0), b.op("Concat", lq, lk, axis=0, dtype=TP.INT64), b.ints(2, 3))
    kept = b.op("Where", keep, p, zero)
    z = b.op("ReduceSum", kept, b.ints(-1), keepdims=1)
    return b.op("Div", kept, b.op("Where", b.op("Greater", z, zero, dtype=TP.BOOL), z, b.scalar_like(1.0, p)))


VARIANT = Variant("sparse", OP_NAME, PARAMS, reference, op, op_args, diagnostics,
                  onnx_lower=onnx_lower, cost_model=costing.sparse_model,
                  prepare=prepare,
                  needs_samples=needs_samples,
                  auto_ladder=auto_ladder,
                  inapplicable=inapplicable,
                  share_budget=share_budget)
