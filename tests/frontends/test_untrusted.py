"""Untrusted files and careless runs (issue 18): tampered `.pt2` archives, every path the tool
writes, interruptions and full disks, user faults that once were exit 3, a check that must not
trust NaN, attention inside ONNX control flow, and the start-up cost.

Each case asserts the exit code, one line on stderr naming the problem, no traceback, and
(where it applies) that no marker file appeared, no input changed and nothing was left behind.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from attnrewrite.cli import main
from _models import NoAttention, TinyAttention

REPO = Path(__file__).resolve().parents[2]
X = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))


class _Planted:
    """Unpickling this creates the file named in it: what a hostile archive member would do."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnrewrite:"), err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _no_temp_files(folder: Path) -> list:
    return [p.name for p in folder.rglob(".*") if p.is_file()]


# ---------------------------------------------------------------- 1. code from a tampered .pt2

@pytest.fixture(scope="module")
def good_pt2(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pt2")
    torch.manual_seed(0)
    torch.export.save(torch.export.export(TinyAttention().eval(), (X,)), d / "good.pt2")
    return d / "good.pt2"


def _tampered(good: Path, out: Path, edit) -> Path:
    """A copy of the archive `good` with members replaced or added: edit(members) on {name: bytes}
    (names without the archive's root folder)."""
    with zipfile.ZipFile(good) as z:
        root = z.namelist()[0].split("/")[0]
        members = {n[len(root) + 1:]: z.read(n) for n in z.namelist()}
    edit(members)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(f"{root}/{name}", data)
    return out


def _torch_saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _plant_sample_inputs(m, marker):
    m["data/sample_inputs/model.pt"] = _torch_saved(((X, _Planted(marker)), {}))


def _plant_weight(m, marker):
    cfg = json.loads(m["data/weights/model_weights_config.json"])
    entry = next(iter(cfg["config"].values()))
    entry["use_pickle"] = True
    m["data/weights/model_weights_config.json"] = json.dumps(cfg).encode()
    m["data/weights/" + entry["path_name"]] = _torch_saved(_Planted(marker))


def _plant_constant(prefix: str, payload):
    def edit(m, marker):
        cfg = json.loads(m["data/constants/model_constants_config.json"])
        cfg["config"]["planted"] = {"path_name": f"{prefix}0", "is_param": False, "use_pickle": True,
                                    "tensor_meta": None}
        m["data/constants/model_constants_config.json"] = json.dumps(cfg).encode()
        m[f"data/constants/{prefix}0"] = payload(marker)
    return edit


def _plant_aoti(m, marker):
    m["data/aotinductor/model/model.so"] = b"\x7fELF not really"


PLANTS = {   # name: (edit, words in the refusal)
    "sample-inputs": (_plant_sample_inputs, "data/sample_inputs/model.pt"),
    "weight-use-pickle": (_plant_weight, "data/weights/weight_0"),
    "tensor-constant-use-pickle": (_plant_constant("tensor_", lambda t: _torch_saved(_Planted(t))),
                                   "data/constants/tensor_0"),
    "opaque-object": (_plant_constant("opaque_obj_", lambda t: pickle.dumps(_Planted(t))),
                      "data/constants/opaque_obj_0"),
    "custom-object": (_plant_constant("custom_obj_", lambda t: pickle.dumps(_Planted(t))),
                      "data/constants/custom_obj_0"),
    "aoti-library": (_plant_aoti, "data/aotinductor/model/model.so"),
}


@pytest.mark.parametrize("plant", list(PLANTS))
@pytest.mark.parametrize("command", [["--list"], ["--variant", "exact"]])
def test_a_planted_pickle_in_a_pt2_never_runs(plant, command, good_pt2, tmp_path, capsys):
    edit, member = PLANTS[plant]
    marker = tmp_path / "pwned"
    model = _tampered(good_pt2, tmp_path / "evil.pt2", lambda m: edit(m, str(marker)))
    before = model.read_bytes()
    code, out, err = _cli(capsys, model, *command)
    line = _one_line(err)
    assert code == 2 and member in line and "--trust" in line, line
    assert not marker.exists()
    assert model.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt2"]


@pytest.mark.parametrize("plant", ["sample-inputs", "weight-use-pickle", "opaque-object"])
def test_the_plants_are_real(plant, good_pt2, tmp_path, capsys):
    """The same archives with --trust do run the planted code: the refusal above is what stops them."""
    marker = tmp_path / "pwned"
    model = _tampered(good_pt2, tmp_path / "evil.pt2", lambda m: PLANTS[plant][0](m, str(marker)))
    main([str(model), "--list", "--trust"])
    capsys.readouterr()
    assert marker.exists()


def test_the_archive_json_cannot_switch_the_checks_off(good_pt2, tmp_path, capsys):
    """A config that says use_pickle false over a pickled member: the forced safe load refuses it."""
    marker = tmp_path / "pwned"

    def edit(m):
        cfg = json.loads(m["data/constants/model_constants_config.json"])
        cfg["config"]["planted"] = {"path_name": "tensor_0", "is_param": False, "use_pickle": False,
                                    "tensor_meta": None}
        m["data/constants/model_constants_config.json"] = json.dumps(cfg).encode()
        m["data/constants/tensor_0"] = _torch_saved(_Planted(str(marker)))
        m["data/sample_inputs/model.pt"] = pickle.dumps(_Planted(str(marker)))     # a bare pickle, not a zip
    model = _tampered(good_pt2, tmp_path / "evil.pt2", edit)
    code, out, err = _cli(capsys, model, "--list")
    line = _one_line(err)
    assert code == 2 and "evil.pt2" in line and not marker.exists(), line


def test_a_clean_pt2_still_loads_with_its_example_inputs(good_pt2, capsys):
    code, out, err = _cli(capsys, good_pt2, "--list", "--json")
    report = json.loads(out)
    assert code == 0 and report["inputs"] == "example" and len(report["sites"]) == 1, err
