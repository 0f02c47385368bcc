"""The interface between the pipeline and a kind of program.

The pipeline (attnrewrite/pipeline.py) is written once against this class:

    sites, unmatched = fe.find_sites()            # detection, once per rewrite
    runs = fe.capture(sites, fe.inputs)           # per site, per input set: the normal form it saw
    program, kept, folded = fe.rewrite(sites, variant, {site id: options})
    fe.outputs(None, inputs) / fe.outputs(program, inputs)   # for the end-to-end check
    fe.save(program, path)

A front end never sets a site's status: it reports what it could not rewrite (`kept`,
{site id: reason}) and the pipeline decides.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

from ..io import InputError
from ..site import AttentionSite


class Rewritten(NamedTuple):
    """What `FrontEnd.rewrite` returns."""
    program: object            # the new program
    kept: dict                 # {site id: reason} for chosen sites it had to leave as they are
    folded: dict               # {site id: weight name} whose calibration map went into that weight


class FrontEnd:
    fmt: str = ""              # the report's "format": pt2, torchscript, pickle, factory, module, demo, onnx, dynamo
    name: str = ""             # the report's "model"
    inputs: list = []          # input sets, in the front end's own form
    inputs_kind: str = ""      # given | example | synthesised | none
    inputs_problem: str = ""   # with "none": why no inputs could be made (raised once a run is needed)
    program = None             # the original program (ExportedProgram, ModelProto, GraphModule)

    def find_sites(self) -> tuple[list[AttentionSite], list[tuple[str, str]]]:
        """Every site, and for every softmax that is not attention, (where, why)."""
        raise NotImplementedError

    def capture(self, sites: list[AttentionSite], inputs: list) -> dict[int, list[dict]]:
        """Per site, per input set: {"q", "k", "v", "mask", "out"} as torch tensors.

        q/k/v/mask are the normal form the variant op will see (K/V before GQA expansion,
        graph-computed scales folded into q); out is the original site's output in the
        (B, H, Lq, Dv) layout.
        """
        raise NotImplementedError

    def scalars(self, site: AttentionSite) -> dict:
        """The op's scalar arguments for `site`: scale, softcap, causal, dropout_p."""
        raise NotImplementedError

    def keep_reason(self, site: AttentionSite) -> str | None:
        """Why this front end can never rewrite `site` (None: it can)."""
        return None

    def rewrite(self, sites: list[AttentionSite], variant, choice: dict[int, dict]) -> Rewritten:
        """The new program, the chosen sites it had to leave as they are, and the calibration
        maps it folded into weights (`Rewritten`)."""
        raise NotImplementedError

    def outputs(self, program, input_set) -> list[tuple[str, object]]:
        """The floating outputs of `program` (None: the original) on one input set, named."""
        raise NotImplementedError

    def save(self, program, path: Path) -> list[Path]:
        """Write `program` atomically; returns the files written."""
        raise NotImplementedError(f"a {self.fmt} program cannot be saved to a file")

    def synthesise(self, seed: int) -> list:
        """One more input set drawn from the program's input types with `seed` (a list of one set)."""
        raise InputError(f"calibration inputs cannot be made for a {self.fmt} program")

    def calibration_inputs(self, n: int) -> tuple[list, list, str]:
        """(n calibration input sets, the evaluation input sets, where they came from): disjoint.

        Given input sets are split: the first n calibrate, the rest evaluate. Otherwise n sets
        are synthesised with seeds 1..n and all of `inputs` (seed 0, or the program's own
        example) evaluate.
        """
        if self.inputs_kind == "given":
            if len(self.inputs) <= n:
                raise InputError(f"calibrating on {n} given input set(s) needs at least {n + 1}: "
                                 "the rest are kept apart to evaluate on")
            evaluation = self.inputs[n:]
            return self.inputs[:n], evaluation, f"given input sets 1-{n} (evaluation: the other {len(evaluation)})"
        sets = [s for seed in range(1, n + 1) for s in self.synthesise(seed)]
        return sets, self.inputs, f"synthesised with seeds 1-{n} (evaluation: the {self.inputs_kind} inputs)"

    def output_path(self, variant: str) -> Path | None:
        """Where the CLI writes the rewritten program by default (None: nowhere)."""
        return None


def default_scale(site: AttentionSite) -> float | None:
    """1/√head_dim, the scale a fused op uses when none is given (None when head_dim is unknown)."""
    return 1.0 / math.sqrt(site.head_dim) if isinstance(site.head_dim, int) and site.head_dim > 0 else None
