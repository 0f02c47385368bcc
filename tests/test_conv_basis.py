"""conv-basis: exact limits, planted k-conv matrices, real attention, fallback rows, the op's plumbing."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnrewrite
from attnrewrite import pipeline
from attnrewrite.frontends.export import ExportFrontEnd
from attnrewrite.io import InputError
from attnrewrite.variants import VARIANTS
from attnrewrite.variants import conv_basis as cb
from attnrewrite.variants.exact import reference as exact


def rel(a, b):
    return ((a.double() - b.double()).norm() / a.double().norm()).item()


def run(q, k, v, mask=None, causal=False, kk=16, starts=None, eps=0.0, scale=None, softcap=0.0):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    stats: dict = {}
    out = cb._attend(q, k, v, mask, scale, softcap, causal, 0.0, kk, starts, eps, stats)
    return out, exact(q, k, v, mask, scale, softcap, causal, 0.0), stats


def qkv(b=2, h=2, hkv=2, n=24, d=8, dtype=torch.float64, spread=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=dtype) * spread
    return q, torch.randn(b, hkv, n, d, generator=g, dtype=dtype), torch.randn(b, hkv, n, d, generator=g, dtype=dtype)


@pytest.fixture(params=["dense", "fft"])
def path(request, monkeypatch):
    """Run a test on both ways of applying H̃: built densely (short n) and by FFT (long n)."""
    monkeypatch.setattr(cb, "DENSE_MAX_N", 10_000 if request.param == "dense" else 0)
    return request.param


# ------------------------------------------------------------------ exact limit: k = n keeps every column

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_k_equal_n_is_exact_to_round_off(causal, softcap, path):
    q, k, v = qkv(n=40)
    out, ref, stats = run(q, k, v, causal=causal, kk=40, softcap=softcap)
    assert rel(ref, out) < 1e-12
    assert stats["basis_err"] and max(stats["basis_err"]) < 1e-12


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 2), hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]),
       n=st.integers(2, 33), d=st.sampled_from([4, 8]), causal=st.booleans(), pad=st.integers(0, 5),
       seed=st.integers(0, 1000))
def test_property_k_ge_n_exact(b, hkv, group, n, d, causal, pad, seed):
    """Random shapes with GQA, key padding (bool), causal or not, batch > 1: k ≥ n is exact."""
    q, k, v = qkv(b=b, h=hkv * group, hkv=hkv, n=n, d=d, seed=seed)
    mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
    mask[-1, ..., n - min(pad, n - 1):] = False
    out, ref, _ = run(q, k, v, mask=mask, causal=causal, kk=n + 3)
    assert rel(ref, out) < 1e-10


def test_hf_style_causal_plus_padding_mask_splits(path):
    """A (B, 1, n, n) float mask = causal pattern + key padding (finfo.min) is represented exactly."""
    q, k, v = qkv(n=12)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[1, :3] = False                                            # left padding
    allowed = torch.ones(12, 12, dtype=torch.bool).tril() & keep[:, None, None, :]
    mask = torch.zeros(2, 1, 12, 12, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    causal, key = cb.split_mask(mask, False, 12)
    assert causal and key.shape == (2, 1, 12)
    out, ref, _ = run(q, k, v, mask=mask, kk=12)
    rows = keep[:, None, :, None].expand_as(ref)                   # padded query rows see nothing here
    assert rel(ref[rows], out[rows]) < 1e-12


def test_query_dependent_bias_is_not_representable():
    t5_like = torch.randn(1, 2, 10, 10)                            # a relative-position bias
    assert cb.split_mask(t5_like, False, 10) is None
    q, k, v = qkv(n=10)
    out, ref, stats = run(q, k, v, mask=t5_like.double(), kk=2)    # the op itself stays exact
    assert stats["exact_fallback"] and rel(ref, out) < 1e-12


# ------------------------------------------------------------------ planted k-conv matrices

def planted(n, starts, seed=0):
    """Scores s with H = exp(s) exactly conv in each column block [sᵢ, sᵢ₊₁): column j copies column sᵢ."""
    g = torch.Generator().manual_seed(seed)
    s = torch.full((n, n), -30.0, dtype=torch.float64)
    bounds = starts[1:] + [n]
    for a, b in zip(starts, bounds):
        col = torch.randn(n - a, generator=g, dtype=torch.float64) * 2
        for j in range(a, b):
            s[j:, j] = col[: n - j]
    return s


@pytest.mark.parametrize("starts", [[0], [0, 5], [0, 3, 11, 17], [0, 1, 2, 9, 10, 20, 27]])
def test_planted_k_conv_is_recovered_exactly(starts, path):
    """q = S, k = I, scale 1 makes q·kᵀ any matrix: a planted k-conv H is found and reproduced with k starts."""
    n = 30
    s = planted(n, starts)
    q, k = s[None, None], torch.eye(n, dtype=torch.float64)[None, None]
    v = torch.randn(1, 1, n, 5, dtype=torch.float64)
    found = cb.find_starts(q[0], k[0], len(starts), 0.0, False, torch.ones(1, n, dtype=torch.float64))
    assert found[0].tolist() == starts
    out, ref, stats = run(q, k, v, causal=True, kk=len(starts), scale=1.0)
    assert rel(ref, out) < 1e-9
    fewer, _, _ = run(q, k, v, causal=True, kk=max(len(starts) - 1, 1), scale=1.0)
    if len(starts) > 1:
        assert rel(ref, fewer) > 1e-3                              # one start short is not exact


def test_eps_drops_starts_a_conv_matrix_does_not_need():
    n, starts = 30, [0, 12]
    s = planted(n, starts)
    q, k = s[None, None], torch.eye(n, dtype=torch.float64)[None, None]
    v = torch.randn(1, 1, n, 3, dtype=torch.float64)
    out, ref, stats = run(q, k, v, causal=True, kk=10, eps=1e-6, scale=1.0)
    assert stats["starts"] == [2.0] and rel(ref, out) < 1e-9


def test_fixed_starts_option():
    n = 20
    s = planted(n, [0, 7])
    q, k = s[None, None], torch.eye(n, dtype=torch.float64)[None, None]
    v = torch.randn(1, 1, n, 3, dtype=torch.float64)
    good, ref, _ = run(q, k, v, causal=True, scale=1.0, starts=[7])          # 0 is always added
    bad, _, _ = run(q, k, v, causal=True, scale=1.0, starts=[3])
    assert rel(ref, good) < 1e-9 and rel(ref, bad) > 1e-3


# ------------------------------------------------------------------ numerics: the shared shift and the fallback rows

def test_rows_far_below_the_global_max_fall_back_to_exact(monkeypatch):
    """A 40-logit spread: without the fallback those rows are FFT noise; with it, exact."""
    q, k, v = qkv(b=1, h=1, hkv=1, n=48, d=8, spread=1.0, seed=3)
    q = q * torch.linspace(0.05, 14, 48, dtype=torch.float64)[None, None, :, None]   # row scales differ a lot
    monkeypatch.setattr(cb, "DENSE_MAX_N", 0)                     # the FFT path is where the noise is
    out, ref, stats = run(q, k, v, causal=True, kk=48)
    assert stats["fallback_rows"] > 0
    assert rel(ref, out) < 1e-9
    monkeypatch.setattr(cb, "RELIABLE", 0.0)
    noisy, _, stats0 = run(q, k, v, causal=True, kk=48)
    assert stats0["fallback_rows"] < stats["fallback_rows"] and rel(ref, noisy) > 1e3 * rel(ref, out)


def test_half_and_float_inputs_are_computed_in_float64():
    q, k, v = qkv(n=16, dtype=torch.float32)
    out, ref, _ = run(q, k, v, causal=True, kk=16)
    assert out.dtype == torch.float32 and rel(ref, out) < 1e-6
    out16, _, _ = run(q.half(), k.half(), v.half(), causal=True, kk=16)
    assert out16.dtype == torch.float16 and rel(ref, out16) < 2e-3


# ------------------------------------------------------------------ real attention: the pretrained MiniLM

@functools.cache
def minilm_captures():
    fe = ExportFrontEnd.open(None)                     # the built-in demo: pretrained MiniLM
    sites, _ = fe.find_sites()
    return fe, fe.inputs, sites, fe.capture(sites, fe.inputs)


def test_minilm_k_equal_n_is_exact_and_error_falls_with_k():
    _, _, sites, got = minilm_captures()
    assert len(sites) == 6
    for site in sites[:2]:
        r = got[site.id][0]
        q, k, v, mask = r["q"], r["k"], r["v"], r["mask"]
        n = k.shape[-2]
        scale = float(site.graph.scale)
        errs = {kk: rel(r["out"], run(q, k, v, mask=mask, kk=kk, scale=scale)[0]) for kk in (1, 4, 8, 16, n)}
        assert errs[n] < 1e-6, errs
        assert errs[16] < errs[4] < errs[1], errs
        assert errs[8] < 0.5 * errs[1], errs


def test_minilm_rewrite_end_to_end_k_n_and_diagnostics():
    fe, _, _, _ = minilm_captures()
    r = pipeline.rewrite(fe, "conv_basis", {"k": 64})
    rep = r.report
    assert [s["status"] for s in rep["sites"]] == ["rewritten"] * 6
    assert rep["check"]["rel_err"] < 1e-5
    d = rep["sites"][0]["check"]["diagnostics"]
    assert d["basis_err_max"] < 1e-12 and d["rows"] > 0 and 0 <= d["fallback_rows"] <= d["rows"]


# ------------------------------------------------------------------ the op: export, save, train, kept sites

class Causal(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum(1)


def test_rewritten_program_saves_loads_and_differentiates(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 10, 16)
    res = attnrewrite.rewrite(Causal(), "conv_basis", example_inputs=(x,), k=10)
    assert res.report["check"]["rel_err"] < 1e-5
    path = tmp_path / "m.pt2"
    torch.export.save(res.program, path)
    loaded = torch.export.load(path)
    assert any(n.target == torch.ops.attnrewrite.conv_basis_attention.default for n in loaded.graph.nodes)
    torch.testing.assert_close(loaded.module()(x), res.program.module()(x))
    q, k, v = [t.requires_grad_() for t in qkv(b=1, h=1, hkv=1, n=6, d=3)]
    assert torch.autograd.gradcheck(lambda a, b, c: torch.ops.attnrewrite.conv_basis_attention(
        a, b, c, None, 0.5, 0.0, True, 0.0, 3, None, 0.0), (q, k, v))


def test_cross_attention_and_query_bias_sites_are_kept():
    class Cross(torch.nn.Module):
        def forward(self, x, mem, bias):
            a = torch.nn.functional.scaled_dot_product_attention(x, mem, mem)          # q_len != kv_len
            b = torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=bias)
            return a + b

    x, mem, bias = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 6, 6)
    rep = attnrewrite.rewrite(Cross(), "conv_basis", example_inputs=(x, mem, bias)).report
    assert [s["status"] for s in rep["sites"]] == ["kept", "kept"]
    assert "q_len == kv_len" in rep["sites"][0]["reason"] and "query" in rep["sites"][1]["reason"]
    assert rep["check"]["rel_err"] < 1e-6


def test_auto_picks_the_smallest_k_within_tolerance():
    torch.manual_seed(1)
    x = torch.randn(2, 12, 16)
    res = attnrewrite.rewrite(Causal(), "conv_basis", example_inputs=(x,), tolerance=0.05, auto=True)
    rep = res.report
    k = rep["sites"][0]["options"]["k"]
    assert rep["check"]["rel_err"] <= 0.05
    rungs = [r["k"] for r in cb.auto_ladder(res.sites[0], {})]
    assert rungs[-1] == 12 and k in rungs
    if k > 1:                                                     # the rung below breaks the tolerance
        below = rungs[rungs.index(k) - 1]
        worse = attnrewrite.rewrite(Causal(), "conv_basis", example_inputs=(x,), k=below).report
        assert worse["check"]["rel_err"] > 0.05


def test_bad_options_are_one_line_errors():
    with pytest.raises(InputError, match="k=0 is below the minimum"):
        pipeline.validate_options("conv-basis", {"k": 0})
    with pytest.raises(InputError, match="starts"):
        pipeline.validate_options("conv-basis", {"starts": "a,b"})
    with pytest.raises(InputError, match="needs --tolerance"):
        pipeline.validate_options("conv-basis", {"auto": True})
    assert pipeline.validate_options("conv-basis", {"starts": "0,5,9"})["starts"] == [0, 5, 9]


@pytest.mark.parametrize("causal", [True, False])
def test_dense_and_fft_paths_compute_the_same_matrix(monkeypatch, causal):
    """Short sequences build H̃ densely, long ones by FFT: same H̃, so the same output at any k."""
    q, k, v = qkv(n=40, seed=7)
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    mask[1, ..., 33:] = False
    outs = []
    for dense_max in (10_000, 0):
        monkeypatch.setattr(cb, "DENSE_MAX_N", dense_max)
        out, ref, stats = run(q, k, v, mask=mask, causal=causal, kk=5)
        outs.append(out)
        # the independent basis-error diagnostic sees the same H̃ the output used (no fallback rows here)
        assert stats["fallback_rows"] == 0
    assert rel(outs[0], outs[1]) < 1e-12
    assert rel(ref, outs[0]) > 1e-2
