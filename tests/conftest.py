"""Shared test set-up.

The tests are split by layer (passes, variants, kernels, frontends) plus `models` (real
transformers families, torch.nn modules, real-world graphs and their ONNX exports). The
helpers in this folder (`_models`, `_kernels_interp`) and the modules some tests borrow
cases from (`test_hf_models`, `test_spellings`, `test_sparse`, `test_onnx_variants`, ...)
are imported by plain name, so this folder and every layer folder go on sys.path.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYERS = ("passes", "variants", "kernels", "frontends", "models")

for _path in (HERE, *(HERE / name for name in LAYERS)):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
