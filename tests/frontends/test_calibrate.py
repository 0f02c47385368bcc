"""Calibration: the fit itself, disjoint calibration/evaluation inputs, and every front end."""
from __future__ import annotations

import warnings

import pytest
import torch

import attnrewrite
from attnrewrite.calibrate import fit_out_map
from attnrewrite.io import InputError
from _models import TinyAttention


class Planted:
    """A stand-in variant whose output is fixed: the fit sees exactly Ô."""

    def __init__(self, out):
        self.out = out

    def reference(self, q, *args):
        return self.out[q]


SCALARS = {"scale": 1.0, "softcap": 0.0, "causal": False}


def test_a_planted_linear_error_is_recovered_exactly():
    torch.manual_seed(0)
    approx = [torch.randn(2, 3, 40, 8, dtype=torch.float64) for _ in range(3)]
    x_true = torch.eye(8, dtype=torch.float64) + 0.3 * torch.randn(3, 8, 8, dtype=torch.float64)
    runs = [{"q": i, "k": None, "v": None, "mask": None, "out": torch.einsum("bhqd,hde->bhqe", a, x_true)}
            for i, a in enumerate(approx)]
    out_map, stats = fit_out_map(Planted(approx), SCALARS, (), runs)
    assert stats["lambda"] == 0.0 and stats["rel_err_after"] < 1e-9 < stats["rel_err_before"]
    assert torch.allclose(torch.tensor(out_map, dtype=torch.float64).view(3, 8, 8), x_true, atol=1e-8)


def test_no_map_when_there_is_nothing_to_repair_or_too_little_data():
    torch.manual_seed(0)
    approx = [torch.randn(1, 2, 64, 8, dtype=torch.float64) for _ in range(2)]
    runs = [{"q": i, "k": None, "v": None, "mask": None, "out": approx[i].clone()} for i in range(2)]
    out_map, stats = fit_out_map(Planted(approx), SCALARS, (), runs)      # already exact
    assert out_map is None and "no map improves" in stats["skipped"]
    out_map, stats = fit_out_map(Planted([a[:, :, :4] for a in approx]), SCALARS, (),
                                 [{**r, "out": r["out"][:, :, :4]} for r in runs])
    assert out_map is None and "calibration tokens" in stats["skipped"]


def _sets(n_sets, n=48):
    g = torch.Generator().manual_seed(7)
    return [{"args": (torch.randn(2, n, 16, generator=g),)} for _ in range(n_sets)]


def program():
    torch.manual_seed(0)
    return torch.export.export(TinyAttention().eval(), (torch.randn(2, 48, 16),))


def test_given_inputs_are_split_and_the_report_says_which_were_which():
    ep = program()
    r = attnrewrite.rewrite(ep, "sparse", example_inputs=_sets(4), calibrate=3, mode="topk", k=4)
    assert r.report["calibration"] == {"sets": 3, "inputs": "given input sets 1-3 (evaluation: the other 1)"}
    diag = r.sites[0].check["diagnostics"]["calibration"]
    assert diag["tokens"] == 3 * 2 * 48
    assert "out_map" not in r.sites[0].options                      # not echoed into the report
    with pytest.raises(InputError, match="needs at least 4"):
        attnrewrite.rewrite(ep, "sparse", example_inputs=_sets(3), calibrate=3, mode="topk", k=4)


def test_calibration_is_in_the_program_and_helps_on_held_out_inputs():
    ep = program()
    sets = _sets(5)
    base = attnrewrite.rewrite(ep, "sparse", example_inputs=sets[4:], mode="topk", k=3)
    cal = attnrewrite.rewrite(ep, "sparse", example_inputs=sets, calibrate=4, mode="topk", k=3)
    diag = cal.sites[0].check["diagnostics"]["calibration"]
    assert diag["held_out_rel_err_with"] < diag["held_out_rel_err_without"]
    assert cal.report["check"]["rel_err"] < base.report["check"]["rel_err"]       # same evaluation set
    calls = [n for n in cal.program.graph.nodes if n.op == "call_function" and "attnrewrite" in str(n.target)]
    assert len(calls[0].kwargs["out_map"]) == 2 * 8 * 8
    # the saved program computes what the check measured
    x = sets[4]["args"][0]
    got = cal.program.module()(x)
    want = ep.module()(x)
    err = ((got - want).norm() / want.norm()).item()
    assert abs(err - cal.report["check"]["rel_err"]) < 1e-6


