"""Hostile and broken inputs: each gets exit 2 (1 for a failed check) and one line naming the
problem — never a traceback, never an output file, never a changed input, never executed code."""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import random
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from attnrewrite.cli import main
from _models import NoAttention, TinyAttention


def _damaged(folder: Path, good: Path) -> None:
    """empty, truncated and bit-flipped copies of `good`."""
    data = good.read_bytes()
    (folder / f"empty{good.suffix}").write_bytes(b"")
    (folder / f"trunc_{good.name}").write_bytes(data[: len(data) // 2])
    flipped, rnd = bytearray(data), random.Random(0)
    for _ in range(20):
        flipped[rnd.randrange(len(flipped))] ^= 0xFF
    (folder / f"flip_{good.name}").write_bytes(bytes(flipped))


def _edited(good: onnx.ModelProto, folder: Path, name: str, edit) -> None:
    m = onnx.ModelProto()
    m.CopyFrom(good)
    edit(m)
    onnx.save(m, folder / name)


def _relocate(m: onnx.ModelProto, location: str) -> None:
    """Point every external weight at another file."""
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    torch.manual_seed(0)
    m, x = TinyAttention().eval(), torch.randn(2, 6, 16)
    torch.export.save(torch.export.export(m, (x,)), d / "good.pt2")
    torch.jit.save(torch.jit.trace(m, (x,)), d / "good_ts.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), str(d / "good.onnx"), input_names=["x"], dynamo=False, opset_version=17)
    for name in ("good.pt2", "good_ts.pt", "good.onnx"):
        _damaged(d, d / name)
    rnd = random.Random(1)
    for ext in (".pt2", ".pt", ".onnx"):
        (d / f"random{ext}").write_bytes(bytes(rnd.randrange(256) for _ in range(4096)))
    (d / "text.pt").write_text("hello, this is not a model\n")
    (d / "folder.pt2").mkdir()
    good = onnx.load(d / "good.onnx")
    last = good.graph.node[-1].output[0]
    _edited(good, d, "cycle.onnx", lambda m: m.graph.node[0].input.__setitem__(0, last))
    _edited(good, d, "dangling.onnx", lambda m: m.graph.node[1].input.__setitem__(0, "nowhere"))
    _edited(good, d, "unknown_op.onnx", lambda m: setattr(m.graph.node[1], "op_type", "FrobnicateOp"))
    _edited(good, d, "opset99.onnx", lambda m: setattr(m.opset_import[0], "version", 99))

    def huge(m):
        dim = m.graph.input[0].type.tensor_type.shape.dim[1]
        dim.ClearField("dim_param")
        dim.dim_value = 2 ** 40
    _edited(good, d, "huge_dim.onnx", huge)
    onnx.save(good, d / "ext_good.onnx", save_as_external_data=True, location="ext_good.bin", size_threshold=0)
    external = onnx.load(d / "ext_good.onnx", load_external_data=False)
    _edited(external, d, "ext_missing.onnx", lambda m: _relocate(m, "gone.bin"))
    _edited(external, d, "ext_escape.onnx", lambda m: _relocate(m, "../ext_good.bin"))
    (d / "short.bin").write_bytes((d / "ext_good.bin").read_bytes()[:100])
    _edited(external, d, "ext_short.onnx", lambda m: _relocate(m, "short.bin"))
    torch.export.save(torch.export.export(NoAttention().eval(), (x,)), d / "noattn.pt2")
    torch.save({"kwargs": {"y": x}}, d / "in_names.pt")
    torch.save({"args": (torch.randn(6, 16),)}, d / "in_rank.pt")
    torch.save({"args": (torch.randint(0, 3, (2, 6, 16)),)}, d / "in_dtype.pt")
    np.savez(d / "in_names.npz", y=x.numpy())
    np.savez(d / "in_rank.npz", x=np.zeros((6, 16), np.float32))
    np.savez(d / "in_dtype.npz", x=np.zeros((2, 6, 16), np.int64))
    (d / "afile").write_text("x")
    return d


# (model, extra args, exit code, words the one line must contain)
CASES = {
    "missing": ("missing.pt2", [], 2, "model not found"),
    "folder": ("folder.pt2", [], 2, "is a folder"),
    "pt2-empty": ("empty.pt2", [], 2, "is an empty file, not a torch.export archive"),
    "pt2-truncated": ("trunc_good.pt2", [], 2, "damaged zip archive"),
    "pt2-bitflip": ("flip_good.pt2", [], 2, "flip_good.pt2"),
    "pt2-random": ("random.pt2", [], 2, "unrecognised bytes"),
    "pt-empty": ("empty.pt", [], 2, "is an empty file"),
    "pt-truncated": ("trunc_good_ts.pt", [], 2, "damaged zip archive"),
    "pt-bitflip": ("flip_good_ts.pt", [], 2, "flip_good_ts.pt"),
    "pt-random": ("random.pt", [], 2, "unrecognised bytes"),
    "pt-text": ("text.pt", [], 2, "is a text file"),
    "onnx-empty": ("empty.onnx", [], 2, "is an empty file, not an ONNX model"),
    "onnx-truncated": ("trunc_good.onnx", [], 2, "is not an ONNX model"),
    "onnx-bitflip": ("flip_good.onnx", [], 2, "flip_good.onnx"),
    "onnx-random": ("random.onnx", [], 2, "is not an ONNX model"),
    "onnx-cycle": ("cycle.onnx", [], 2, "not a valid ONNX model: Nodes in a graph must be topologically sorted"),
    "onnx-dangling": ("dangling.onnx", [], 2, "'nowhere'"),
    "onnx-unknown-op": ("unknown_op.onnx", [], 2, "No Op registered for FrobnicateOp"),
    "onnx-opset": ("opset99.onnx", [], 2, "uses opset 99"),
    "onnx-huge-dim": ("huge_dim.onnx", [], 2, "too large to synthesise"),
    "onnx-external-missing": ("ext_missing.onnx", [], 2, "in gone.bin, which is missing"),
    "onnx-external-short": ("ext_short.onnx", [], 2, "short.bin is shorter than weight"),
    "onnx-external-escape": ("ext_escape.onnx", [], 2, "outside the model's folder"),
    "no-attention": ("noattn.pt2", [], 2, "no attention found"),
    "inputs-names": ("good.pt2", ["--inputs", "in_names.pt"], 2, "keywords none, got 0 and ['y']"),
    "inputs-rank": ("good.pt2", ["--inputs", "in_rank.pt"], 2, "has rank 2"),
    "inputs-dtype": ("good.pt2", ["--inputs", "in_dtype.pt"], 2, "has dtype torch.int64"),
    "onnx-inputs-names": ("good.onnx", ["--inputs", "in_names.npz"], 2, "missing ['x'], unknown ['y']"),
    "onnx-inputs-rank": ("good.onnx", ["--inputs", "in_rank.npz"], 2, "Invalid rank for input: x"),
    "onnx-inputs-dtype": ("good.onnx", ["--inputs", "in_dtype.npz"], 2, "Unexpected input data type"),
    "set-unknown": ("good.pt2", ["--set", "bogus=1"], 2, "unknown option 'bogus'"),
    "set-malformed": ("good.pt2", ["--set", "k"], 2, "--set expects KEY=VALUE"),
    "set-bad-value": ("good.pt2", ["--set", "k=abc"], 2, "k='abc' is not an integer"),
    "output-parent-is-file": ("good.pt2", ["-o", "afile/out.pt2"], 2, "afile is a file, not a folder"),
    "onnx-output-parent-is-file": ("good.onnx", ["-o", "afile/out.onnx"], 2, "afile is a file, not a folder"),
    "output-is-input": ("good.pt2", ["-o", "good.pt2", "--overwrite"], 2, "would overwrite the input model"),
    "pickle-untrusted": ("pickled.pt", ["--inputs", "in_rank.pt"], 2, "pass --trust"),
}


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def run_cli(capsys, folder: Path, model: str, extra: list, variant: str = "sparse"):
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        code = main([model, "--variant", variant, *extra])
    finally:
        os.chdir(cwd)
    return code, *capsys.readouterr()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, corpus, capsys):
    model, extra, want_code, words = CASES[case]
    if case == "pickle-untrusted":
        torch.save(TinyAttention(), corpus / "pickled.pt")
    before = _digest(corpus)
    code, out, err = run_cli(capsys, corpus, model, extra)
    lines = err.strip().splitlines()
    assert code == want_code, err
    assert len(lines) == 1 and lines[0].startswith("attnrewrite:"), err
    assert words in lines[0], lines[0]
    assert "Traceback" not in err + out and "internal error" not in err
    after = _digest(corpus)
    assert after == before, "an input changed or an output appeared: " + str(set(after) ^ set(before))
    assert not [p for p in corpus.rglob(".*") if p.is_file()], "a temporary file was left behind"


def test_listing_a_model_without_attention_is_not_an_error(corpus, capsys):
    code = main([str(corpus / "noattn.pt2"), "--list", "--json"])
    out, _ = capsys.readouterr()
    assert code == 0 and '"sites": []' in out


def test_listing_needs_no_run(corpus, capsys):
    """A file whose inputs cannot be synthesised is still listed from its graph alone."""
    code = main([str(corpus / "huge_dim.onnx"), "--list", "--json"])
    out, _ = capsys.readouterr()
    assert code == 0 and '"onnx-decomposed"' in out


class _Planted:
    """Unpickling this creates the file named in it: what a hostile checkpoint would do."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_a_hostile_pickle_is_never_executed(tmp_path, capsys):
    target = tmp_path / "pwned"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_Planted(str(target))))
    torch.save({"args": (torch.randn(2, 6, 16),)}, tmp_path / "in.pt")
    before = (tmp_path / "evil.pt").read_bytes()
    for args in (["--list"], ["--variant", "exact"], ["--list", "--inputs", str(tmp_path / "in.pt")]):
        code = main([str(tmp_path / "evil.pt"), *args])
        err = capsys.readouterr().err
        assert code == 2 and "pass --trust" in err and len(err.strip().splitlines()) == 1
        assert not target.exists()
    assert (tmp_path / "evil.pt").read_bytes() == before
    # the same file with --trust is loaded (and runs its code): the user's explicit choice
    main([str(tmp_path / "evil.pt"), "--list", "--trust", "--inputs", str(tmp_path / "in.pt")])
    capsys.readouterr()
    assert target.exists()


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_no_space_left_writes_nothing(corpus, capsys, monkeypatch, tmp_path, fmt):
    """A write that fails half-way (ENOSPC) leaves no output, no temp file, no weights file."""
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if fmt == "pt2":
        monkeypatch.setattr(torch.export, "save", full)
    else:
        monkeypatch.setattr(Path, "write_bytes", full)
    out = tmp_path / f"out.{fmt}"
    code = main([str(corpus / f"good.{fmt}"), "--variant", "exact", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


LIBRARY = '''
import torch
from dataclasses import dataclass

@torch.library.custom_op("{ns}::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2

@twice.register_fake
def _(x):
    return torch.empty_like(x)

@dataclass
class Out:
    y: torch.Tensor

torch.utils._pytree.register_dataclass(Out, serialized_type_name="{ns}.Out")
'''

MAKE = '''
import sys, torch
sys.path[:0] = [{tests!r}, "."]
import {ns}
from _models import TinyAttention

class UsesOp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = TinyAttention()
    def forward(self, x):
        return torch.ops.{ns}.twice(self.a(x))

class ReturnsType(UsesOp):
    def forward(self, x):
        return {ns}.Out(self.a(x))

x = torch.randn(2, 5, 16)
torch.export.save(torch.export.export(UsesOp(), (x,)), "op.pt2")
torch.export.save(torch.export.export(ReturnsType(), (x,)), "tree.pt2")
'''


def test_missing_custom_op_or_pytree_type_is_named_and_import_fixes_it(tmp_path, capsys, monkeypatch):
    import subprocess
    import sys
    ns = f"extlib{os.getpid()}"                       # a library this test process has never imported
    (tmp_path / f"{ns}.py").write_text(LIBRARY.format(ns=ns))
    (tmp_path / "make.py").write_text(MAKE.format(ns=ns, tests=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    subprocess.run([sys.executable, "make.py"], cwd=tmp_path, check=True, capture_output=True)
    monkeypatch.chdir(tmp_path)
    for name, words in (("op.pt2", f"calls the custom op torch.ops.{ns}.twice"),
                        ("tree.pt2", f"returns a {ns}.Out")):
        assert main([name, "--list"]) == 2
        err = capsys.readouterr().err
        assert words in err and "--import MODULE" in err and len(err.strip().splitlines()) == 1
    assert main(["op.pt2", "--list", "--import", "no_such_library_here"]) == 2
    assert "--import no_such_library_here failed" in capsys.readouterr().err
    for name in ("op.pt2", "tree.pt2"):
        assert main([name, "--list", "--json", "--import", ns]) == 0
        assert '"status": "detected"' in capsys.readouterr().out
