"""timm and diffusers for the library-model tests (tests/models/test_library_models.py).

diffusers comes with the `dev` extra. timm imports torchvision, and the package registry
this project installs from holds only CUDA builds of torchvision: their C extension does
not load against the CPU torch the Makefile pins, and torchvision 0.28 then fails at
import time (it registers fake kernels for `torchvision::nms` and `::qnms`, ops the missing
extension would have defined). A torchvision that fails to import would also break
`import transformers`, which imports it when it is installed. So `make install` puts timm
and that torchvision in `.venv/timm`, off the import path, and `import_timm()` adds that
folder and, only when the extension is missing, defines the two op schemas first — the
Python parts timm uses (layers, models) then import and run on the CPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

TIMM_DIR = Path(sys.prefix) / "timm"
_fragment = None          # the torchvision op schemas defined here, kept alive


def import_timm():
    """The timm module, importable as described above."""
    global _fragment
    if str(TIMM_DIR) not in sys.path:
        sys.path.append(str(TIMM_DIR))
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
        _fragment = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            _fragment.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401
    import timm
    return timm
