"""A variant defined outside the package, registered through the `attnrewrite.variants`
entry-point group, runs through the CLI, ONNX and the compile backend like a built-in one.

The variant, `temperature`, is exact attention with its scores multiplied by `t`: at t = 1
it is exact (the check holds to 1e-5), at t = 2 it is not (the check sees it). The entry
point lives in a dist-info folder put on sys.path for the test, as an installed package's
would be.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import warnings

import pytest
import torch
from _models import TinyAttention

import attnrewrite
from attnrewrite import variants
from attnrewrite.backend import compile_backend
from attnrewrite.cli import main
from attnrewrite.passes import onnx_rewrite
from attnrewrite.variants import exact
from attnrewrite.variants.base import OpArg, Param, Variant, define_attention_op, op_args_from

BOUND = 1e-5


def reference(q, k, v, mask, scale, softcap, causal, dropout_p, t):
    return exact.reference(q, k, v, mask, scale * t, softcap, causal, dropout_p)


def diagnostics(q, k, v, mask, scale, softcap, causal, options):
    return {"t": float(options["t"])}


def onnx_lower(b, site, q, k, v, mask, options):
    scaled = dataclasses.replace(site, scale=onnx_rewrite.resolve_scale(b, site) * float(options["t"]))
    return exact.onnx_lower(b, scaled, q, k, v, mask, {"onnx_attention": "auto"})


PARAMS = {"t": Param(1.0, float, "multiplies the scores", minimum=0.0)}
OP_ARGS = (OpArg("t", "float"),)            # the op's schema and arguments, from one declaration
VARIANT = Variant("temperature", "test_temperature_attention", PARAMS, reference,
                  define_attention_op("test_temperature_attention", reference, OP_ARGS),
                  op_args_from(OP_ARGS, PARAMS), diagnostics, onnx_lower=onnx_lower)


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The test module registered as a package's entry point would be."""
    dist = tmp_path / "attnrewrite_temperature-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: attnrewrite-temperature\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[attnrewrite.variants]\ntemperature = {__name__}:VARIANT\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    variants.registry(reload=True)
    yield
    monkeypatch.undo()
    variants.registry(reload=True)


def model_and_input():
    torch.manual_seed(0)
    return TinyAttention().eval(), torch.randn(2, 6, 16)


def test_registered_by_entry_point_and_resolved_by_name(installed):
    assert variants.resolve("temperature") is VARIANT
    assert "temperature" in variants.names() and "conv-basis" in variants.names()
    with pytest.raises(ValueError, match="unknown variant 'nope'.*temperature"):
        variants.resolve("nope")


def test_cli(installed, tmp_path, capsys):
    m, x = model_and_input()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(m, (x,)), str(path))
    rep = tmp_path / "r.json"
    assert main([str(path), "--variant", "temperature", "--set", "t=1", "-o", str(tmp_path / "o.pt2"),
                 "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    assert report["variant"] == "temperature"
    assert [s["status"] for s in report["sites"]] == ["rewritten"] and report["check"]["rel_err"] <= BOUND
    assert main([str(path), "--variant", "temperature", "--set", "t=2", "-o", str(tmp_path / "o2.pt2"),
                 "--report", str(rep), "--overwrite"]) == 0
    assert json.loads(rep.read_text())["check"]["rel_err"] > 1e-2      # t = 2 is not the model
    assert main([str(path), "--variant", "temperature", "--set", "t=-1"]) == 2        # its own validation
    assert "t=-1.0 is below the minimum 0.0" in capsys.readouterr().err


def test_onnx(installed, tmp_path):
    m, x = model_and_input()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), str(path), input_names=["x"], dynamo=False, opset_version=17)
    r = attnrewrite.rewrite(str(path), "temperature", example_inputs={"x": x.numpy()}, t=1.0)
    assert [s.status for s in r.sites] == ["rewritten"] and r.report["check"]["rel_err"] <= BOUND
    assert any(n.name.startswith("attnrewrite/") for n in r.program.graph.node)


def test_compile_backend(installed):
    m, x = model_and_input()
    torch._dynamo.reset()
    backend = compile_backend("temperature", t=1.0)
    with torch.no_grad():
        want, got = m(x), torch.compile(m, backend=backend)(x)
    assert backend.sites_rewritten == 1 and backend.reports[0]["variant"] == "temperature"
    assert (got - want).norm() <= BOUND * want.norm()


@pytest.mark.parametrize("variant", variants.BUILT_IN + (VARIANT,), ids=lambda v: v.name)
def test_op_schema_and_arguments_come_from_one_declaration(variant):
    """Each op's schema after the normal form lists its OpArgs in order, and op_args emits one value
    per argument, of the declared type (the schema and the tuple cannot drift apart)."""
    module = sys.modules[variant.reference.__module__]
    declared = getattr(module, "OP_ARGS", None)
    if declared is None:                            # a package's reference sits in a submodule
        declared = sys.modules[module.__name__.rsplit(".", 1)[0]].OP_ARGS
    schema = variant.op._schema.arguments
    names = [a.name for a in schema[8:-2]]          # after (q, …, dropout_p), before (dropout_seed, out_map)
    assert names == [a.name for a in declared]
    options = {"gain": 1.0} if variant.name == "preconditioned" else {}
    values = variant.op_args(None, options)
    assert len(values) == len(declared)
    kinds = {"int": int, "float": float, "str": str, "float[]": list, "int[]": list}
    for a, x in zip(declared, values):
        assert a.type.endswith("?") or isinstance(x, kinds[a.type]), (a, x)
