"""Which ONNX lowering a conv-basis site gets: the dense float64 H̃ (onnx_dense.py) or float32 FFT
convolutions through the DFT op (onnx_dft.py), chosen at rewrite time or, for a dynamic length, by
an `If` on the run-time length."""
from __future__ import annotations

import numpy as np
from onnx import helper

from .convolve import DENSE_MAX_N
from .onnx_dense import lower_dense
from .onnx_dft import lower_dft
from .onnx_steps import BOOL, check_lowerable
from .options import op_args

ONNX_DFT_MIN_N = DENSE_MAX_N + 1   # the DFT lowering from this length on (static, or checked at run time)
ONNX_DFT_OPSET = 17                # the DFT op (opset 17: axis attribute; 20: axis input)


def onnx_lower(b, site, q, k, v, mask, options: dict) -> str:
    """Standard ONNX ops (onnxruntime CPU) for the site, dense or through the DFT op.

    The path follows the reference's own choice for float32 inputs (`precision=auto`): the
    dense float64 H̃ (`onnx_dense.lower_dense`) up to DENSE_MAX_N, float32 FFT convolutions
    (`onnx_dft.lower_dft`) above it. A static length picks the path at rewrite time (DFT from
    ONNX_DFT_MIN_N on); a dynamic one holds both in an `If` on the run-time length, so a model
    exported with dynamic axes costs nothing extra at short lengths and O(k·n·d) at long ones.
    `precision=float64`, or a model below opset 17 (no DFT op), keeps the dense lowering.
    Needs Lq == Lk; starts=search is not lowered (the site is kept with that reason).
    """
    check_lowerable(site, options)
    precision = op_args(site, options)[6]
    if b.opset < ONNX_DFT_OPSET or precision == "float64":
        return lower_dense(b, site, q, k, v, mask, options)
    n = site.kv_len if isinstance(site.kv_len, int) else site.q_len
    if isinstance(n, int):
        lower = lower_dft if n >= ONNX_DFT_MIN_N else lower_dense
        return lower(b, site, q, k, v, mask, options)
    long = b.op("GreaterOrEqual", b.op("Squeeze", b.shape_of(k, 2, 3), b.ints(0)),
                b.const(np.array(ONNX_DFT_MIN_N, np.int64)), dtype=BOOL)
    branches = []
    for lower in (lower_dft, lower_dense):
        start = len(b.nodes)
        y = lower(b, site, q, k, v, mask, options)
        nodes = b.nodes[start:]
        del b.nodes[start:]
        branches.append(helper.make_graph(nodes, b.fresh(lower.__name__), [],
                                          [helper.make_tensor_value_info(y, b.dtype(y), None)]))
    return b.op("If", long, then_branch=branches[0], else_branch=branches[1], dtype=b.dtype(q))
