"""conv-basis's options: the parameters users set and the op's argument order."""
from __future__ import annotations

from ..base import OpArg, Param, op_args_from

NAME = "conv_basis"
OP_NAME = "conv_basis_attention"


class StartsParam(Param):
    """`starts`: norm | search (found per input) or fixed columns ("0,5,9"); None means norm."""

    def parse(self, key: str, value):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "norm")):
            return "norm"
        if isinstance(value, str) and value.strip().lower() == "search":
            return "search"
        try:
            return super().parse(key, value)
        except ValueError:
            raise ValueError(f"{key}={value!r} is not norm, search or a comma-separated list of "
                             "non-negative integers") from None


PARAMS = {
    "k": Param(16, int, "number of basis (start) columns per head and triangle", minimum=1),
    "starts": StartsParam("norm", "ints", "start columns: norm (largest difference norm), search (binary "
                          "search, as the co-authors' code), or fixed columns 0,5,9 (0 is always added)"),
    "eps": Param(0.0, float, "starts=norm: skip candidates with difference norm below eps × the largest",
                 minimum=0.0),
    "delta": Param(1e-9, float, "starts=search: ℓ1 difference (in scaled logits) that ends a column's block",
                   minimum=0.0),
    "segment": Param(1, int, "starts=search: diagonal entries compared per probe (T)", minimum=1),
    "precision": Param("auto", str, "float32 | float64 | auto (float32 on the FFT path for float32/half inputs)",
                       choices=("auto", "float32", "float64")),
}


def _fixed(o):
    return None if isinstance(o["starts"], str) else [int(x) for x in o["starts"]]


def _search(o):
    return o["starts"] if isinstance(o["starts"], str) else "norm"


# (k, fixed starts or None, eps, search mode, delta, segment, precision) — the op's parameters
OP_ARGS = (OpArg("k_basis", "int", key="k"), OpArg("starts", "int[]?", value=_fixed), OpArg("eps", "float"),
           OpArg("search", "str", value=_search, default="norm"), OpArg("delta", "float", default=1e-09),
           OpArg("segment", "int", default=1), OpArg("precision", "str", default="auto"))
op_args = op_args_from(OP_ARGS, PARAMS)
