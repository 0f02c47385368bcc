"""Calibration: repair an approximate site with a least-squares map on its output.

For a rewritten site, Ô (tokens × Dv per head) is what the variant computes on the q/k/v/mask
the original site saw, O what the original computed. Per head h we fit a Dv × Dv map

    X_h = argmin_X ‖Ô_h X − O_h‖²_F + λ ‖X − I‖²_F

as one tall least-squares problem, [Ô_h; √λ I] X ≈ [O_h; √λ I], solved by sketch-and-
precondition LSQR (`attnrewrite.lstsq`); the op then returns Ô·X_h per head (its `out_map`).
The pull towards the identity matters: with a few hundred calibration tokens an
unregularised fit (λ = 0) halves the error on those tokens and doubles it on others. λ is
chosen per site by cross-validation over the calibration input sets (each held out in turn;
every fifth token when there is only one set), then the map is refitted on all of it; a site
whose held-out error no λ improves on keeps no map. Every site is fitted on the inputs the
*original* model fed it (teacher forcing), so the fits are independent. The inputs the
result is evaluated on are never among the calibration inputs (the pipeline keeps them apart).
"""
from __future__ import annotations

import torch

from .lstsq import sketch_precondition_lstsq

LAMBDAS = (0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0)    # × the mean squared row norm of Ô


def _fit(a: torch.Tensor, b: torch.Tensor, lam: float) -> tuple[torch.Tensor, int]:
    """Per head (a, b: (H, tokens, Dv)): the ridge-to-identity maps (H, Dv, Dv), LSQR iterations."""
    h, _, dv = a.shape
    eye = torch.eye(dv, dtype=a.dtype)
    maps, iterations = [], 0
    for i in range(h):
        aa = torch.cat([a[i], lam ** 0.5 * eye]) if lam else a[i]
        bb = torch.cat([b[i], lam ** 0.5 * eye]) if lam else b[i]
        try:
            x, info = sketch_precondition_lstsq(aa, bb, tol=1e-10)
            iterations = max(iterations, max(info["iterations"], default=0))
        except ValueError:                 # rank deficient without the ridge: the minimum-norm solution
            x = torch.linalg.lstsq(aa, bb, driver="gelsd").solution
        maps.append(x)
    return torch.stack(maps), iterations


def _rel(a, b) -> float:
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def fit_out_map(variant, scalars: dict, op_args: tuple, runs: list[dict]) -> tuple[list[float] | None, dict]:
    """(the per-head maps, row-major H·Dv·Dv floats, or None; statistics) for one site."""
    sc, cap, causal = scalars["scale"], scalars["softcap"], scalars["causal"]
    per_set = []
    for r in runs:
        approx = variant.reference(r["q"], r["k"], r["v"], r["mask"], sc, cap, causal, 0.0, *op_args).double()
        h, dv = approx.shape[1], approx.shape[-1]
        per_set.append((approx.transpose(0, 1).reshape(h, -1, dv), r["out"].double().transpose(0, 1).reshape(h, -1, dv)))
    a = torch.cat([p[0] for p in per_set], dim=1)                 # (H, tokens, Dv)
    b = torch.cat([p[1] for p in per_set], dim=1)
    tokens = a.shape[1]
    if tokens < 4 * dv:
        return None, {"skipped": f"{tokens} calibration tokens for a {dv}-wide head (need ≥ {4 * dv})"}
    sizes = [p[0].shape[1] for p in per_set]
    if len(per_set) > 1:                                          # each input set held out in turn
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        folds = [torch.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
    else:                                                         # or every fifth token
        folds = [torch.arange(tokens)[torch.arange(tokens) % 5 == 4]]
    fold_fits = []
    for held in folds:
        keep = torch.ones(tokens, dtype=torch.bool)
        keep[held] = False
        fit_rows = keep.nonzero().squeeze(1)
        scale = (a[:, fit_rows].square().sum() / len(fit_rows)).item()
        fold_fits.append((fit_rows, held, scale))

    def held_out_error(lam):                                      # None: no map at all
        num = den = 0.0
        for fit_rows, held, scale in fold_fits:
            pred = a[:, held] if lam is None else a[:, held] @ _fit(a[:, fit_rows], b[:, fit_rows], lam * scale)[0]
            num += (pred - b[:, held]).square().sum().item()
            den += b[:, held].square().sum().item()
        return (num / den) ** 0.5 if den else 0.0

    best_lam, best = None, held_out_error(None)
    none_err = best
    for lam in LAMBDAS:
        err = held_out_error(lam)
        if err < best:
            best_lam, best = lam, err
    scale = (a.square().sum() / tokens).item()
    stats = {"tokens": tokens, "held_out_rel_err_without": none_err, "held_out_rel_err_with": best,
             "lambda": best_lam}
    if best_lam is None:
        return None, {**stats, "skipped": "no map improves the held-out calibration tokens"}
    x, iterations = _fit(a, b, best_lam * scale)
    stats.update(rel_err_before=_rel(a, b), rel_err_after=_rel(a @ x, b), lsqr_iterations_max=iterations)
    return x.flatten().tolist(), stats
