"""AttentionSite: the one record every attention in every graph becomes.

A site says what an attention *is*, independent of how the model spelled it:
softmax(scale · q·kᵀ [soft-capped] + bias) · v, with q (B, H, Lq, D) and k/v (B, Hkv, Lk, D).
Detection fills it from a graph; rewriting, kernels and checks only ever read it.
The fields named in `REPORT_FIELDS` are the report schema (docs/design.md); `form` is the
op's scalar arguments (NormalForm), which every front end, rewrite and check reads; `graph` is
private bookkeeping of the pass that found the site (where q, k, v and the mask come from).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MASK_FLOOR = -1e4   # an additive bias or fill at or below this removes the key (HF uses finfo.min)

REPORT_FIELDS = ("id", "name", "source", "batch", "heads", "kv_heads", "q_len", "kv_len",
                 "head_dim", "dtype", "compute_dtype", "scale", "softcap", "causal", "mask", "dropout",
                 "status", "reason", "options")


@dataclass(frozen=True)
class NormalForm:
    """The scalar arguments a site's variant op gets, as its graph gives them: the one place the
    rewrite (both IRs), the capture and the check read them from.

      scale      the scalar part of the scale (a per-head or run-time factor goes onto q, and the
                 report's `scale` says "per-head" / "dynamic"); None: 1/√D, from the head size
      softcap    0 for none
      causal     the causal *flag*: causality the op applies itself. A causal mask the graph
                 materialises travels in the mask instead, with this False; AttentionSite.causal
                 is True in both cases (it says what the attention is)
      dropout_p  the dropout the op applies (0 unless active, as in training)
    """
    scale: float | None
    softcap: float = 0.0
    causal: bool = False
    dropout_p: float = 0.0

    @staticmethod
    def of(site: "AttentionSite") -> "NormalForm":
        """The site's form; a site not built by a detector (a hand-made record) is its own form."""
        if site.form is not None:
            return site.form
        scale = None if isinstance(site.scale, str) else site.scale
        return NormalForm(scale, float(site.softcap or 0.0), bool(site.causal), 0.0)


def dim_value(d) -> int | str:
    """An int for a static dim, the symbol's name ("s0") for a symbolic one (never specialising it)."""
    node = getattr(d, "node", None)
    if node is not None and hasattr(node, "maybe_as_int"):
        v = node.maybe_as_int()
        return int(v) if v is not None else str(d)
    try:
        return int(d)
    except (TypeError, ValueError):
        return str(d)


@dataclass
class AttentionSite:
    id: int
    name: str
    source: str                      # sdpa | decomposed | onnx-attention | onnx-decomposed | onnx-contrib
    batch: int | str | None = None
    heads: int | str | None = None
    kv_heads: int | str | None = None
    q_len: int | str | None = None
    kv_len: int | str | None = None
    head_dim: int | str | None = None
    dtype: str = "float32"           # q's dtype
    compute_dtype: str | None = None  # the lowest precision the site computes in (None: as dtype)
    scale: float | str | None = None
    softcap: float | None = None
    causal: bool = False
    mask: str = "none"               # none | additive | boolean
    dropout: float = 0.0
    status: str = "detected"         # detected | rewritten | kept | unselected
    reason: str = ""
    options: dict = field(default_factory=dict)
    check: dict | None = None
    # The op's scalar arguments (NormalForm: not reported; `scale`, `softcap`, `causal` report them).
    form: NormalForm | None = field(default=None, repr=False, compare=False)
    # Pass-private: how to rebuild q, k, v and the mask from the graph (not reported).
    graph: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in REPORT_FIELDS}
        if self.check is not None:
            out["check"] = self.check
        return out

    def add_reason(self, text: str) -> None:
        self.reason = f"{self.reason}; {text}" if self.reason else text
