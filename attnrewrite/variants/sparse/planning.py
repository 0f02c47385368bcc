"""Rewrite time: the options a site keeps, the auto-tune ladder, the global per-head budget, and
the retained-mass diagnostics."""
from __future__ import annotations

import math

import torch

from ..base import compute_dtype, expand_kv, is_causal_mask
from .blocks import (_block_keep, _block_means, _plan_rows, _pooled_offset, _select, head_curves, ranked_mass,
                     sample_blocks, spread_budget)
from . import heads
from .compute import selection_plan
from .options import MODE_KEYS, _options
from .scores import NEG_INF, _chunks, _dense_scores, _in_window, _scores, _softmax

_GENEROUS = 1 << 20          # ladder ceiling when kv_len is symbolic (runtime clamps it to Lk)


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
    out = {"mode": o["mode"], **{key: o[key] for key in keys}}
    if o["mode"] == "heads" and samples:                        # a pattern and a density per head
        out["head_pattern"], out["head_density"] = heads.calibrate(samples, o)
    return out


def needs_samples(site, options: dict) -> bool:
    """Whether planning reads the site's captured values beyond what a mask needs (the pipeline
    captures every masked site): `budget=global` and mode=heads measure per-head curves on them. Otherwise the
    site record is enough, and with the check off the pipeline plans without running the model."""
    o = _options(options)
    return o["mode"] == "heads" or (o["mode"] == "block" and o["budget"] == "global")


def auto_ladder(site, options: dict) -> list[dict]:
    """Overrides from cheapest to exact for the active mode (the last rung is always exact)."""
    o = _options(options)
    lk = site.kv_len if isinstance(site.kv_len, int) else None
    lq = site.q_len if isinstance(site.q_len, int) else None
    if o["mode"] in ("block", "heads"):       # per-head densities (budget=global, heads) scale with the rung
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
    whose next step adds the most mass per added block takes it (blocks.spread_budget). So the
    total never exceeds the target (uniform's ⌈·⌉ can) and falls short of it by less than one step
    of one head. Each such site's options gain `head_density` (one per query head).
    """
    ids = [sid for sid, o in planned.items()
           if o.get("mode") == "block" and o.get("budget") == "global" and sid in seen]
    heads, target = [], 0.0
    for sid in ids:
        o = _options(planned[sid])
        dens, cost, gain, visible = _head_curves(seen[sid][1], o)
        target += o["density"] * float(visible.sum())
        heads += [(sid, dens, cost[h].tolist(), gain[h].tolist()) for h in range(cost.shape[0])]
    steps = spread_budget([(c, g) for _, _, c, g in heads], target)
    out = dict(planned)
    for sid in ids:
        out[sid] = {**planned[sid], "head_density": [d[j] for (s, d, _, _), j in zip(heads, steps) if s == sid]}
    return out


def _head_curves(samples, o: dict):
    """(densities (M,), blocks kept (H, M), mass kept (H, M), visible blocks (H,)) over every
    sequence of `samples`, each head's blocks ranked as the op ranks them (select=exact: by their
    dense mass; pooled: by the pooled logit)."""
    bs = o["block"]
    seqs = []
    with torch.no_grad():
        for x in sample_blocks(samples, bs):
            rank = x.mass
            if o["select"] == "pooled":
                rank = _scores(_block_means(x.qc, bs), _block_means(x.kx, bs), x.scale, x.softcap) + \
                    _pooled_offset(x.count, x.bias)
            seqs.append(ranked_mass(x.mass, rank, x.count))
    return head_curves(seqs)


def _omega(s, o: dict, i0, i1, lq, lk, causal, n_keep=None, chosen=None):
    """Ω as a (B, H, c, n) indicator for a chunk of dense scores s (n = s's key count): what the op
    keeps. chosen: select=pooled's (idx, valid) key blocks; n_keep: per-head budgets (exact ranking)."""
    n = s.shape[-1]
    if chosen is not None:                    # the keys of the chosen blocks
        idx, valid = chosen
        bs, nk = o["block"], -(-lk // o["block"])
        blocks = torch.zeros(*idx.shape[:-1], nk, dtype=torch.bool, device=s.device).scatter_(-1, idx, valid)
        cand = blocks.repeat_interleave(bs, -2)[..., :s.shape[-2], :].repeat_interleave(bs, -1)[..., :n]
        if o["mode"] in ("block", "heads"):
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
    plan = selection_plan(qc, kx, mask, causal, o, scale, softcap) if lq and kx.shape[-2] else None
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
            "kept_keys_mean": kept / n if n else 0.0,
            **({"head_pattern": heads.pattern_names(heads.head_patterns(o, h))} if o["mode"] == "heads" else {})}


# ---------------------------------------------------------------- ONNX lowering
