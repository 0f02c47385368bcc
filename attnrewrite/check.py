"""Numeric checks, front-end agnostic: compare numbers a front end captured.

Per site: the variant's PyTorch reference runs on the q/k/v/mask the original site saw
(captured by the front end) and is compared with the original site's output. End to end:
every floating output of the original and the rewritten program on the same inputs.
Errors: rel_err = ‖a − b‖_F / ‖a‖_F (a = original), max_abs_err, cosine, all in float64.
"""
from __future__ import annotations

import math

import torch

from .variants.base import apply_out_map, is_causal_mask  # noqa: F401 - is_causal_mask re-exported


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    a, b = ref.detach().double().flatten(), got.detach().double().flatten()
    diff = a - b
    na = torch.linalg.vector_norm(a).item()
    nd = torch.linalg.vector_norm(diff).item()
    nb = torch.linalg.vector_norm(b).item()
    return {"max_abs_err": diff.abs().max().item() if diff.numel() else 0.0,
            "rel_err": nd / na if na > 0 else nd,
            "cosine": (a @ b).item() / (na * nb) if na > 0 and nb > 0 else (1.0 if nd == 0 else 0.0)}


def worst(stats: list[dict]) -> dict:
    if not stats:
        return {}
    return {"max_abs_err": max(s["max_abs_err"] for s in stats),
            "rel_err": max(s["rel_err"] for s in stats),
            "cosine": min(s["cosine"] for s in stats)}


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
    rel = max((o["rel_err"] for o in outs), default=0.0)
    passed = None if tolerance is None else bool(rel <= tolerance) and not math.isnan(rel)
    return {"outputs": outs, "rel_err": rel, "tolerance": tolerance, "passed": passed}


def default_tolerance(variant_name: str, sites) -> float | None:
    """exact: 1e-4 (1e-2 when any site computes in half precision); approximate variants: not gated.

    A site computes in half precision when its q is half, or when any step of it is (its
    `compute_dtype`: fp32 q and k with `p.half() @ v.half()` is rounded to fp16 there).
    """
    if variant_name != "exact":
        return None
    half = any(str(d) in ("float16", "bfloat16")
               for s in sites for d in (s.dtype, getattr(s, "compute_dtype", None)))
    return 1e-2 if half else 1e-4
