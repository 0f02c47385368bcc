"""preconditioned — attention with a diagonal preconditioner C per head (a training-time variant).

Source: Saratchandran, "Preconditioned Attention: Enhancing Efficiency in Transformers"
(AISTATS 2026, arXiv 2603.27153). What is known of it is the abstract and the Fig. 1 caption:
each head is multiplied by "a diagonal preconditioner matrix C, which depends on the query Q,
key K, and value V", to lower the condition number of the attention matrices. The paper's
exact formula was NOT available to us, so the two modes below are OUR readings of that
caption, named as such; neither is claimed to be the paper's construction.

With A = softmax(scale·QKᵀ [soft-capped] + bias) (the site's own mask, bottom-right causal
and soft-cap, exactly as base.masked_scores / safe_softmax), O = AV, and a gain g_h per query
head fixed at rewrite time, the head returns g_h · C·A·V with

  mode=output-norm (default)   Cᵢᵢ = 1 / ‖Oᵢ‖₂, computed WITHOUT gradient (detached): every
                               output row is rescaled to norm g_h; gradients flow through
                               A·V only, as if C were a constant. (The reading a third-party
                               implementation uses; unverified.)
  mode=row-equilibrate         Cᵢᵢ = 1 / ‖Aᵢ,:‖₂: the weights are L2- instead of L1-normalised,
                               wᵢⱼ = e^{sᵢⱼ} / (Σₖ e^{2sᵢₖ})^{1/2}; differentiated through (it
                               is the function). A flash loop keeps Σp² beside (or instead
                               of) Σp.

A row that sees no key gives zeros (Cᵢᵢ = 0, never a division by zero); so does an
output-norm row whose output is exactly zero. Dropout (dropout_p > 0) acts on the weights
(C·A for row-equilibrate, A for output-norm) before V, as in `exact`; output-norm then
normalises the dropped-out product.

Gain: `gain=G` uses G for every head. Without it (the default), `prepare` calibrates
g_h = Σᵢ‖Oᵢ‖ / Σᵢ‖(CAV)ᵢ‖ over every row, batch and input set of the captured samples (in
float64), so each head's mean output-row norm on those inputs is unchanged. The gains travel
as an op argument (schema "str mode, float[] gain": one entry per query head, or one for
all), so a saved program is self-contained.

This variant changes the function on purpose: there is no exactness limit and no
`auto_ladder`; the check reports the output change and the conditioning (see diagnostics).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..kernels.dispatch import KernelPlan, gains
from ..passes import onnx_rewrite as R
from . import costing, exact
from .base import (BACKWARD_OPS, MASK_REMOVED, OpArg, Param, define_attention_op, op_args_from, expand_kv, masked_scores, safe_softmax, score_bias,
                   Variant)

NAME = "preconditioned"
OP_NAME = "preconditioned_attention"
MODES = ("output-norm", "row-equilibrate")
PARAMS = {
    "mode": Param("output-norm", str, "output-norm: Cᵢᵢ = g/‖(AV)ᵢ‖ (detached); "
                  "row-equilibrate: Cᵢᵢ = g/‖Aᵢ‖₂ (L2-normalised weights)", choices=MODES),
    "gain": Param(None, float, "per-head gain g (default: calibrated per head so the mean output "
                  "norm on the example inputs is unchanged)", minimum=0.0, allow_none=True),
}
SVD_MAX_N = 1024          # exact κ (an SVD per sampled head) only up to this q_len / kv_len
SAMPLED_HEADS = 4


def _inv(n: torch.Tensor) -> torch.Tensor:
    """1/n where n > 0, else 0 — with a finite gradient everywhere."""
    alive = n > 0
    return torch.where(alive, 1 / torch.where(alive, n, torch.ones_like(n)), torch.zeros_like(n))


def _row_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dim=-1, keepdim=True)


def _weights(q, k, scale, softcap, mask, causal) -> torch.Tensor:
    """base.safe_softmax(base.masked_scores(...)), with a finite gradient on rows that see no key.

    (safe_softmax's own backward is NaN there: softmax of an all -inf row is NaN before the
    `where` zeroes it, and 0·NaN reaches q and k. Filling those rows with 0 first avoids it;
    the values are the same.)
    """
    s = masked_scores(q, k, scale, softcap, mask, causal)
    dead = s.amax(dim=-1, keepdim=True) == -math.inf
    return safe_softmax(s.masked_fill(dead, 0.0)).masked_fill(dead, 0.0)


def _unit(q, k, v, mask, scale, softcap, causal, dropout_p, mode) -> torch.Tensor:
    """C·A·V with gain 1, in the compute dtype."""
    if mode not in MODES:
        raise ValueError(f"{NAME}: mode={mode!r} is not one of {', '.join(MODES)}")
    a = _weights(q, k, scale, softcap, mask, causal)
    if mode == "row-equilibrate":
        a = a * _inv(_row_norm(a))                     # L2-normalised rows; dead rows stay 0
    if dropout_p:
        a = torch.nn.functional.dropout(a, dropout_p, training=True)
    o = torch.matmul(a, expand_kv(q, v).to(a.dtype))
    if mode == "output-norm":
        o = o * _inv(_row_norm(o).detach())            # C is a constant for autograd
    return o


def reference(q, k, v, mask, scale: float, softcap: float, causal: bool, dropout_p: float,
              mode: str, gain: list[float]):
    o = _unit(q, k, v, mask, scale, softcap, causal, dropout_p, mode)
    if len(gain) not in (1, o.shape[1]):
        raise ValueError(f"{NAME}: {len(gain)} gains for {o.shape[1]} heads (give one per head, or one)")
    g = torch.tensor(gain, dtype=o.dtype, device=o.device).view(1, -1, 1, 1)
    return (o * g).to(q.dtype)


def _kernel_template(params: tuple, causal: bool):
    """The preconditioned template covers output-norm and row-equilibrate."""
    mode = params[0]
    if mode not in ("output-norm", "row-equilibrate"):
        return None, f"preconditioned mode={mode!r} has no template"
    return "preconditioned", (("EQUILIBRATE", mode == "row-equilibrate"),)


KERNEL = KernelPlan(_kernel_template, lambda cfg, args, backward: (gains(args[9], args[0]),))   # args[9]: gain


def _gains(o) -> list[float]:
    """The per-head gains `prepare` calibrated (or the user's gain=G)."""
    gain = o.get("gain")
    if gain is None:
        raise ValueError(f"{NAME}: no gain for this site (prepare() calibrates it, or pass gain=G)")
    return [float(g) for g in gain] if isinstance(gain, (list, tuple)) else [float(gain)]


OP_ARGS = (OpArg("mode", "str"), OpArg("gain", "float[]", value=_gains))   # after the normal form
op_args = op_args_from(OP_ARGS, PARAMS)
op = define_attention_op(OP_NAME, reference, OP_ARGS, kernel=KERNEL)
backward_op = BACKWARD_OPS[OP_NAME]


def _float64(s: dict):
    m = s["mask"]
    return (s["q"].double(), s["k"].double(), s["v"].double(),
            m if m is None or m.dtype == torch.bool else m.double())


def prepare(site, samples: list[dict], options: dict) -> dict:
    """The site's options with `gain` = one float per query head (calibrated unless given)."""
    heads = samples[0]["q"].shape[1] if samples else int(site.heads)
    if options.get("gain") is not None:
        return {**options, "gain": [float(options["gain"])] * heads}
    num = torch.zeros(heads, dtype=torch.float64)
    den = torch.zeros(heads, dtype=torch.float64)
    for s in samples:
        q, k, v, mask = _float64(s)
        norm_args = (mask, s["scale"], s["softcap"], s["causal"], 0.0)
        num += _row_norm(exact.reference(q, k, v, *norm_args)).sum(dim=(0, 2, 3))
        den += _row_norm(_unit(q, k, v, *norm_args, options["mode"])).sum(dim=(0, 2, 3))
    gain = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 1.0)
    return {**options, "gain": [float(g) for g in gain]}


