"""Work, memory traffic and parallel depth of attention sites under a variant.

`site_cost(site, variant, options)` prices one forward call of the site's attention with
the variant's own cost model (`Variant.cost_model`, from variants/costing.py, whose
docstring gives every convention); `model_cost` adds sites up. A variant without a cost
model, and a site whose sizes are unknown, have no cost (None).

model_cost: flops, bytes and their components are summed over sites; depth is summed too,
because the sites of a transformer stack run one after another (each layer's attention
reads the previous layer's output), so the critical path goes through every site — an
upper bound for sites that are really independent; peak_extra_bytes is the largest
site's (intermediates are freed between sites).
"""
from __future__ import annotations

from .site import AttentionSite
from .variants import resolve
from .variants.costing import SUMMED, Dims, L, Sd  # noqa: F401 - L, Sd: the size helpers, for callers


def site_cost(site: AttentionSite, variant, options: dict | None = None,
              sizes: dict | None = None) -> dict | None:
    """Cost of one forward call of `site` under `variant` (a Variant or its name) with its
    chosen `options`.

    Returns {"runs", "flops", "flops_matmul", "flops_fft", "flops_other", "flops_algorithm",
    "bytes", "peak_extra_bytes", "depth", "depth_algorithm"} (see variants/costing.py for
    every convention), or None when the variant has no cost model or a size is unknown: None
    on the site, or a symbolic size (a string such as "s0") whose names `sizes` does not give.
    Options missing from `options` take the variant's defaults.
    """
    v = resolve(variant)
    if v.cost_model is None:
        return None
    d = Dims(site, sizes)
    if not d.ok:
        return None
    return v.cost_model(d, {**v.defaults(), **(options or {})})


def model_cost(sites_with_variant_and_options, sizes: dict | None = None) -> dict:
    """Sum per-site costs over [(site, variant, options), ...] (options None: site.options).

    Returns {"sites": [cost or None, ...], "total": {...}, "unknown": [ids of sites without a
    cost]}. The total sums flops, bytes and depth over the sites with a cost (see the module
    docstring) and takes the largest peak_extra_bytes.
    """
    costs, unknown = [], []
    for site, variant, options in sites_with_variant_and_options:
        c = site_cost(site, variant, site.options if options is None else options, sizes)
        costs.append(c)
        if c is None:
            unknown.append(site.id)
    known = [c for c in costs if c is not None]
    total = {key: sum(c[key] for c in known) for key in SUMMED}
    total["peak_extra_bytes"] = max((c["peak_extra_bytes"] for c in known), default=0)
    return {"sites": costs, "total": total, "unknown": unknown}