def test_onnx_front_end_calibrates_with_synthesised_inputs(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyAttention().eval(), (torch.randn(2, 48, 16),), str(path), input_names=["x"],
                          dynamo=False, opset_version=17)
    r = attnrewrite.rewrite(str(path), "sparse", calibrate=3, mode="topk", k=3)
    assert r.report["calibration"]["inputs"].startswith("synthesised with seeds 1-3")
    s = r.sites[0]
    assert s.status == "rewritten" and "rel_err_after" in s.check["diagnostics"]["calibration"]
    # the lowering's map matches the reference's: the per-site check compares ORT's output with the reference
    assert any(n.op_type == "MatMul" and any(i.startswith("attnrewrite") or "const" in i for i in n.input)
               for n in r.program.graph.node)
    assert r.report["check"]["rel_err"] < 10


class TinyAttentionProjected(TinyAttention):
    """TinyAttention followed by an output projection, as every transformer block has."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(super().forward(x))


def test_the_map_is_folded_into_the_output_projection(monkeypatch):
    torch.manual_seed(0)
    m = TinyAttentionProjected().eval()
    sets = _sets(5)
    ep = torch.export.export(m, sets[0]["args"])
    folded = attnrewrite.rewrite(ep, "sparse", example_inputs=sets, calibrate=4, mode="topk", k=3)
    diag = folded.sites[0].check["diagnostics"]["calibration"]
    assert diag["folded_into"] == "p_proj_weight"
    calls = [n for n in folded.program.graph.nodes if n.op == "call_function" and "attnrewrite" in str(n.target)]
    assert "out_map" not in calls[0].kwargs                            # nothing left to run per head
    assert not torch.equal(folded.program.state_dict["proj.weight"], ep.state_dict["proj.weight"])
    assert torch.equal(ep.state_dict["proj.weight"], m.proj.weight)  # the original program is untouched
    monkeypatch.setattr("attnrewrite.frontends.export.fold_out_maps", lambda gm, weights: {})
    unfolded = attnrewrite.rewrite(ep, "sparse", example_inputs=sets, calibrate=4, mode="topk", k=3)
    calls = [n for n in unfolded.program.graph.nodes if n.op == "call_function" and "attnrewrite" in str(n.target)]
    assert len(calls[0].kwargs["out_map"]) == 2 * 8 * 8
    x = sets[4]["args"][0]
    torch.testing.assert_close(folded.program.module()(x), unfolded.program.module()(x), rtol=1e-5, atol=1e-6)
    assert folded.report["check"]["rel_err"] == pytest.approx(unfolded.report["check"]["rel_err"], rel=1e-4)


@pytest.mark.parametrize("fold", [True, False])
def test_onnx_map_is_folded_into_the_output_projection(tmp_path, monkeypatch, fold):
    torch.manual_seed(0)
    path = tmp_path / "proj.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyAttentionProjected().eval(), (torch.randn(2, 48, 16),), str(path), input_names=["x"],
                          dynamo=False, opset_version=17)
    if not fold:
        monkeypatch.setattr("attnrewrite.passes.onnx_fold.fold_out_maps", lambda model, maps, base_dir=None: {})
    r = attnrewrite.rewrite(str(path), "sparse", calibrate=3, mode="topk", k=3)
    maps = {t.name for t in r.program.graph.initializer if list(t.dims) == [1, 2, 8, 8]}   # (1, H, Dv, Dv)
    per_head = [n for n in r.program.graph.node if n.op_type == "MatMul" and n.input[1] in maps]
    cal = r.sites[0].check["diagnostics"]["calibration"]
    if fold:
        assert cal["folded_into"] and not per_head
    else:
        assert "folded_into" not in cal and per_head
    test_onnx_map_is_folded_into_the_output_projection.rel_err[fold] = r.report["check"]["rel_err"]
    if len(test_onnx_map_is_folded_into_the_output_projection.rel_err) == 2:    # folded computes what unfolded does
        a, b = test_onnx_map_is_folded_into_the_output_projection.rel_err.values()
        assert a == pytest.approx(b, rel=1e-4)


test_onnx_map_is_folded_into_the_output_projection.rel_err = {}


def test_compile_backend_calibrates_on_inputs_drawn_like_the_example():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m, x = TinyAttentionProjected().eval(), torch.randn(2, 48, 16)
    reports = {}
    for n in (0, 3):
        backend = attnrewrite.compile_backend("sparse", inner="eager", check=True, calibrate=n, mode="topk", k=3)
        with torch.no_grad():
            torch.compile(m, backend=backend)(x)
        reports[n] = backend.reports[0]
        torch._dynamo.reset()
    assert "calibration" not in reports[0]
    assert reports[3]["calibration"]["inputs"].startswith("synthesised with seeds 1-3")
    site = reports[3]["sites"][0]
    assert site["check"]["diagnostics"]["calibration"]["tokens"] == 3 * 2 * 48
    assert reports[3]["check"]["rel_err"] < reports[0]["check"]["rel_err"]     # evaluated on the example itself