def needs_samples(site, options: dict) -> bool:
    """`prepare` calibrates the gain on captured values; a given gain needs only the head count."""
    return options.get("gain") is None or not isinstance(site.heads, int)


def _kappa(m: torch.Tensor) -> float | None:
    sv = torch.linalg.svdvals(m)
    return float(sv[0] / sv[-1]) if sv.numel() and sv[-1] > 0 else None


def diagnostics(q, k, v, mask, scale, softcap, causal, options: dict) -> dict:
    """Output change, gains, and κ(A) vs κ(CA) on up to 4 heads of batch 0.

    output_rel_change = ‖g·C·A·V − A·V‖_F / ‖A·V‖_F over the whole site (the op's compute dtype).
    κ = σ_max/σ_min by an exact SVD (float64) of the visible block of A: the rows that see a
    key (and, for output-norm, have a non-zero output, so Cᵢᵢ is defined) and the columns
    that one of those rows sees; a key counts as seen unless the mask removes it (False,
    causal, or an additive value ≤ -1e4). That block may be rectangular (padding,
    cross-attention): κ is then over its min(rows, cols) singular values. κ(CA) does not
    depend on g. null = singular. Skipped (with the reason) when q_len or kv_len > 1024.
    """
    mode, gain = op_args(None, options)
    base = exact.reference(q, k, v, mask, scale, softcap, causal, 0.0).double()
    out = reference(q, k, v, mask, scale, softcap, causal, 0.0, mode, gain).double()
    denom = torch.linalg.vector_norm(base).item()
    change = torch.linalg.vector_norm(out - base).item()
    diag = {"mode": mode, "gain": gain, "output_rel_change": change / denom if denom > 0 else change}
    h, lq, lk = q.shape[1], q.shape[-2], k.shape[-2]
    if max(lq, lk) > SVD_MAX_N:
        diag["kappa_skipped"] = f"q_len×kv_len {lq}×{lk}: exact SVD only when both are ≤ {SVD_MAX_N}"
        return diag
    first = {"q": q[:1], "k": k[:1], "v": v[:1], "mask": None if mask is None else mask[:1]}
    qd, kd, vd, md = _float64(first)                                     # batch 0, in float64
    a = _weights(qd, kd, scale, softcap, md, causal)
    o = torch.matmul(a, expand_kv(qd, vd))
    c = _inv(_row_norm(a if mode == "row-equilibrate" else o))[..., 0]
    bias = score_bias(md, causal, lq, lk, torch.float64, q.device)
    seen = torch.ones_like(a, dtype=torch.bool) if bias is None else (bias > MASK_REMOVED).expand_as(a)
    n = min(SAMPLED_HEADS, h)
    heads = sorted({round(i * (h - 1) / max(n - 1, 1)) for i in range(n)})      # spread over the heads
    kap = {"batch": 0, "heads": heads, "A": [], "CA": [], "rows": [], "cols": []}
    for hh in heads:
        vis = seen[0, hh]
        rows = vis.any(-1) & (c[0, hh] > 0)
        cols = vis[rows].any(0)
        blk = a[0, hh][rows][:, cols]
        kap["rows"].append(int(rows.sum()))
        kap["cols"].append(int(cols.sum()))
        kap["A"].append(_kappa(blk) if blk.numel() else None)
        kap["CA"].append(_kappa(c[0, hh][rows, None] * blk) if blk.numel() else None)
    diag["kappa"] = kap
    return diag


