"""attnrewrite: find every scaled-dot-product attention in a model's graph and rewrite it.

    import attnrewrite
    sites = attnrewrite.detect(exported_program)
    result = attnrewrite.rewrite(exported_program, "exact")   # .program, .sites, .report
    torch.compile(model, backend=attnrewrite.compile_backend(variant="sparse", mode="window"))

Importing the package registers the `attnrewrite::*_attention` custom ops, which a saved
rewritten `.pt2` needs before `torch.export.load`.
"""
from .api import Result, detect, rewrite
from .backend import compile_backend
from .site import AttentionSite
from .variants import VARIANTS

__all__ = ["AttentionSite", "Result", "VARIANTS", "compile_backend", "detect", "rewrite"]
