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
    monkeypatch.setattr(cb.convolve, "DENSE_MAX_N", 10_000 if request.param == "dense" else 0)
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
    monkeypatch.setattr(cb.convolve, "DENSE_MAX_N", 0)            # the FFT path is where the noise is
    out, ref, stats = run(q, k, v, causal=True, kk=48)
    assert stats["fallback_rows"] > 0
    rows = ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    assert rows < 1e-6 and rel(ref, out) < 1e-8                   # RELIABLE = 1e6: six digits per row
    monkeypatch.setattr(cb.compute, "RELIABLE", 0.0)
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
        assert errs[16] < errs[8] < errs[4] < errs[1], errs       # (the demo sentences set the levels)


def test_minilm_rewrite_end_to_end_k_n_and_diagnostics():
    fe, _, _, _ = minilm_captures()
    r = pipeline.rewrite(fe, "conv_basis", {"k": 512})                  # k ≥ every demo length
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
        monkeypatch.setattr(cb.convolve, "DENSE_MAX_N", dense_max)
        out, ref, stats = run(q, k, v, mask=mask, causal=causal, kk=5)
        outs.append(out)
        # the independent basis-error diagnostic sees the same H̃ the output used (no fallback rows here)
        assert stats["fallback_rows"] == 0
    assert rel(outs[0], outs[1]) < 1e-12
    assert rel(ref, outs[0]) > 1e-2


# ------------------------------------------------------------------ the float32 overlap-save path (n > DENSE_MAX_N)

