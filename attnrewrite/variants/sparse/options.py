"""sparse's options: the parameters users set, the op's argument order, which options each mode reads."""
from __future__ import annotations

from ..base import OpArg, Param, op_args_from

NAME = "sparse"
OP_NAME = "sparse_attention"


PATTERNS = ("window", "vslash", "blocks")   # mode=heads: a head's pattern is its index here


class _Patterns(Param):
    """A comma-separated, non-empty subset of PATTERNS, kept in PATTERNS' order."""

    def parse(self, key, value):
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        names = [str(x).strip() for x in items if str(x).strip()]
        wrong = [n for n in names if n not in PATTERNS]
        if not names or wrong:
            raise ValueError(f"{key}={value}: expected a comma-separated subset of {', '.join(PATTERNS)}")
        return ",".join(p for p in PATTERNS if p in names)


class _Fraction(Param):
    """A float in (0, 1]."""

    def parse(self, key, value):
        value = super().parse(key, value)
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{key}={value} is not in (0, 1]")
        return value


PARAMS = {
    "mode": Param("topk", str, "which keys each query keeps: topk | window | block | heads (a pattern and "
                  "budget per head, chosen on the example inputs)", choices=("topk", "window", "block", "heads")),
    "k": Param(64, int, "topk: keys kept per query (clamped to kv_len)", minimum=1),
    "window": Param(256, int, "window: band width (backward: keys ending at the diagonal; "
                    "two-sided: |j - i| <= window // 2)", minimum=1),
    "sinks": Param(4, int, "window: the first `sinks` keys are always kept", minimum=0),
    "band": Param("auto", str, "window: backward | two-sided | auto (backward on causal sites)",
                  choices=("auto", "backward", "two-sided")),
    "block": Param(64, int, "block: query/key block size", minimum=1),
    "density": _Fraction(0.25, float, "block/heads: at most this fraction of the visible key blocks per query "
                         "block (heads: on average over the heads)"),
    "mass": _Fraction(1.0, float, "block: stop once the kept dense softmax mass reaches this; heads: blocks-pattern "
                      "heads stop once the pooled shares reach this (1 = off)"),
    "patterns": _Patterns("window,vslash,blocks", str, "heads: the patterns a head may take: window (sinks + "
                          "local), vslash (vertical-slash from the last queries), blocks (pooled, self-similarity "
                          "guarded)"),
    "last": Param(64, int, "heads: how many of the last queries estimate the vertical-slash pattern", minimum=1),
    "select": Param("exact", str, "block/topk: how key blocks are ranked: exact (dense softmax mass) | "
                    "pooled (block means of q and k; topk then scores only the kept blocks' keys)",
                    choices=("exact", "pooled")),
    "budget": Param("uniform", str, "block: uniform (every head keeps `density`) | global (one density "
                    "target shared by every head of every site, by the mass each keeps on the example inputs)",
                    choices=("uniform", "global")),
}
MODE_KEYS = {"topk": ("k",), "window": ("window", "sinks", "band"), "block": ("block", "density", "mass"),
             "heads": ("block", "density", "mass", "patterns", "last")}
OP_ARGS = (OpArg("mode", "str"), OpArg("top_k", "int", key="k"), OpArg("window", "int"), OpArg("sinks", "int"),
           OpArg("band", "str"), OpArg("block", "int"), OpArg("density", "float"), OpArg("mass", "float"),
           OpArg("select", "str"), OpArg("head_density", "float[]"), OpArg("head_pattern", "int[]", default=[]),
           OpArg("last", "int", default=64))
HIDDEN = {"head_density": (), "head_pattern": ()}      # rewrite-time state: per-head budgets and patterns
_ORDER = tuple(a.option for a in OP_ARGS)               # the reference's parameters, as option keys
op_args = op_args_from(OP_ARGS, PARAMS, HIDDEN)


APPLIES = {"k": ("topk",), "window": ("window",), "sinks": ("window",), "band": ("window",),
           "block": ("block", "topk", "heads"), "density": ("block", "topk", "heads"), "mass": ("block", "heads"),
           "patterns": ("heads",), "last": ("heads",),
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
    known = {k: v for k, v in options.items() if k in PARAMS or k in ("head_density", "head_pattern")}
    return {**{k: p.default for k, p in PARAMS.items()}, "head_density": (), "head_pattern": (), **known}