def onnx_lower(b, site, q, k, v, mask, options: dict) -> str:
    """Standard ONNX ops: decomposed safe softmax, ReduceL2 row norms, Div, and the per-head
    gains as a (1, H, 1, 1) constant (from `prepare`, or one gain for all heads).

    Cᵢᵢ = 0 where the norm is 0 (Where around the Div), as in `_inv`. Half inputs are
    computed in fp32 and cast back. Dropout is a training-time op and is not lowered.
    """

    TP = R.TensorProto
    mode, gain = op_args(site, options)
    if mode not in MODES:
        raise R.Unsupported(f"{NAME}: mode={mode!r} is not one of {', '.join(MODES)}")
    if isinstance(site.heads, int) and len(gain) not in (1, site.heads):
        raise R.Unsupported(f"{NAME}: {len(gain)} gains for {site.heads} heads")
    out_dt = b.dtype(q)
    if out_dt in (TP.FLOAT16, TP.BFLOAT16):
        q, k, v = (b.cast(x, TP.FLOAT) for x in (q, k, v))
    if isinstance(site.heads, int) and isinstance(site.kv_heads, int) and site.heads != site.kv_heads:
        k, v = R.repeat_kv(b, k, site.heads, site.kv_heads), R.repeat_kv(b, v, site.heads, site.kv_heads)
    zero = b.scalar_like(0.0, q)

    def scaled_by_inverse_norm(x):                       # x · 1/‖x‖₂ over the last axis, 0 where ‖x‖ = 0
        n = (b.op("ReduceL2", x, b.ints(-1), keepdims=1) if b.opset >= 18
             else b.op("ReduceL2", x, axes=[-1], keepdims=1))
        alive = b.op("Greater", n, zero, dtype=TP.BOOL)
        return b.op("Where", alive, b.op("Div", x, b.op("Where", alive, n, b.scalar_like(1.0, q))), zero)

    a = R.safe_softmax(b, R.decomposed_scores(b, site, q, k, mask, bool(site.causal)))
    if mode == "row-equilibrate":
        a = scaled_by_inverse_norm(a)
    o = b.op("MatMul", a, b.cast(v, b.dtype(a)))
    if mode == "output-norm":
        o = scaled_by_inverse_norm(o)
    g = b.const(np.asarray(gain, dtype=np.float32).reshape(1, -1, 1, 1), b.dtype(o))
    return b.cast(b.op("Mul", o, g), out_dt)


VARIANT = Variant("preconditioned", OP_NAME, PARAMS, reference, op, op_args, diagnostics,
                  onnx_lower=onnx_lower, cost_model=costing.preconditioned_model,
                  prepare=prepare,
                  needs_samples=needs_samples)
