"""torch.nn's own attention modules: every call is one site and the exact rewrite is exact.

Exported with `torch.export.export(m.eval(), ..., strict=False)`; checked on the training
IR and on core ATen (`run_decompositions()`, where CPU SDPA becomes its math form).
Notes from writing these:
* nn.MultiheadAttention exports as `aten.scaled_dot_product_attention` when
  need_weights=False and as a decomposed bmm/softmax/bmm when need_weights=True (the
  averaged weights are a second consumer of the probabilities).
* nn.TransformerEncoderLayer's fused fast path (`_transformer_encoder_layer_fwd`) is not
  taken under torch.export in eval mode (with or without no_grad, nested tensors on or
  off): the layers export as SDPA.
* nn.TransformerEncoder(mask=causal) without `is_causal=True` does not export at all
  (torch's `_detect_is_causal_mask` calls bool() on a data-dependent comparison), so the
  encoder is exported with `is_causal=True`, which drops the mask for SDPA's flag.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnrewrite

B, L, LT, E, NH = 2, 6, 5, 16, 4
HD = E // NH
IRS = ["training", "core_aten"]


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def key_padding():
    m = torch.zeros(B, L, dtype=torch.bool)
    m[1, -2:] = True                       # True = ignore (nn.MultiheadAttention convention)
    return m


def causal(n=L):
    return nn.Transformer.generate_square_subsequent_mask(n)


def mha_case(batch_first: bool, need_weights: bool, kpm: bool, am: bool):
    def make():
        torch.manual_seed(0)
        m = nn.MultiheadAttention(E, NH, dropout=0.1, batch_first=batch_first)
        x = _randn(B, L, E, seed=1) if batch_first else _randn(L, B, E, seed=1)
        kw = {"need_weights": need_weights}
        if kpm:
            kw["key_padding_mask"] = key_padding()
        if am:
            kw["attn_mask"] = causal()
        return m, (x, x, x), kw
    return make


def encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, NH, 32, dropout=0.1, batch_first=True)
    m = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return m, (_randn(B, L, E, seed=1),), {"mask": causal(), "is_causal": True}


def transformer():
    torch.manual_seed(0)
    m = nn.Transformer(E, NH, 1, 1, 32, dropout=0.1, batch_first=True)
    return m, (_randn(B, L, E, seed=1), _randn(B, LT, E, seed=2)), {"tgt_mask": causal(LT), "tgt_is_causal": True}


MHA = dict(heads=NH, kv_heads=NH, q_len=L, kv_len=L, head_dim=HD, scale=HD ** -0.5, softcap=None)


def mha_expect(need_weights, masked, is_causal, ir):
    src = "decomposed" if need_weights or ir == "core_aten" else "sdpa"
    return [dict(MHA, source=src, mask="additive" if masked else "none", causal=is_causal)]


# id: (factory, expected(ir) -> list of per-site fields)
CASES = {}
for bf in (True, False):
    for nw in (True, False):
        CASES[f"mha-bf{int(bf)}-nw{int(nw)}"] = (
            mha_case(bf, nw, False, False), lambda ir, nw=nw: mha_expect(nw, False, False, ir))
        CASES[f"mha-bf{int(bf)}-nw{int(nw)}-kpm-causal"] = (
            mha_case(bf, nw, True, True), lambda ir, nw=nw: mha_expect(nw, True, True, ir))
CASES["mha-bf1-nw1-kpm"] = (mha_case(True, True, True, False), lambda ir: mha_expect(True, True, False, ir))
CASES["mha-bf0-nw0-causal"] = (mha_case(False, False, False, True), lambda ir: mha_expect(False, True, True, ir))


def _encoder_expect(ir):
    core = ir == "core_aten"
    one = dict(MHA, source="decomposed" if core else "sdpa", mask="additive" if core else "none", causal=True)
    return [one, one]


def _transformer_expect(ir):
    core = ir == "core_aten"
    base = dict(MHA, source="decomposed" if core else "sdpa", mask="none", causal=False)
    return [base,                                                          # encoder self
            dict(base, q_len=LT, kv_len=LT, causal=True, mask="additive" if core else "none"),  # decoder self
            dict(base, q_len=LT, kv_len=L)]                                # cross


CASES["transformer_encoder-2layers-causal"] = (encoder, _encoder_expect)
CASES["transformer-1enc-1dec"] = (transformer, _transformer_expect)

_programs: dict = {}


def program(case: str, ir: str):
    if (case, ir) not in _programs:
        if ir == "training":
            m, args, kwargs = CASES[case][0]()
            ep = torch.export.export(m.eval(), args, kwargs, strict=False)
        else:
            ep, args, kwargs = program(case, "training")
            ep = ep.run_decompositions()
        _programs[(case, ir)] = (ep, args, kwargs)
    return _programs[(case, ir)]


@pytest.mark.parametrize("ir", IRS)
@pytest.mark.parametrize("case", list(CASES))
def test_torch_nn_attention(case, ir):
    ep, args, kwargs = program(case, ir)
    if ir == "training":
        targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert not any("_transformer_encoder_layer_fwd" in t or "_native_multi_head_attention" in t
                       for t in targets), "a fused fast path was exported"
    want = CASES[case][1](ir)
    r = attnrewrite.rewrite(ep, "exact", example_inputs={"args": args, "kwargs": kwargs})
    assert len(r.sites) == len(want), [s.to_dict() for s in r.sites]
    for s, w in zip(r.sites, want):
        w = dict(w)
        scale = w.pop("scale")
        assert {k: getattr(s, k) for k in w} == w, s.to_dict()
        assert isinstance(s.scale, float) and s.scale == pytest.approx(scale, rel=1e-6)
        if "-nw1" in case:                             # the averaged weights are returned: dense stays
            assert s.status == "kept" and "need_weights=True" in s.reason, s.to_dict()
        else:
            assert s.status == "rewritten"
    assert len({s.name for s in r.sites}) == len(want)
    assert r.report["check"]["rel_err"] <= 1e-5
    assert r.report["check"]["passed"] is True
    ops = [n for n in r.program.graph.nodes if n.target == torch.ops.attnrewrite.exact_attention.default]
    assert len(ops) == (0 if "-nw1" in case else len(want))


class DiscardWeights(nn.Module):
    """`out, _ = mha(x, x, x)`: need_weights=True (the default) with the weights thrown away."""

    def __init__(self):
        super().__init__()
        self.m = nn.MultiheadAttention(E, NH, batch_first=True)

    def forward(self, x):
        out, _ = self.m(x, x, x)
        return out


def test_need_weights_true_with_the_weights_unused_is_rewritten():
    """The averaged weights die with the rewrite, so the site is rewritten (and the dense
    softmax is gone from the program); returned weights keep it (test_torch_nn_attention)."""
    torch.manual_seed(0)
    x = _randn(B, L, E, seed=1)
    ep = torch.export.export(DiscardWeights().eval(), (x,))
    r = attnrewrite.rewrite(ep, "exact", example_inputs=(x,))
    assert [s.status for s in r.sites] == ["rewritten"] and r.report["check"]["rel_err"] <= 1e-5
    assert not any("softmax" in str(n.target) for n in r.program.graph.nodes)
