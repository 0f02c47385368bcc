"""`torch.compile(model, backend="attnrewrite")`: rewrite attention in every graph Dynamo hands us.

    torch.compile(m, backend="attnrewrite", options={"variant": "sparse", "mode": "window"})
    backend = attnrewrite.compile_backend(variant="sparse", mode="window", window=64)
    torch.compile(m, backend=backend); ...; backend.reports      # one report per compiled graph

Each graph (one per graph break, one more per recompile — e.g. when a sequence length
becomes dynamic) goes through the same pipeline as a saved program: lowered to ATen by
the dynamo front end, detected, planned on Dynamo's example inputs, rewritten into the
variant's op, then handed to Inductor (aot_autograd traces the op's registered backward,
so the compiled model trains) or run as it is (`inner="eager"`).

`ATTNREWRITE_LOG=1` logs each graph's site count to stderr; `backend.reports` keeps a backend
object's reports, and `attnrewrite.backend.REPORTS` the latest REPORTS_KEPT of every backend's
(the string backend's too), so a long-running process does not grow without bound.
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
import warnings
from collections import deque

from torch._dynamo.exc import RestartAnalysis
from torch._inductor.compile_fx import compile_fx

from . import pipeline
from .frontends.dynamo import DynamoFrontEnd
from .io import InputError
from .report import build_report
from .variants import impl
from .variants.base import lowerings

log = logging.getLogger("attnrewrite")
REPORTS_KEPT = 1000
REPORTS: deque = deque(maxlen=REPORTS_KEPT)   # the latest graphs compiled by any attnrewrite backend, in order
_GRAPHS = itertools.count()                   # how many graphs this process has compiled (for the log)
INNERS = ("inductor", "eager")
WARNED: set[str] = set()           # reasons a graph was declined that have been warned about (once each)


class CheckFailed(RuntimeError):
    """The end-to-end check of a compiled graph exceeded the tolerance (`check=True`)."""


class Backend:
    """A torch.compile backend rewriting every attention site into `variant` (options: its parameters).

    `inner`: "inductor" (default) or "eager"; `sites`: the --sites selection; `check`: also run
    the per-site and end-to-end check on the example inputs (one more forward per graph);
    `tolerance`: the end-to-end gate for `check` (a failed check raises) and the budget for
    `auto=True`; `calibrate=N`: fit each site's output map on N input sets drawn like
    Dynamo's example inputs (`DynamoFrontEnd.synthesise`; the example itself is kept apart
    for the check) and fold it into the output projection where there is one.
    """

    def __init__(self, variant: str = "exact", *, inner: str = "inductor", sites=None, check: bool = False,
                 tolerance: float | None = None, calibrate: int = 0, **options):
        if inner not in INNERS:
            raise InputError(f"inner={inner!r} is not one of {', '.join(INNERS)}")
        with pipeline.python_words():                                   # fail now, not at the first call
            variant = pipeline.variant_module(variant)                  # the name, resolved once
            pipeline.validate_options(variant, options, tolerance)
        self.variant, self.inner, self.sites, self.check = variant, inner, sites, check
        self.tolerance, self.options, self.calibrate = tolerance, options, int(calibrate)
        self.reports: list[dict] = []

    @property
    def sites_rewritten(self) -> int:
        """Sites rewritten over every graph compiled so far."""
        return sum(1 for r in self.reports for s in r["sites"] if s["status"] == "rewritten")

    def __call__(self, gm, example_inputs, **_):
        """The compiled graph: rewritten, or — when anything in here fails — the original graph
        (compiled by the inner compiler), recorded in `reports` with `declined` and warned about
        once per reason. A failed check still raises, and Dynamo's own requests to restart the
        frame (e.g. to specialise a float) pass through, leaving no report."""
        report = None
        try:
            fe = DynamoFrontEnd(gm, example_inputs)
            with pipeline.python_words():
                result = pipeline.rewrite(fe, self.variant, self.options, sites=self.sites, check=self.check,
                                          tolerance=self.tolerance, require_sites=False, calibrate=self.calibrate)
            report = self._record(result.report)
            passed = (report.get("check") or {}).get("passed")
            if passed is False:
                raise CheckFailed(f"attnrewrite: check failed on a compiled graph (end-to-end rel_err "
                                  f"{report['check']['rel_err']:.3g} > {self.tolerance})")
            return self._compile(result.program, example_inputs, report)
        except CheckFailed:
            raise
        except RestartAnalysis:
            if report is not None:
                self._forget(report)
            raise
        except Exception as e:  # noqa: BLE001 - any failure here: run the graph as Dynamo gave it
            why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}".rstrip(": ")
            if report is None:
                report = self._record(build_report(model="torch.compile graph", fmt="dynamo", variant=self.variant.name,
                                                   options=self.options, inputs_kind="example", sites=[]))
            pipeline.declined(report, why)
            if why not in WARNED:
                WARNED.add(why)
                warnings.warn(f"attnrewrite: a compiled graph runs without the rewrite ({why})", stacklevel=2)
            log.info("attnrewrite: graph declined: %s", why)
            if self.inner == "eager":
                return gm
            try:
                return compile_fx(gm, example_inputs)
            except RestartAnalysis:
                self._forget(report)
                raise

    def _record(self, report: dict) -> dict:
        self.reports.append(report)
        REPORTS.append(report)
        statuses = [s["status"] for s in report["sites"]]
        message = (f"attnrewrite: graph {next(_GRAPHS)}: {len(statuses)} attention site(s), "
                   f"{statuses.count('rewritten')} rewritten into {self.variant.name}, {statuses.count('kept')} kept")
        if os.environ.get("ATTNREWRITE_LOG", "") not in ("", "0"):
            print(message, file=sys.stderr)
        log.info(message)
        return report

    def _forget(self, report: dict) -> None:
        """Drop the report of a graph Dynamo abandoned (it restarts the frame and hands us a new one)."""
        self.reports.remove(report)
        REPORTS.remove(report)

    def _compile(self, program, example_inputs, report: dict):
        if self.inner == "eager":
            return program
        # the ops Inductor can compile as ATen / FlexAttention are replaced by that form (no Python
        # call on the hot path); the others stay as the op (its implementation table runs them)
        report["lowered"] = impl.lower_graph(program, lowerings())
        if not any(v.startswith("flex") for v in report["lowered"].values()):
            return compile_fx(program, example_inputs)
        try:                                        # (the C++ flex template takes no epilogue)
            return compile_fx(program, example_inputs, config_patches={"epilogue_fusion": False})
        except RestartAnalysis:
            raise
        except Exception as e:  # noqa: BLE001 - Inductor refused the FlexAttention form: compile the ops instead
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            impl.unlower_graph(program)
            report["lowered"] = {n: v if v.startswith("kept:") else f"kept: Inductor could not compile the lowered "
                                 f"graph ({why})" for n, v in report["lowered"].items()}
            warnings.warn(f"attnrewrite: FlexAttention could not be compiled into this graph ({why}); the sparse "
                          "ops run as ops", stacklevel=2)
            return compile_fx(program, example_inputs)


def compile_backend(variant: str = "exact", **options) -> Backend:
    """A backend for `torch.compile(model, backend=...)`; see `Backend` for the options."""
    return Backend(variant, **options)


def attnrewrite_backend(gm, example_inputs, options: dict | None = None, **_):
    """The backend registered as "attnrewrite" (`torch_dynamo_backends` entry point).

    `options` (torch.compile's `options=`): {"variant": ..., "inner": ..., "sites": ...,
    "check": ..., "tolerance": ..., "calibrate": ..., <the variant's parameters>}.
    """
    opts = dict(options or {})
    return Backend(opts.pop("variant", "exact"), **opts)(gm, example_inputs)
