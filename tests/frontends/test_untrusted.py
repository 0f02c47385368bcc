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


def _plant_legacy(folder: str):
    def edit(m, marker):                      # the pre-2.8 layout: one pickled file of all weights / constants
        m[f"data/{folder}/model.pt"] = _torch_saved({"qkv.weight": _Planted(marker)})
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
    "legacy-weights-file": (_plant_legacy("weights"), "data/weights/model.pt"),
    "legacy-constants-file": (_plant_legacy("constants"), "data/constants/model.pt"),
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


@pytest.mark.parametrize("plant", ["sample-inputs", "weight-use-pickle", "tensor-constant-use-pickle",
                                   "opaque-object", "legacy-weights-file", "legacy-constants-file"])
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


# ---------------------------------------------------------------- 2. a file the tool writes replaces another

@pytest.fixture()
def folder(good_pt2, tmp_path) -> Path:
    """good.pt2, good.onnx (weights in good.bin), an inputs file and an unrelated existing file."""
    import warnings
    (tmp_path / "good.pt2").write_bytes(good_pt2.read_bytes())
    torch.save({"args": (X,)}, tmp_path / "in.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyAttention().eval(), (X,), str(tmp_path / "plain.onnx"), input_names=["x"],
                          dynamo=False, opset_version=17)
    import onnx
    onnx.save(onnx.load(tmp_path / "plain.onnx"), tmp_path / "good.onnx", save_as_external_data=True,
              location="good.bin", size_threshold=0)
    (tmp_path / "plain.onnx").unlink()
    (tmp_path / "mine.txt").write_text("someone's notes")
    return tmp_path


