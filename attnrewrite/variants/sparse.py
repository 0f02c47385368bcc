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

Normal form, GQA, masks and the causal convention are base.py's; half inputs are computed in
fp32; dropout (training) applies to the renormalised weights, as in exact. Chunks run in order
and each draws its mask from the RNG in turn; a checkpointed chunk restores the RNG state it
started from before recomputing (torch.utils.checkpoint's preserve_rng_state), so a seeded
call and its backward see the same masks.

Memory: queries are processed in chunks of ≤ CHUNK_ELEMENTS scores (chunk·Lk for topk/block —
causal chunks score only the keys up to their last diagonal — chunk·(chunk + window + sinks)
for window), so no (Lq, Lk) tensor ever exists; topk also keeps O(chunk·k·D); under autograd each
chunk is checkpointed (recomputed in backward, as Gupta et al. 2021 do), keeping backward
memory linear as well. Selections (top-k, block ranking) are data-dependent and happen per
input at run time; gradients flow through the kept scores, not through the selection.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from onnx import helper
from torch.utils.checkpoint import checkpoint

from ..passes import onnx_rewrite as R
from .base import BACKWARD_OPS, Param, compute_dtype, define_attention_op, expand_kv, is_causal_mask

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
}
MODE_KEYS = {"topk": ("k",), "window": ("window", "sinks", "band"), "block": ("block", "density", "mass")}
_ORDER = ("mode", "k", "window", "sinks", "band", "block", "density", "mass")   # op argument order


def _options(options: dict) -> dict:
    return {**{k: p.default for k, p in PARAMS.items()}, **{k: v for k, v in options.items() if k in PARAMS}}


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


def _block_keep(s, p, block: int, density: float, mass: float):
    """Ω for block mode from a chunk of dense scores s and their softmax p (B, H, c, Lk), the
    chunk's first row starting a block."""
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
    keep = rank < torch.ceil(density * n_vis).clamp(min=1)              # the density budget
    if mass < 1.0:                                                      # keep until the mass target is met:
        before = mass_sorted.cumsum(-1) - mass_sorted                   # mass of the better-ranked blocks
        keep &= before < mass * rows                                    # (the block crossing it is kept)
    keep = torch.zeros_like(keep).scatter(-1, order, keep)
    return keep.repeat_interleave(b, -2)[..., :c, :].repeat_interleave(b, -1)[..., :lk]


# ---------------------------------------------------------------- the reference

def _chunk_out(q, kx, vx, mask, scale, softcap, causal, dropout_p, o, i0, i1):
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
    kept = p * _block_keep(s.detach(), p.detach(), o["block"], o["density"], o["mass"])
    return _dropout(_normalise(kept), dropout_p) @ vx[:, :, :s.shape[-1]]


def _dropout(p, dropout_p: float):
    return F.dropout(p, dropout_p, training=True) if dropout_p else p


def _take(vx, idx):
    """Rows of a contiguous vx (B, H, Lk, D) at key indices idx (B, H, c, k): (B, H, c, k, D)."""
    b, h, lk, d = vx.shape
    flat = idx + lk * torch.arange(b * h, device=idx.device).view(b, h, 1, 1)   # row in (B·H·Lk, D)
    return vx.view(b * h * lk, d).index_select(0, flat.flatten()).view(*idx.shape, d)


def _row_chunks(q, kx, vx_dim, o, causal):
    b, h, lq, _ = q.shape
    lk = kx.shape[-2]
    if o["mode"] == "window":                  # a chunk of c rows scores c + band + sinks keys
        width = sum(_band(o, lq, lk, causal)) + 1
        return _chunks(lq, b * h * (2 * width + min(o["sinks"], lk)), most=max(width, 64))
    if o["mode"] == "topk":                    # c rows: c·Lk scores, then V gathered at c·k keys
        return _chunks(lq, b * h * (lk + min(o["k"], lk) * vx_dim))
    return _chunks(lq, b * h * lk, o["block"])


def reference(q, k, v, mask, scale: float, softcap: float, causal: bool, dropout_p: float,
              mode: str, top_k: int, window: int, sinks: int, band: str, block: int,
              density: float, mass: float):
    o = dict(zip(_ORDER, (mode, top_k, window, sinks, band, block, density, mass)))
    if mode not in MODE_KEYS:
        raise ValueError(f"sparse: unknown mode {mode!r}")
    cdt = compute_dtype(q.dtype)               # half inputs computed in fp32
    qc, kx, vx = q.to(cdt), expand_kv(q, k).to(cdt), expand_kv(q, v).to(cdt).contiguous()
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for i0, i1 in _row_chunks(qc, kx, vx.shape[-1], o, causal):
        fn = functools.partial(_chunk_out, mask=mask, scale=scale, softcap=softcap, causal=causal,
                               dropout_p=dropout_p, o=o, i0=i0, i1=i1)
        # under autograd, recompute each chunk in backward instead of keeping its scores
        outs.append(checkpoint(fn, qc, kx, vx, use_reentrant=False) if grad else fn(qc, kx, vx))
    if not outs:
        return q.new_zeros((*q.shape[:-1], v.shape[-1]))
    return torch.cat(outs, 2).to(q.dtype)


op = define_attention_op(OP_NAME, reference, "str mode, int top_k, int window, int sinks, str band, "
                                             "int block, float density, float mass")
backward_op = BACKWARD_OPS[OP_NAME]


