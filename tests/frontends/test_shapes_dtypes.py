"""Dynamic shapes are never specialised by a rewrite; half-precision models keep their dtype."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch

import attnrewrite
from attnrewrite.frontends import onnx as onnx_fe
from _models import TinyAttention

T = pytest.importorskip("transformers")


def bert(impl: str):
    torch.manual_seed(0)
    cfg = T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       vocab_size=100, attn_implementation=impl)
    return T.BertModel(cfg).eval()


def bert_inputs(b: int, n: int):
    mask = torch.ones(b, n, dtype=torch.long)
    mask[-1, n // 2:] = 0
    return {"input_ids": torch.randint(3, 100, (b, n)), "attention_mask": mask}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("variant,options", [("exact", {}), ("sparse", {"mode": "topk", "k": 64}),
                                             ("conv_basis", {"k": 64})])
def test_symbolic_batch_and_length_survive_the_rewrite(impl, variant, options):
    m = bert(impl)
    batch, seq = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=2, max=64)
    dims = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(m, (), bert_inputs(2, 24), dynamic_shapes=dims, strict=False)
    r = attnrewrite.rewrite(ep, variant, **options)
    assert [s.status for s in r.sites] == ["rewritten"] * 2
    assert all(isinstance(s.q_len, str) and isinstance(s.batch, str) for s in r.sites)   # reported by name
    for b, n in ((3, 10), (1, 33)):                     # neither the export batch nor its length
        kw = bert_inputs(b, n)
        want, got = ep.module()(**kw)[0], r.program.module()(**kw)[0]
        assert (want - got).abs().max().item() <= 1e-5


def test_onnx_symbolic_dims_survive_the_rewrite(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyAttention().eval(), (torch.randn(2, 6, 16),), str(path), input_names=["x"],
                          dynamic_axes={"x": {0: "batch", 1: "seq"}}, dynamo=False, opset_version=17)
    r = attnrewrite.rewrite(str(path), "sparse", mode="window", window=64)
    assert [s.status for s in r.sites] == ["rewritten"]
    dims = r.program.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[:2]] == ["batch", "seq"]
    a, b = onnx_fe.session(onnx.load(path)), onnx_fe.session(r.program)
    for shape in ((1, 9, 16), (3, 20, 16)):
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        want, got = onnx_fe.run(a, {"x": x}), onnx_fe.run(b, {"x": x})
        assert np.abs(list(want.values())[0] - list(got.values())[0]).max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_pt2_keeps_its_dtype_and_its_tolerance(dtype):
    torch.manual_seed(0)
    m, x = TinyAttention().eval().to(dtype), torch.randn(2, 8, 16).to(dtype)
    r = attnrewrite.rewrite(torch.export.export(m, (x,)), "exact")
    site = r.sites[0]
    assert site.dtype == str(dtype).replace("torch.", "") and site.status == "rewritten"
    assert r.report["check"]["tolerance"] == 1e-2 and r.report["check"]["passed"] is True
    out = r.program.module()(x)
    assert out.dtype == dtype
    # the op computes in fp32 and rounds once: as close to an fp32 reference as the original is
    ref = TinyAttention().eval()
    ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    want = ref(x.float())
    assert (out.float() - want).abs().max() <= 2 * (m(x).float() - want).abs().max() + 1e-3


def test_half_precision_onnx(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "half.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyAttention().eval().half(), (torch.randn(2, 8, 16).half(),), str(path),
                          input_names=["x"], dynamo=False, opset_version=17)
    r = attnrewrite.rewrite(str(path), "exact")
    assert [s.dtype for s in r.sites] == ["float16"] and r.sites[0].status == "rewritten"
    assert r.report["check"]["tolerance"] == 1e-2 and r.report["check"]["passed"] is True
    out = r.program.graph.output[0].type.tensor_type.elem_type
    assert out == onnx.TensorProto.FLOAT16
