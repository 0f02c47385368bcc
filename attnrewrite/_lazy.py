"""A module imported on first use: for imports only some commands need (matplotlib for --plot)."""
from __future__ import annotations

import importlib


class LazyModule:
    def __init__(self, name: str, setup=None):
        self._name, self._setup, self._module = name, setup, None

    def __getattr__(self, attr):
        if self._module is None:
            if self._setup is not None:
                self._setup()
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


def _agg() -> None:
    importlib.import_module("matplotlib").use("Agg")       # the file-only backend, before pyplot


pyplot = LazyModule("matplotlib.pyplot", setup=_agg)
