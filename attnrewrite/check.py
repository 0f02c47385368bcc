"""Numeric checks, front-end agnostic: compare numbers a front end captured.

Per site: the variant's PyTorch reference runs on the q/k/v/mask the original site saw
(captured by the front end) and is compared with the original site's output. End to end:
every floating output of the original and the rewritten program on the same inputs.
Errors: rel_err = ‖a − b‖_F / ‖a‖_F (a = original), max_abs_err, cosine, all in float64.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from .variants import exact, resolve
from .variants.base import apply_out_map, is_causal_mask, score_bias  # noqa: F401 - is_causal_mask re-exported

TIMING_REPEAT = 3      # median of this many calls per op, after one warm-up call


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Errors of `got` against `ref`. NaN or ±inf in either fails (rel_err inf, cosine 0) unless
    both hold the same non-finite values in the same places; then the finite rest is compared."""
    a, b = ref.detach().double().flatten(), got.detach().double().flatten()
    bad_a, bad_b = ~torch.isfinite(a), ~torch.isfinite(b)
    nonfinite = int(bad_b.sum())
    if bool(bad_a.any()) or nonfinite:
        same = torch.equal(bad_a, bad_b) and torch.equal(a[bad_a].nan_to_num(0.5), b[bad_b].nan_to_num(0.5))
        if not same:
            return {"max_abs_err": math.inf, "rel_err": math.inf, "cosine": 0.0, "nonfinite": nonfinite}
        a, b = a[~bad_a], b[~bad_b]
    diff = a - b
    na = torch.linalg.vector_norm(a).item()
    nd = torch.linalg.vector_norm(diff).item()
    nb = torch.linalg.vector_norm(b).item()
    return {"max_abs_err": diff.abs().max().item() if diff.numel() else 0.0,
            "rel_err": nd / na if na > 0 else nd,
            "cosine": (a @ b).item() / (na * nb) if na > 0 and nb > 0 else (1.0 if nd == 0 else 0.0)}


def _worse(x: float, larger_is_worse: bool = True) -> float:
    """A sort key that ranks NaN as the worst value (max/min skip NaN unless it comes first)."""
    if math.isnan(x):
        return math.inf
    return x if larger_is_worse else -x


def worst(stats: list[dict]) -> dict:
    if not stats:
        return {}
    out = {"max_abs_err": max((s["max_abs_err"] for s in stats), key=_worse),
           "rel_err": max((s["rel_err"] for s in stats), key=_worse),
           "cosine": max((s["cosine"] for s in stats), key=lambda c: _worse(c, False))}
    nonfinite = sum(s.get("nonfinite", 0) for s in stats)
    if nonfinite:
        out["nonfinite"] = nonfinite
    return out


def site_check(variant, scalars: dict, options: dict, op_args: tuple, runs: list[dict]) -> dict:
    """The variant's reference on each captured run vs the original output; diagnostics on the first."""
    sc, cap, causal = scalars["scale"], scalars["softcap"], scalars["causal"]
    stats = []
    for r in runs:
        got = apply_out_map(variant.reference(r["q"], r["k"], r["v"], r["mask"], sc, cap, causal, 0.0, *op_args),
                            options.get("out_map"))
        stats.append(compare(r["out"], got))
    first = runs[0]
    diag = variant.diagnostics(first["q"], first["k"], first["v"], first["mask"], sc, cap, causal, options)
    return {**worst(stats), "diagnostics": diag}


def end_to_end(pairs: list[tuple[str, torch.Tensor, torch.Tensor]], tolerance: float | None) -> dict:
    """Worst error per output name over (name, original, rewritten) triples; passed against `tolerance`."""
    by_name: dict[str, list] = {}
    for name, a, b in pairs:
        by_name.setdefault(name, []).append(compare(a, b))
    outs = [{"name": n, **worst(s)} for n, s in by_name.items()]
    rel = max((o["rel_err"] for o in outs), default=0.0, key=_worse)
    passed = None if tolerance is None else bool(rel <= tolerance) and not math.isnan(rel)
    return {"outputs": outs, "rel_err": rel, "tolerance": tolerance, "passed": passed}


def default_tolerance(variant, sites) -> float | None:
    """A variant that claims exactness (`Variant.exact_check`: exact): 1e-4 (1e-2 when any site
    computes in half precision); approximate variants: not gated.

    A site computes in half precision when its q is half, or when any step of it is (its
    `compute_dtype`: fp32 q and k with `p.half() @ v.half()` is rounded to fp16 there).
    """
    if not resolve(variant).exact_check:
        return None
    half = any(str(d) in ("float16", "bfloat16")
               for s in sites for d in (s.dtype, getattr(s, "compute_dtype", None)))
    return 1e-2 if half else 1e-4


def _median_ms(fn, repeat: int) -> float:
    fn()                                                  # warm-up (first-call allocations, dispatch caches)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def original_attention(q, k, v, mask, scale: float, softcap: float, causal: bool):
    """A callable computing the site's exact attention the fastest way PyTorch offers on
    this device: fused SDPA (mask and causal flag as one additive bias, GQA native), or the
    exact reference where SDPA cannot express it (soft-capping)."""
    if softcap:
        return lambda: exact.op(q, k, v, mask, scale, softcap, causal, 0.0)
    bias = score_bias(mask, causal, q.shape[-2], k.shape[-2], q.dtype, q.device)
    gqa = q.shape[1] != k.shape[1]
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale,
                                                                    enable_gqa=gqa)


def time_site(variant, scalars: dict, op_args: tuple, run: dict, repeat: int = TIMING_REPEAT) -> dict:
    """Wall time (ms, median of `repeat`) of one site's attention before and after, on one
    captured input set, in this process: "original" is PyTorch's fused
    `scaled_dot_product_attention` on the same q/k/v/mask (the exact reference where SDPA
    cannot express the site: soft-capping), "rewritten" the variant's op as the rewritten
    program calls it. `speedup` = original / rewritten (> 1: the rewrite is faster)."""
    q, k, v, mask = run["q"], run["k"], run["v"], run["mask"]
    sc, cap, causal = scalars["scale"], scalars["softcap"], scalars["causal"]
    with torch.no_grad():
        original = original_attention(q, k, v, mask, sc, cap, causal)
        rewritten = lambda: variant.op(q, k, v, mask, sc, cap, causal, 0.0, *op_args)
        before, after = _median_ms(original, repeat), _median_ms(rewritten, repeat)
    return {"original_ms": before, "rewritten_ms": after, "speedup": before / after if after > 0 else math.inf}


def total_time(per_site: dict) -> dict:
    """Sum of the per-site times (`time_site`) and the ratio of the sums."""
    before = sum(t["original_ms"] for t in per_site.values())
    after = sum(t["rewritten_ms"] for t in per_site.values())
    return {"original_ms": before, "rewritten_ms": after, "speedup": before / after if after > 0 else math.inf,
            "sites": len(per_site), "repeat": TIMING_REPEAT}
