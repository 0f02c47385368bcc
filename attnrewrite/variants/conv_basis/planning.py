"""What the pipeline asks of conv-basis per site: which sites it keeps (`prepare`, `needs_samples`),
the auto-tuning ladder over k, and the check's diagnostics."""
from __future__ import annotations

from .compute import _attend, split_mask
from .options import op_args


def prepare(site, samples: list, options: dict):
    """Keep sites the basis cannot represent: cross-attention lengths, a general bias, dropout."""
    for smp in samples:
        q, k = smp["q"], smp["k"]
        if q.shape[-2] != k.shape[-2]:
            return f"conv-basis needs q_len == kv_len (got {q.shape[-2]} and {k.shape[-2]})"
        if split_mask(smp["mask"], smp["causal"], k.shape[-2]) is None:
            return "conv-basis supports causal + per-key (padding) masks only; this bias depends on the query"
        if smp["dropout_p"]:
            return "conv-basis does not apply attention dropout"
    return options


def needs_samples(site, options: dict) -> bool:
    """Whether `prepare` must look at captured values: where the site record leaves its questions
    open — lengths not known equal, dropout (a mask, causal + padding only?, the pipeline
    captures anyway)."""
    return bool(site.dropout) or site.q_len is None or site.q_len != site.kv_len


def auto_ladder(site, options: dict) -> list[dict]:
    n = site.kv_len if isinstance(site.kv_len, int) else 1 << 15
    ladder, k = [], 1
    while k < n:
        ladder.append({"k": k})
        k *= 2
    return ladder + [{"k": n}]


def diagnostics(q, k, v, mask, scale, softcap, causal, options: dict) -> dict:
    stats: dict = {}
    count, fixed, eps, search, delta, segment, precision = op_args(None, options)
    _attend(q, k, v, mask, scale, softcap, causal, 0.0, count, search if fixed is None else fixed, eps, stats,
            delta, segment, precision)
    if "exact_fallback" in stats:
        return {"exact_fallback": stats["exact_fallback"]}
    errs = stats["basis_err"]
    return {"basis_err_max": max(errs), "basis_err_mean": sum(errs) / len(errs),
            "fallback_rows": stats["fallback_rows"], "rows": stats["rows"],
            "starts_mean": sum(stats["starts"]) / len(stats["starts"])}
