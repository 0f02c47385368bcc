"""sparse's options: the parameters users set, the op's argument order, which options each mode reads."""
from __future__ import annotations

from ..base import Param

NAME = "sparse"
OP_NAME = "sparse_attention"


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
