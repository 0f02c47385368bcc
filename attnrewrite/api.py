"""The Python entry points: detect() and rewrite() over any supported object.

    sites = attnrewrite.detect(exported_program)             # or a path, an nn.Module + inputs, a ModelProto
    result = attnrewrite.rewrite("model.onnx", "sparse", mode="window", window=64)
    result.program, result.sites, result.report

Both open the object's front end and run the one pipeline (attnrewrite.pipeline).
"""
from __future__ import annotations

from . import pipeline
from .site import AttentionSite

Result = pipeline.Result


def detect(obj, example_inputs=None) -> list[AttentionSite]:
    """Every attention site in `obj` (ExportedProgram, GraphModule + inputs, nn.Module + inputs,
    onnx.ModelProto, or a path)."""
    sites, _ = pipeline.detect(pipeline.open_model(obj, example_inputs))
    return sites


def rewrite(obj, variant: str = "exact", example_inputs=None, check: bool = True, sites=None,
            tolerance: float | None = None, calibrate: int = 0, **options) -> Result:
    """Rewrite the selected sites of `obj` into `variant`; check the numbers unless check=False.

    `options` are the variant's parameters (`auto=True` with a `tolerance` picks them per site).
    `calibrate=N` fits a per-head output map per site on N calibration input sets, disjoint
    from the ones the check evaluates on (given sets are split: the first N calibrate).
    """
    fe = pipeline.open_model(obj, example_inputs)
    return pipeline.rewrite(fe, variant, options, sites=sites, check=check, tolerance=tolerance,
                            calibrate=calibrate)