def padded(n, b=2):
    mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
    mask[-1, ..., n - n // 7:] = False
    return mask


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("spread", [1.0, 3.0])
def test_float32_fast_path_k_equal_n_matches_exact(monkeypatch, causal, spread):
    """k = n in float32 by FFT: the reliability test keeps every row within 1e-3 of exact attention
    (RELIABLE_F32 = 1e3 against float32's round-off: three digits in the worst case), the whole
    output within 1e-4; a spread of 3 (scaled logits up to ~±30) makes rows fall back."""
    monkeypatch.setattr(cb.convolve, "DENSE_MAX_N", 0)
    q, k, v = qkv(n=200, d=16, dtype=torch.float32, spread=spread, seed=1)
    mask = padded(200)
    stats: dict = {}
    out = cb._attend(q, k, v, mask, 0.25, 0.0, causal, 0.0, 200, "norm", 0.0, stats, precision="float32")
    ref = exact(q.double(), k.double(), v.double(), mask, 0.25, 0.0, causal, 0.0)
    live = ref.norm(dim=-1) > 0
    rows = (out.double() - ref).norm(dim=-1)[live] / ref.norm(dim=-1)[live]
    assert out.dtype == torch.float32 and rows.max() < 1e-3 and rel(ref, out) < 1e-4
    assert (stats["fallback_rows"] > 0) == (spread > 1)
    monkeypatch.setattr(cb.compute, "RELIABLE_F32", 0.0)         # without the fallback: visibly worse rows
    noisy = cb._attend(q, k, v, mask, 0.25, 0.0, causal, 0.0, 200, "norm", 0.0, precision="float32")
    if spread > 1:
        assert ((noisy.double() - ref).norm(dim=-1)[live] / ref.norm(dim=-1)[live]).max() > 2 * rows.max()


@pytest.mark.parametrize("causal", [True, False])
def test_float32_and_float64_paths_agree_at_small_k(monkeypatch, causal):
    """Same starts, same H̃: float32 transforms differ from float64 ones by round-off only (≤ 1e-5),
    while the approximation itself is far from exact at k = 4 (> 0.1). auto picks float32 for
    float32 inputs on the FFT path and float64 for float64 inputs."""
    monkeypatch.setattr(cb.convolve, "DENSE_MAX_N", 0)
    q, k, v = qkv(n=200, d=16, dtype=torch.float32, spread=1.0, seed=2)
    mask = padded(200)
    args = (q, k, v, mask, 0.25, 0.0, causal, 0.0, 4, [0, 30, 77, 150], 0.0)
    o32 = cb._attend(*args, precision="float32")
    o64 = cb._attend(*args, precision="float64")
    assert rel(o64, o32) < 1e-5
    assert rel(exact(q, k, v, mask, 0.25, 0.0, causal, 0.0), o64) > 0.1
    n32 = cb._attend(*args[:-2], "norm", 0.0, precision="float32")
    n64 = cb._attend(*args[:-2], "norm", 0.0, precision="float64")
    assert rel(n64, n32) < 1e-5
    assert torch.equal(cb._attend(*args), o32)                    # auto: float32 here
    assert cb.working_dtype("auto", torch.float64, 10_000) == torch.float64
    assert cb.working_dtype("auto", torch.float16, 10_000) == torch.float32


@pytest.mark.parametrize("n", [97, 1000])
def test_overlap_save_equals_the_dense_matrix(n):
    """The FFT path applies the same H̃ as the dense build, for lengths that are not a multiple of the
    block, starts inside blocks and on block boundaries, repeated (empty) starts."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, 5, generator=g, dtype=torch.float64)
    kern = torch.rand(3, 4, n, generator=g, dtype=torch.float64)
    p = cb.fft_block(n)
    starts = torch.tensor([[0, 1, p, n - 1], [0, 0, 5, 2 * p + 3], [0, p - 1, p + 1, n // 2]])
    owner = torch.searchsorted(starts, torch.arange(n).expand(3, n).contiguous(), right=True) - 1
    fft, noise = cb._conv_apply(kern, starts, x) if n > cb.DENSE_MAX_N else cb._overlap_save(
        kern, owner, x, p, -(-n // p), -(-n // p) + 4)
    assert rel(cb._dense_apply(kern, owner, x), fft) < 1e-12
    assert noise.shape == (3, n) and (noise > 0).all()


# ------------------------------------------------------------------ starts=search (the co-authors' binary search)

@pytest.mark.parametrize("starts", [[0], [0, 5], [0, 3, 11, 17], [0, 1, 2, 9, 10, 20, 27]])
def test_search_recovers_planted_starts(starts, path):
    """A planted k-conv H: every column of a block repeats its start column, later blocks differ —
    the binary search finds exactly the planted starts, and the output is exact."""
    n = 30
    s = planted(n, starts)
    q, k = s[None, None], torch.eye(n, dtype=torch.float64)[None, None]
    v = torch.randn(1, 1, n, 5, dtype=torch.float64)
    found = cb.search_starts(q[0], k[0], len(starts), 1e-9, 1, False)
    assert found[0].tolist() == starts
    out, ref, stats = run(q, k, v, causal=True, kk=len(starts), scale=1.0, starts="search")
    assert rel(ref, out) < 1e-9 and stats["starts"] == [float(len(starts))]
    for segment in (1, 4):                                         # a segment of T cannot see starts past n − T
        more = cb._attend(q, k, v, None, 1.0, 0.0, True, 0.0, len(starts) + 3, "search", 0.0, None, 1e-9, segment)
        assert (rel(ref, more) < 1e-9) == (starts[-1] <= n - segment)   # spare starts land on copies


@pytest.mark.parametrize("causal", [True, False])
def test_search_k_equal_n_is_exact(causal, path):
    q, k, v = qkv(n=40)
    out, ref, stats = run(q, k, v, causal=causal, kk=40, starts="search")
    assert rel(ref, out) < 1e-12 and max(stats["basis_err"]) < 1e-12


def test_search_basis_is_the_authors_cumulative_exp():
    """The co-authors' construction, spelled out: bᵢ = (score column sᵢ from the diagonal) − (b₁ + … +
    bᵢ₋₁), b̃ᵢ = exp(b₁ + … + bᵢ) − exp(b₁ + … + bᵢ₋₁), output D⁻¹·Σ S(b̃ᵢ, n − sᵢ)·V with D the same
    sum applied to 1 — equal to the op's output for the starts the search finds (δ = 0.5 here, so
    they are not just 0, 1, 2, …)."""
    n, kk = 24, 5
    q, k, v = (t[0, 0] for t in qkv(b=1, h=1, hkv=1, n=n, d=8, seed=5))
    s = (q @ k.T) * 8 ** -0.5
    st = cb.search_starts((q * 8 ** -0.5)[None], k[None], kk, 0.5, 1, False)[0].tolist()
    assert len(set(st)) == kk and st != list(range(kk))
    u = torch.zeros(n, dtype=torch.float64)
    m = torch.zeros(n, n, dtype=torch.float64)
    prev = torch.zeros(n, dtype=torch.float64)
    for a in st:
        b = torch.zeros(n, dtype=torch.float64)
        b[:n - a] = s[a:, a] - u[:n - a]
        u = u + b
        bt = torch.exp(u) - (torch.exp(prev) if a else 0.0)
        prev = u.clone()
        for j in range(a, n):                                      # S(b̃, n − a): Toeplitz from column a on
            m[j:, j] += bt[:n - j]
    want = (m @ v) / (m @ torch.ones(n, dtype=torch.float64))[:, None]
    got = cb._attend(q[None, None], k[None, None], v[None, None], None, 8 ** -0.5, 0.0, True, 0.0, kk,
                     "search", 0.0, None, 0.5)[0, 0]
    assert rel(want, got) < 1e-12


def test_starts_option_parses_norm_search_and_columns():
    assert pipeline.validate_options("conv-basis", {"starts": "search"})["starts"] == "search"
    assert pipeline.validate_options("conv-basis", {})["starts"] == "norm"
    with pytest.raises(InputError, match="precision"):
        pipeline.validate_options("conv-basis", {"precision": "float16"})
    assert cb.op_args(None, {"k": 4, "starts": "search", "delta": 0.5})[1:5] == (None, 0.0, "search", 0.5)
    assert cb.op_args(None, {"starts": [3, 9]})[1] == [3, 9]


# ------------------------------------------------------------------ memory: O(k·n·d), never n × n

from test_sparse import MaxNumel  # noqa: E402 - the largest tensor any aten op produces


@pytest.mark.parametrize("causal,starts", [(True, "norm"), (False, "search")])
def test_fast_path_memory_is_o_k_n_d(causal, starts):
    """n = 4096, k = 8, d = 16, key padding, float32 overlap-save, forward and backward: the largest
    tensors are the near-diagonal band of the norm search (2·DIAG_BAND·n) and the X segments with
    their gradients (2·(n + k·P)·(d + 1), twice) — O(k·n·d), far below n²."""
    n, d, kk = 4096, 16, 8
    q, k, v = (torch.randn(1, 1, n, d, requires_grad=True) for _ in range(3))
    pad = torch.ones(1, 1, 1, n, dtype=torch.bool)
    pad[..., -100:] = False
    with MaxNumel() as rec:
        out = cb.reference(q, k, v, pad, d ** -0.5, 0.0, causal, 0.0, kk, None, 0.0, starts)
        out.sum().backward()
    bound = max(2 * cb.DIAG_BAND * n, 4 * (n + kk * cb.fft_block(n)) * (d + 1))
    assert rec.max <= bound < n * n // 16, rec.max
    assert out.shape == (1, 1, n, d) and not q.grad.isnan().any()
