"""attnrewrite: find every scaled-dot-product attention in a model's graph and rewrite it.

    import attnrewrite
    sites = attnrewrite.detect(exported_program)
    result = attnrewrite.rewrite(exported_program, "exact")   # .program, .sites, .report
    torch.compile(model, backend=attnrewrite.compile_backend(variant="sparse", mode="window"))

The names below are imported when first used, so the `attnrewrite` command starts without
torch. A saved rewritten `.pt2` needs the `attnrewrite::*_attention` custom ops registered
before `torch.export.load`: importing the package registers them when torch is already
imported (`import torch, attnrewrite`), and so does using any name below
(or `attnrewrite.register_ops()`).
"""
import importlib
import sys

_LAZY = {"Result": "api", "detect": "api", "rewrite": "api", "lower": "api", "compile_backend": "backend",
         "AttentionSite": "site", "VARIANTS": "variants"}

__all__ = ["AttentionSite", "Result", "VARIANTS", "compile_backend", "detect", "lower", "register_ops", "rewrite"]


def register_ops() -> None:
    """Register the attnrewrite::* custom ops (what torch.export.load needs for a rewritten program)."""
    importlib.import_module(".variants", __name__)


def __getattr__(name):
    if name in _LAZY:
        register_ops()
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnrewrite' has no attribute {name!r}")


if "torch" in sys.modules:                 # torch's import cost is already paid: register the ops now
    register_ops()
