"""Counts scoped to a block of code: what a rewrite's own check ran, not the whole process's.

    CALLS = Tally("kernel calls")
    with CALLS.counting() as counts:     # {key: calls} made inside, this thread / task only
        ...                              # code that calls CALLS.add(key)
"""
from __future__ import annotations

import contextlib
import contextvars


class Tally:
    """Counters opened with `counting()`; `add(key)` counts into every one open in this context."""

    def __init__(self, name: str):
        self._open = contextvars.ContextVar(f"attnrewrite {name}", default=())

    @contextlib.contextmanager
    def counting(self):
        counts: dict = {}
        token = self._open.set((*self._open.get(), counts))
        try:
            yield counts
        finally:
            self._open.reset(token)

    def add(self, key) -> None:
        for counts in self._open.get():
            counts[key] = counts.get(key, 0) + 1