def _digest(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


WRITES = {   # name: (argv after the model's folder is the cwd, exit code, words)
    "report-over-model": (["good.pt2", "--variant", "exact", "-o", "o.pt2", "--report", "good.pt2"], 2,
                          "good.pt2 would overwrite the input model"),
    "report-over-model-overwrite": (["good.pt2", "--variant", "exact", "-o", "o.pt2", "--report", "good.pt2",
                                     "--overwrite"], 2, "would overwrite the input model"),
    "plot-over-model": (["good.pt2", "--list", "--plot", "good.pt2", "--overwrite"], 2,
                        "would overwrite the input model"),
    "report-over-inputs": (["good.pt2", "--variant", "exact", "-o", "o.pt2", "--inputs", "in.pt",
                            "--report", "in.pt", "--overwrite"], 2, "in.pt would overwrite"),
    "list-report-over-model": (["good.pt2", "--list", "--report", "good.pt2"], 2, "would overwrite the input"),
    "output-over-onnx-weights": (["good.onnx", "--variant", "exact", "-o", "good.bin", "--overwrite"], 2,
                                 "good.bin would overwrite"),
    "output-over-onnx-model": (["good.onnx", "--variant", "exact", "-o", "good.onnx", "--overwrite"], 2,
                               "good.onnx would overwrite"),
    "report-over-onnx-weights": (["good.onnx", "--list", "--report", "good.bin", "--overwrite"], 2,
                                 "good.bin would overwrite"),
    "report-exists": (["good.pt2", "--list", "--report", "mine.txt"], 2, "mine.txt exists (pass --overwrite"),
    "plot-exists": (["good.pt2", "--list", "--plot", "mine.txt"], 2, "mine.txt exists"),
    "output-exists": (["good.pt2", "--variant", "exact", "-o", "mine.txt"], 2, "mine.txt exists"),
    "output-and-report-same": (["good.pt2", "--variant", "exact", "-o", "x.pt2", "--report", "x.pt2"], 2,
                               "are the same file"),
    "report-and-plot-same": (["good.pt2", "--list", "--report", "x.json", "--plot", "./x.json"], 2,
                             "are the same file"),
    "output-is-folder": (["good.pt2", "--variant", "exact", "-o", ".", "--overwrite"], 2, "it is a folder"),
    "kernels-dir-is-file": (["good.pt2", "--variant", "exact", "-o", "o.pt2", "--emit-kernels", "mine.txt"], 2,
                            "it is a file, not a folder"),
    "output-name-too-long": (["good.pt2", "--variant", "exact", "-o", "x" * 300 + ".pt2"], 2,
                             "longer than the file system allows"),
    "report-name-too-long": (["good.pt2", "--list", "--report", "r" * 300 + ".json"], 2,
                             "longer than the file system allows"),
}


@pytest.mark.parametrize("case", list(WRITES))
def test_no_write_replaces_an_input_or_an_existing_file(case, folder, capsys, monkeypatch):
    argv, want, words = WRITES[case]
    monkeypatch.chdir(folder)
    before = _digest(folder)
    code, out, err = _cli(capsys, *argv)
    line = _one_line(err)
    assert code == want and words in line, line
    assert _digest(folder) == before and not _no_temp_files(folder)


def test_an_existing_onnx_data_file_is_not_replaced(folder, capsys, monkeypatch):
    monkeypatch.chdir(folder)
    (folder / "out.onnx.data").write_bytes(b"another model's weights")
    code, out, err = _cli(capsys, "good.onnx", "--variant", "exact", "-o", "out.onnx")
    line = _one_line(err)
    assert code == 2 and "out.onnx.data exists" in line
    assert (folder / "out.onnx.data").read_bytes() == b"another model's weights"
    assert not (folder / "out.onnx").exists() and not _no_temp_files(folder)


def test_a_file_made_during_the_run_is_not_replaced(folder, capsys, monkeypatch):
    """Two runs writing the same -o: the later one finds the file at the moment of its write
    (a hard link, which fails on an existing name), not only at start."""
    import attnrewrite.frontends.export as E
    monkeypatch.chdir(folder)
    real = E.save_program

    def other_run_finishes_first(program, path):
        Path("o.pt2").write_bytes(b"the other run's output")
        real(program, path)
    monkeypatch.setattr(E, "save_program", other_run_finishes_first)
    code, out, err = _cli(capsys, "good.pt2", "--variant", "exact", "-o", "o.pt2")
    line = _one_line(err)
    assert code == 2 and "o.pt2 exists" in line
    assert (folder / "o.pt2").read_bytes() == b"the other run's output" and not _no_temp_files(folder)


def test_the_same_race_for_the_report_and_with_overwrite(folder, capsys, monkeypatch):
    from attnrewrite.io import atomic_write, write_rules
    target = folder / "r.json"

    def racing(tmp):
        target.write_text("theirs")
        Path(tmp).write_text("ours")
    with write_rules(overwrite=False):
        with pytest.raises(Exception, match="r.json exists"):
            atomic_write(target, racing)
    assert target.read_text() == "theirs" and not _no_temp_files(folder)
    with write_rules(overwrite=True):
        atomic_write(target, racing)
    assert target.read_text() == "ours" and not _no_temp_files(folder)


def test_a_symlink_to_the_input_is_not_a_way_around(folder, capsys, monkeypatch):
    monkeypatch.chdir(folder)
    os.symlink("good.pt2", folder / "link.pt2")
    before = _digest(folder)
    code, out, err = _cli(capsys, "good.pt2", "--variant", "exact", "-o", "link.pt2", "--overwrite")
    assert code == 2 and "would overwrite the input model" in _one_line(err)
    assert _digest(folder) == before


def test_emitted_kernels_do_not_replace_existing_files(folder, capsys, monkeypatch):
    monkeypatch.chdir(folder)
    (folder / "k").mkdir()
    (folder / "k" / "index.json").write_text("mine")
    code, out, err = _cli(capsys, "good.pt2", "--variant", "exact", "-o", "o.pt2", "--emit-kernels", "k")
    line = _one_line(err)
    assert code == 2 and "index.json exists" in line
    assert (folder / "k" / "index.json").read_text() == "mine"
    assert sorted(p.name for p in (folder / "k").iterdir()) == ["index.json"]
    code, out, err = _cli(capsys, "good.pt2", "--variant", "exact", "-o", "o2.pt2", "--emit-kernels", "k",
                          "--overwrite")
    assert code == 0, err
    assert json.loads((folder / "k" / "index.json").read_text()) != "mine"


# ---------------------------------------------------------------- 3. interruptions and full disks

class BigAttention(torch.nn.Module):
    """One attention with 0.8 MB of weights: enough to outgrow a small file size limit."""

    def __init__(self, dim: int = 256, heads: int = 4):
        super().__init__()
        self.qkv, self.heads = torch.nn.Linear(dim, 3 * dim), heads

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return (a @ v).transpose(1, 2).reshape(b, n, d)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    import warnings
    d = tmp_path_factory.mktemp("big")
    m, x = BigAttention().eval(), torch.randn(1, 8, 256)
    torch.export.save(torch.export.export(m, (x,)), d / "big.pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), str(d / "big.onnx"), input_names=["x"], dynamo=False, opset_version=17)
    return d


def _run_limited(args, cwd, limit_bytes: int) -> subprocess.CompletedProcess:
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.run([sys.executable, "-m", "attnrewrite", *args], cwd=cwd, capture_output=True, text=True,
                          preexec_fn=limit, timeout=600, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_a_full_disk_exits_2_with_one_line_and_leaves_nothing(fmt, big, tmp_path):
    """ulimit -f: the write fails with EFBIG (SIGXFSZ is ignored), torch's archive writer never aborts."""
    (tmp_path / f"big.{fmt}").write_bytes((big / f"big.{fmt}").read_bytes())
    r = _run_limited([f"big.{fmt}", "--variant", "exact", "-o", f"out.{fmt}", "--no-check"], tmp_path, 300_000)
    assert r.returncode == 2, r.stderr[-2000:]
    line = _one_line(r.stderr)
    assert f"cannot write out.{fmt}" in line and "File too large" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"big.{fmt}"]


SLOW_SAVE = '''
import os, sys, time, torch
import attnrewrite.frontends.export as E

def slow(program, f, **kw):
    f.write(b"x" * 2_000_000)                       # half an archive on disk ...
    open("writing", "w").close()
    time.sleep(120)                                 # ... when SIGTERM comes
torch.export.save = slow
from attnrewrite.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_sigterm_during_the_write_leaves_nothing(good_pt2, tmp_path):
    (tmp_path / "good.pt2").write_bytes(good_pt2.read_bytes())
    (tmp_path / "slow.py").write_text(SLOW_SAVE)
    p = subprocess.Popen([sys.executable, "slow.py", "good.pt2", "--variant", "exact", "-o", "out.pt2"],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "writing").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)
    assert (tmp_path / "writing").exists(), p.communicate()[1]
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".out.pt2.")]     # the temp file is there
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and _one_line(err) == "attnrewrite: terminated", err
    assert sorted(q.name for q in tmp_path.iterdir()) == ["good.pt2", "slow.py", "writing"]


def test_an_interruption_inside_torchs_writer_is_kept_until_it_finishes(good_pt2, tmp_path, capsys, monkeypatch):
    """SIGTERM arriving while torch's C++ writer calls back into Python: the writer finishes
    into the sink, then the interruption is raised and the temporary file removed."""
    real = torch.export.save

    def interrupted(program, f, **kw):
        f.write(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGTERM)        # the handler raises inside the next Python call
        real(program, f, **kw)
    monkeypatch.setattr(torch.export, "save", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    code, out, err = _cli(capsys, good_pt2, "--variant", "exact", "-o", tmp_path / "out.pt2")
    assert code == 143 and _one_line(err) == "attnrewrite: terminated" and list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before          # main() restores the handlers it set


# ---------------------------------------------------------------- 4. user faults that were exit 3

class Embedded(torch.nn.Module):
    """Token ids → a 10-row embedding → attention: ids must lie in 0…9."""

    def __init__(self):
        super().__init__()
        self.emb, self.attn = torch.nn.Embedding(10, 16), TinyAttention()

    def forward(self, ids):
        return self.attn(self.emb(ids))


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> Path:
    import warnings

    import onnx
    d = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (2, 6))
    torch.export.save(torch.export.export(Embedded().eval(), (ids,)), d / "emb.pt2")
    torch.export.save(torch.export.export(TinyAttention().eval(), (X,)), d / "good.pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Embedded().eval(), (ids,), str(d / "emb.onnx"), input_names=["ids"], dynamo=False,
                          opset_version=17)
        torch.onnx.export(TinyAttention().eval(), (X,), str(d / "plain.onnx"), input_names=["x"], dynamo=False,
                          opset_version=17)
    onnx.save(onnx.load(d / "plain.onnx"), d / "ext.onnx", save_as_external_data=True, location="ext.bin",
              size_threshold=0)
    m = onnx.load(d / "ext.onnx", load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "offset":
                e.value = "-64"
    onnx.save(m, d / "neg_offset.onnx")
    torch.save({"args": (torch.full((2, 6), 50),)}, d / "ids_high.pt")
    torch.save({"args": (torch.full((2, 6), -1),)}, d / "ids_negative.pt")
    torch.save([{"args": (ids,)}, {"args": (torch.full((2, 6), 10),)}], d / "ids_second_set.pt")
    np.savez(d / "ids_high.npz", ids=np.full((2, 6), 50, np.int64))
    torch.save({"args": 5}, d / "args_int.pt")
    torch.save({"args": (X,), "kwargz": {}}, d / "extra_key.pt")
    torch.save({"args": (X,), "kwargs": [1, 2]}, d / "kwargs_list.pt")
    torch.save(5, d / "five.pt")
    (d / "badsyntax.py").write_text("def make(:\n    pass\n")
    (d / "raising.py").write_text("def make():\n    raise RuntimeError('the factory broke')\n")
    (d / "garbage.py").write_text("def make():\n    return 42\n")
    return d


FAULTS = {   # name: (argv, environment, words)
    "onnx-negative-offset": (["neg_offset.onnx", "--list"], {}, "negative offset"),
    "factory-colon-in-path": (["no/such:dir/model.pt2", "--list"], {}, "model not found: no/such:dir/model.pt2"),
    "factory-relative-module": (["./x:make", "--list"], {}, "not a pkg.module:factory"),
    "factory-syntax-error": (["badsyntax:make", "--list"], {}, "cannot import badsyntax:make: SyntaxError"),
    "factory-missing-function": (["raising:nothing", "--list"], {}, "cannot import raising:nothing"),
    "factory-raises": (["raising:make", "--list"], {}, "raising:make raised RuntimeError: the factory broke"),
    "factory-returns-garbage": (["garbage:make", "--list"], {}, "must return (module, example_args"),
    "kernels-interpret-without-triton": (["good.pt2", "--list"], {"ATTNREWRITE_KERNELS": "interpret",
                                                                  "TRITON_INTERPRET": "0"},
                                         "needs TRITON_INTERPRET=1"),
    "kernels-unknown-value": (["good.pt2", "--list"], {"ATTNREWRITE_KERNELS": "fast"}, "ATTNREWRITE_KERNELS=fast"),
    "inputs-ids-above": (["emb.pt2", "--variant", "exact", "--inputs", "ids_high.pt"], {},
                         "ids holds ids 50…50, outside the embedding's 0…9"),
    "inputs-ids-negative": (["emb.pt2", "--variant", "exact", "--inputs", "ids_negative.pt"], {},
                            "holds ids -1…-1"),
    "inputs-ids-second-set": (["emb.pt2", "--variant", "exact", "--inputs", "ids_second_set.pt"], {},
                              "input set 1: ids holds ids 10…10"),
    "list-inputs-ids": (["emb.pt2", "--list", "--inputs", "ids_high.pt"], {}, "outside the embedding"),
    "onnx-inputs-ids": (["emb.onnx", "--variant", "exact", "--inputs", "ids_high.npz"], {},
                        "ids holds ids 50…50, outside the embedding's 0…9"),
    "inputs-args-int": (["good.pt2", "--variant", "exact", "--inputs", "args_int.pt"], {},
                        "'args' must be a tuple or list"),
    "inputs-extra-key": (["good.pt2", "--variant", "exact", "--inputs", "extra_key.pt"], {}, "['kwargz']"),
    "inputs-kwargs-list": (["good.pt2", "--variant", "exact", "--inputs", "kwargs_list.pt"], {},
                           "kwargs of type list"),
    "inputs-scalar": (["good.pt2", "--variant", "exact", "--inputs", "five.pt"], {}, "inputs must be"),
    "set-inf": (["good.pt2", "--variant", "sparse", "--set", "k=inf"], {}, "k=inf is not a finite number"),
    "set-nan": (["good.pt2", "--variant", "conv-basis", "--set", "eps=nan"], {}, "eps=nan is not a finite number"),
    "set-beyond-int64": (["good.pt2", "--variant", "sparse", "--set", "mode=window", "--set", "window=1e99"], {},
                         "window=1e+99 does not fit a 64-bit integer"),
    "set-int-beyond-int64": (["good.pt2", "--variant", "sparse", "--set", "k=" + "9" * 30], {},
                             "does not fit a 64-bit integer"),
    "tolerance-nan": (["good.pt2", "--variant", "exact", "--tolerance", "nan"], {}, "--tolerance nan must be"),
    "tolerance-inf": (["good.pt2", "--variant", "exact", "--tolerance", "inf"], {}, "--tolerance inf must be"),
    "tolerance-negative": (["good.pt2", "--variant", "exact", "--tolerance", "-1"], {}, "--tolerance -1.0 must be"),
    "variant-unknown": (["good.pt2", "--variant", "fastest"], {}, "invalid choice: 'fastest'"),
}


@pytest.mark.parametrize("case", list(FAULTS))
def test_a_user_fault_is_exit_2_with_one_line(case, faults, capsys, monkeypatch):
    argv, env, words = FAULTS[case]
    monkeypatch.chdir(faults)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = _digest(faults)
    code, out, err = _cli(capsys, *argv)
    line = _one_line(err)
    assert code == 2 and words in line, line
    assert _digest(faults) == before and not _no_temp_files(faults)


def test_ids_inside_the_embedding_still_run(faults, capsys, monkeypatch):
    monkeypatch.chdir(faults)
    torch.save({"args": (torch.tensor([[0, 9, 3, 4, 5, 6]] * 2),)}, faults / "ids_ok.pt")
    try:
        code, out, err = _cli(capsys, "emb.pt2", "--variant", "exact", "--inputs", "ids_ok.pt", "--json",
                              "--no-check")
    finally:
        (faults / "ids_ok.pt").unlink()
    assert code == 0 and json.loads(out)["sites"][0]["status"] == "rewritten", err


# ---------------------------------------------------------------- 5. the check does not trust NaN

def _pairs(*sets):
    return [("y", torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)) for a, b in sets]


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("sets,passed", [
    ([([1, 2], [1, 2]), ([1, 2], [1, NAN])], False),               # NaN in the second set (once skipped by max)
    ([([1, 2], [1, NAN]), ([1, 2], [1, 2])], False),               # ... and in the first
    ([([1, 2], [1, INF])], False),
    ([([1, INF], [1, -INF])], False),                              # an infinity of the other sign
    ([([1, NAN], [1, 2])], False),                                 # the original's NaN, the rewrite finite
    ([([1, NAN, INF], [1, NAN, INF]), ([3, 4], [3, 4])], True),    # the same non-finite values, same places
    ([([1, NAN], [NAN, 1])], False),                               # ... but in other places
])
def test_non_finite_outputs_fail_the_check_unless_the_original_has_them(sets, passed):
    from attnrewrite.check import end_to_end
    r = end_to_end(_pairs(*sets), 1e-4)
    assert r["passed"] is passed, r
    if not passed:
        assert r["rel_err"] == INF and r["outputs"][0]["cosine"] == 0.0
    else:
        assert r["rel_err"] == 0.0 and r["outputs"][0]["cosine"] > 0.999


def test_a_rewrite_producing_nan_on_the_second_input_set_fails_and_writes_nothing(good_pt2, tmp_path, capsys,
                                                                                  monkeypatch):
    from attnrewrite.frontends.export import ExportFrontEnd
    torch.save([{"args": (X,)}, {"args": (X + 1,)}], tmp_path / "two.pt")
    real, calls = ExportFrontEnd.outputs, []

    def nan_on_second(self, program, input_set):
        outs = real(self, program, input_set)
        if program is not None:
            calls.append(1)
            if len(calls) == 2:
                outs = [(n, t.clone().index_fill_(0, torch.tensor([1]), NAN)) for n, t in outs]
        return outs
    monkeypatch.setattr(ExportFrontEnd, "outputs", nan_on_second)
    code, out, err = _cli(capsys, good_pt2, "--variant", "exact", "--inputs", tmp_path / "two.pt",
                          "-o", tmp_path / "o.pt2", "--json")
    check = json.loads(out)["check"]
    assert code == 1 and check["passed"] is False and float(check["rel_err"]) == INF
    assert check["outputs"][0]["nonfinite"] > 0 and not (tmp_path / "o.pt2").exists()


# ---------------------------------------------------------------- 6. attention inside ONNX control flow

@pytest.fixture(scope="module")
def control_flow(tmp_path_factory) -> Path:
    """TinyAttention's graph as the then-branch of an If on a boolean input (else: x itself)."""
    import warnings

    import onnx
    from onnx import TensorProto, helper
    d = tmp_path_factory.mktemp("cf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyAttention().eval(), (X,), str(d / "plain.onnx"), input_names=["x"],
                          output_names=["y"], dynamo=False, opset_version=17)
    inner = onnx.load(d / "plain.onnx")
    then = helper.make_graph(list(inner.graph.node), "then", [], [helper.make_tensor_value_info("y", 1, [2, 6, 16])],
                             initializer=list(inner.graph.initializer))
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y_else"])], "else", [],
                              [helper.make_tensor_value_info("y_else", 1, [2, 6, 16])])
    graph = helper.make_graph([helper.make_node("If", ["cond"], ["out"], name="branch", then_branch=then,
                                                else_branch=other)], "cf",
                              [inner.graph.input[0], helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", 1, [2, 6, 16])])
    model = helper.make_model(graph, opset_imports=inner.opset_import)
    onnx.checker.check_model(model)
    onnx.save(model, d / "if.onnx")
    return d


def test_attention_in_an_if_body_is_named_as_not_searched(control_flow, capsys):
    code, out, err = _cli(capsys, control_flow / "if.onnx", "--list", "--verbose")
    assert code == 0, err
    assert "not attention: branch: If body (else_branch, then_branch) holds Softmax" in out
    assert "not searched" in out
    code, out, err = _cli(capsys, control_flow / "if.onnx", "--variant", "exact", "-o", control_flow / "o.onnx")
    line = _one_line(err)
    assert code == 2 and "no attention found" in line and "1 control-flow subgraph(s)" in line and "branch" in line
    assert not (control_flow / "o.onnx").exists()


def test_a_loop_body_is_named_too():
    from onnx import helper

    from attnrewrite.frontends.onnx import unsearched_subgraphs
    body = helper.make_graph([helper.make_node("Softmax", ["s"], ["p"])], "body", [], [])
    loop = helper.make_node("Loop", ["n", "c"], ["o"], name="steps", body=body)
    plain = helper.make_node("Relu", ["x"], ["r"])
    model = helper.make_model(helper.make_graph([loop, plain], "g", [], []))
    assert unsearched_subgraphs(model) == [
        ("steps", "Loop body (body) holds Softmax: attention inside control flow is not searched or rewritten")]


# ---------------------------------------------------------------- 7. start-up cost

PROBE = '''
import sys, time
t = time.perf_counter()
from attnrewrite.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
heavy = [m for m in ("torch", "onnx", "onnxruntime", "matplotlib", "triton", "transformers") if m in sys.modules]
print(repr((heavy, time.perf_counter() - t)))
'''


def test_help_imports_nothing_heavy(tmp_path):
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    heavy, seconds = eval(r.stdout.strip().splitlines()[-1])
    assert heavy == [] and seconds < 1.0, (heavy, seconds)
    assert "--variant VARIANT" in r.stdout and "conv-basis, exact, preconditioned, sparse" in r.stdout


def test_the_variant_names_in_help_are_the_variants():
    from attnrewrite.cli import VARIANT_NAMES
    from attnrewrite.variants import VARIANTS
    assert VARIANT_NAMES == tuple(sorted(v.replace("_", "-") for v in VARIANTS))


LIST_PROBE = '''
import sys
from attnrewrite.cli import main
code = main([sys.argv[1], "--list", "--json"])
print(repr((code, [m for m in sys.argv[2:] if m in sys.modules])))
'''


def _list_imports(model, tmp_path, modules):
    r = subprocess.run([sys.executable, "-c", LIST_PROBE, str(model), *modules], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp_path)})
    return eval(r.stdout.strip().splitlines()[-1]), r.stderr


def test_listing_a_pt2_imports_no_matplotlib_or_inductor(good_pt2, tmp_path):
    got, err = _list_imports(good_pt2, tmp_path, ["matplotlib", "torch._inductor.compile_fx"])
    assert got == (0, []), err[-2000:]


def test_listing_a_pt2_imports_no_onnxruntime(good_pt2, tmp_path):
    """onnxruntime writes $TMPDIR/.ses on import: a .pt2 run should not import it."""
    got, err = _list_imports(good_pt2, tmp_path, ["onnxruntime"])
    assert got == (0, []) and not (tmp_path / ".ses").exists(), err[-2000:]


def test_import_attnrewrite_without_torch_is_lazy_and_names_still_work():
    code = ("import sys, attnrewrite; lazy = 'torch' not in sys.modules; "
            "f = attnrewrite.detect; print(repr((lazy, callable(f), hasattr(__import__('torch').ops.attnrewrite, "
            "'exact_attention'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert eval(r.stdout.strip().splitlines()[-1]) == (True, True, True), r.stderr[-2000:]
