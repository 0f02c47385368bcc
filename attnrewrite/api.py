"""The Python entry points: detect() and rewrite() over any supported object.

    sites = attnrewrite.detect(exported_program)             # or a path, an nn.Module + inputs, a ModelProto
    result = attnrewrite.rewrite("model.onnx", "sparse", mode="window", window=64)
    result.program, result.sites, result.report
    package = torch._inductor.aoti_compile_and_package(attnrewrite.lower(result.program))

Both open the object's front end and run the one pipeline (attnrewrite.pipeline).
"""
from __future__ import annotations

from . import pipeline
from .site import AttentionSite
from .variants.base import lowerings
from .variants.impl import lowering_for

Result = pipeline.Result


def detect(obj, example_inputs=None) -> list[AttentionSite]:
    """Every attention site in `obj` (ExportedProgram, GraphModule + inputs, nn.Module + inputs,
    onnx.ModelProto, or a path)."""
    with pipeline.python_words():
        sites, _ = pipeline.detect(pipeline.open_model(obj, example_inputs))
    return sites


def rewrite(obj, variant: str = "exact", example_inputs=None, check: bool = True, sites=None,
            tolerance: float | None = None, calibrate: int = 0, **options) -> Result:
    """Rewrite the selected sites of `obj` into `variant`; check the numbers unless check=False.

    `options` are the variant's parameters (`auto=True` with a `tolerance` picks them per site).
    `calibrate=N` fits a per-head output map per site on N calibration input sets, disjoint
    from the ones the check evaluates on (given sets are split: the first N calibrate).
    """
    with pipeline.python_words():                # errors name these keywords, not the command's flags
        fe = pipeline.open_model(obj, example_inputs)
        return pipeline.rewrite(fe, variant, options, sites=sites, check=check, tolerance=tolerance,
                                calibrate=calibrate)


def lower(program):
    """`program` (a rewritten ExportedProgram) with every variant op whose implementation on the
    program's device is ATen or FlexAttention replaced by that form: what to hand
    `torch._inductor.aoti_compile_and_package` for a package that needs no attnrewrite at run
    time. Ops without such a form (e.g. a soft-capped site) stay as they are."""
    table = {op: lowering_for(impls, out_map_fn, len(op._schema.arguments))
             for op, (impls, out_map_fn) in lowerings().items()}
    return program.run_decompositions(table)