def op_args(site, options: dict) -> tuple:
    o = _options(options)
    return (str(o["mode"]), int(o["k"]), int(o["window"]), int(o["sinks"]), str(o["band"]),
            int(o["block"]), float(o["density"]), float(o["mass"]))


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
    return {"mode": o["mode"], **{key: o[key] for key in MODE_KEYS[o["mode"]]}}


def auto_ladder(site, options: dict) -> list[dict]:
    """Overrides from cheapest to exact for the active mode (the last rung is always exact)."""
    o = _options(options)
    lk = site.kv_len if isinstance(site.kv_len, int) else None
    lq = site.q_len if isinstance(site.q_len, int) else None
    if o["mode"] == "block":
        return [{"density": d} for d in (1 / 16, 1 / 8, 1 / 4, 1 / 2)] + [{"density": 1.0, "mass": 1.0}]
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


def _omega(s, o: dict, i0, i1, lq, lk, causal):
    """Ω as a (B, H, c, n) indicator for a chunk of dense scores s (n = s's key count): what the op keeps."""
    n = s.shape[-1]
    if o["mode"] == "topk":
        idx = s.topk(min(o["k"], n), dim=-1).indices
        return torch.zeros(s.shape, dtype=torch.bool, device=s.device).scatter_(-1, idx, True)
    if o["mode"] == "block":
        return _block_keep(s, _softmax(s), o["block"], o["density"], o["mass"])
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
    align = o["block"] if o["mode"] == "block" else 1
    with torch.no_grad():
        for i0, i1 in _chunks(lq, b * h * kx.shape[-2], align):
            s = _dense_scores(qc, kx, mask, scale, softcap, causal, i0, i1)
            keep = _omega(s, o, i0, i1, lq, kx.shape[-2], causal).expand(s.shape)
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
    """Standard ONNX ops (onnxruntime CPU), dense: the (B, H, Lq, Lk) scores are materialised.

    Unlike the reference (chunked, O(Lq·k) or O(Lq·window) memory), this lowering builds the
    full score matrix — standard ONNX has no gather-attention op — and masks it:
      topk    TopK over keys with k' = Min(k, Lk) at run time; the threshold is the k'-th value,
              and every score ≥ it is kept. Ties at the threshold therefore keep *all* tied keys
              (torch.topk keeps exactly k, breaking ties by index); with no ties the two agree.
      window  the band ∪ sinks keep mask from Range over the run-time Lq/Lk (bottom-right
              i' = i + Lk − Lq), so dynamic sequence lengths keep working.
      block   Pad to whole blocks, block masses by ReduceSum over a (B, H, nq, b, nk, b) view,
              TopK ranks them; kept blocks are those ≥ the n-th mass, n = the density (and mass)
              budget — ties at that mass keep every tied block.
    Every mode ends in a masked softmax whose rows with no kept visible key give zeros.
    Half inputs are computed in fp32 and cast back, as in the reference.
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
    s = R.decomposed_scores(b, site, q, k, mask, causal)          # mask and causal before selection
    ninf = b.scalar_like(-math.inf, s)
    i64 = lambda x: b.const(np.array(x, np.int64))                # noqa: E731 - a 0-d int64
    if o["mode"] == "topk":
        kk = b.op("Min", b.ints(int(o["k"])), b.shape_of(s, 3, 4))   # k clamped to the run-time Lk
        top = _onnx_topk(b, s, kk)
        kth = b.op("Slice", top, b.ints(-1), b.ints(np.iinfo(np.int64).max), b.ints(-1))
        s = b.op("Where", b.op("GreaterOrEqual", s, kth, dtype=TP.BOOL), s, ninf)
    elif o["mode"] == "window":
        lq = b.op("Squeeze", b.shape_of(q, 2, 3), b.ints(0))
        lk = b.op("Squeeze", b.shape_of(k, 2, 3), b.ints(0))
        ip = b.op("Unsqueeze", b.op("Range", lk, b.op("Add", lk, lq), i64(1)), b.ints(1))
        ip = b.op("Sub", ip, lq)                                  # (Lq, 1): i' = i + Lk − Lq
        j = b.op("Range", i64(0), lk, i64(1))                     # (Lk,)
        if o["band"] == "backward" or (o["band"] == "auto" and causal):
            lo, hi = b.op("Sub", ip, i64(int(o["window"]) - 1)), ip
        else:
            lo, hi = b.op("Sub", ip, i64(o["window"] // 2)), b.op("Add", ip, i64(o["window"] // 2))
        keep = b.op("And", b.op("GreaterOrEqual", j, lo, dtype=TP.BOOL), b.op("LessOrEqual", j, hi, dtype=TP.BOOL))
        keep = b.op("Or", keep, b.op("Less", j, i64(int(o["sinks"])), dtype=TP.BOOL))
        s = b.op("Where", keep, s, ninf)                          # (causal visibility is already in s)
    p = R.safe_softmax(b, s)
    if o["mode"] == "block":
        p = _onnx_block_keep(b, s, p, o, R, i64)
    return b.cast(b.op("MatMul", p, b.cast(v, b.dtype(p))), out_dt)


def _onnx_topk(b, x, k: str) -> str:
    """The k largest values of x over the last axis, sorted descending (TopK's values output)."""
    values, indices = b.fresh("TopK"), b.fresh("TopK_indices")
    b.nodes.append(helper.make_node("TopK", [x, k], [values, indices], name=b.fresh("TopK_node"),
                                    axis=-1, largest=1, sorted=1))
    b.types[values] = b.dtype(x)
    return values


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
