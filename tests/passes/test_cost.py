"""The cost model: its matmul flops against FlopCounterMode on the references, hand-counted
depths and bytes, exact scaling laws, symbolic sizes and the model-level sum.

FlopCounterMode counts matmul-like ops only (here aten.bmm / aten.mm): never FFTs,
elementwise ops or reductions. So every comparison with it is on `flops_matmul`, the part
of the model that claims to be exactly what it counts.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from attnrewrite import cost
from attnrewrite.variants import costing
from attnrewrite.cost import L, Sd, model_cost, site_cost
from attnrewrite.site import AttentionSite
from attnrewrite.variants import conv_basis, exact, impl, preconditioned, sparse


def make_site(b=2, h=4, hkv=4, lq=16, lk=None, d=8, causal=False, dtype="float32", mask="none",
              softcap=None, id=0):
    return AttentionSite(id=id, name=f"s{id}", source="sdpa", batch=b, heads=h, kv_heads=hkv, q_len=lq,
                         kv_len=lq if lk is None else lk, head_dim=d, dtype=dtype, causal=causal, mask=mask,
                         softcap=softcap)


def qkv(site, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(site.batch, site.heads, site.q_len, site.head_dim, generator=g)
    k = torch.randn(site.batch, site.kv_heads, site.kv_len, site.head_dim, generator=g)
    v = torch.randn(site.batch, site.kv_heads, site.kv_len, site.head_dim, generator=g)
    return q, k, v


def counted(fn) -> int:
    with FlopCounterMode(display=False) as mode:
        fn()
    return mode.get_total_flops()


SMALL = [(hkv, n, d, causal) for hkv in (4, 2) for n in (16, 33) for d in (8, 16) for causal in (False, True)]


# ----------------------------------------------------------------------------- the references' constants

def test_constants_and_defaults_are_the_references():
    assert costing.SPARSE_CHUNK_ELEMENTS == sparse.scores.CHUNK_ELEMENTS
    assert costing.CONV_DENSE_MAX_N == conv_basis.DENSE_MAX_N
    assert costing.CONV_FFT_CHUNK == conv_basis.FFT_CHUNK
    assert costing.CONV_SAMPLED_DIAGONALS == conv_basis.SAMPLED_DIAGONALS
    assert (costing.CONV_FFT_BLOCKS, costing.CONV_FFT_MIN_BLOCK) == (conv_basis.FFT_BLOCKS, conv_basis.FFT_MIN_BLOCK)
    assert costing.CONV_DIAG_BAND == conv_basis.DIAG_BAND
    for mod in (sparse, conv_basis, preconditioned, exact):       # each variant object carries its model
        assert mod.VARIANT.cost_model is getattr(costing, f"{mod.VARIANT.key}_model")


# ----------------------------------------------------------------------------- matmul flops vs FlopCounterMode

@pytest.mark.parametrize("hkv,n,d,causal", SMALL)
def test_exact_matmul_flops_match_flop_counter(hkv, n, d, causal):
    site = make_site(hkv=hkv, lq=n, d=d, causal=causal)
    q, k, v = qkv(site)
    model = site_cost(site, "exact", {})
    assert model["flops_matmul"] == counted(lambda: exact.reference(q, k, v, None, d ** -0.5, 0.0, causal, 0.0))
    with sdpa_kernel(SDPBackend.MATH):
        assert model["flops_matmul"] == counted(lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, enable_gqa=hkv != 4))
    assert model["flops_matmul"] == 4 * 2 * 4 * n * n * d           # Q·Kᵀ and P·V, causal or not


@pytest.mark.parametrize("mode", ["output-norm", "row-equilibrate"])
def test_preconditioned_matmul_flops_match_flop_counter(mode):
    site = make_site(hkv=2, lq=33, d=8, causal=True)
    q, k, v = qkv(site)
    got = counted(lambda: preconditioned.reference(q, k, v, None, 0.3, 0.0, True, 0.0, mode, [1.0]))
    model = site_cost(site, "preconditioned", {"mode": mode})
    assert model["flops_matmul"] == got == site_cost(site, "exact", {})["flops_matmul"]
    assert model["flops"] > site_cost(site, "exact", {})["flops"]


def sparse_counted(site, options):
    q, k, v = qkv(site)
    args = sparse.op_args(site, options)
    return counted(lambda: sparse.reference(q, k, v, None, 0.3, 0.0, site.causal, 0.0, *args))


SPARSE_OPTIONS = [{"mode": "topk", "k": 5}, {"mode": "topk", "k": 64},
                  {"mode": "window", "window": 8, "sinks": 2, "band": "auto"},
                  {"mode": "window", "window": 8, "sinks": 2, "band": "two-sided"},
                  {"mode": "block", "block": 4, "density": 0.25}]


@pytest.mark.parametrize("options", SPARSE_OPTIONS, ids=lambda o: f"{o['mode']}-{o.get('band', o.get('k', ''))}")
@pytest.mark.parametrize("hkv,n,d,causal", [c for c in SMALL if c[2] == 8])
def test_sparse_matmul_flops_match_flop_counter(hkv, n, d, causal, options):
    site = make_site(hkv=hkv, lq=n, d=d, causal=causal)
    assert site_cost(site, "sparse", options)["flops_matmul"] == sparse_counted(site, options)


@pytest.mark.parametrize("site,options", [
    # window: 300 rows in chunks of 64, each scoring the sinks and its span only
    (make_site(b=1, h=2, hkv=1, lq=300, causal=False), {"mode": "window", "window": 16, "sinks": 4}),
    (make_site(b=1, h=2, hkv=1, lq=300, causal=True), {"mode": "window", "window": 16, "sinks": 4}),
    (make_site(b=1, h=2, hkv=2, lq=200, lk=260, causal=True), {"mode": "window", "window": 16, "sinks": 4}),
    # topk, causal: 1100 rows in 3 chunks (2²⁰ // (1100 + 64·16) rows each), each scoring
    # the keys up to its last diagonal
    (make_site(b=1, h=1, hkv=1, lq=1100, d=16, causal=True), {"mode": "topk", "k": 64}),
    (make_site(b=1, h=2, hkv=2, lq=200, lk=260, causal=True), {"mode": "block", "block": 16}),
], ids=["window-2sided", "window-causal", "window-cross", "topk-chunks", "block-cross"])
def test_sparse_chunked_matmul_flops_match_flop_counter(site, options):
    model = site_cost(site, "sparse", options)
    assert model["flops_matmul"] == sparse_counted(site, options)
    if options["mode"] == "window":            # it does score less than every key
        assert model["flops_matmul"] < site_cost(site, "exact", {})["flops_matmul"]


@pytest.mark.parametrize("options", [{"mode": "block", "block": 8, "density": 0.25},
                                     {"mode": "block", "block": 8, "density": 1.0},
                                     {"mode": "topk", "block": 8, "density": 0.1, "k": 5}],
                         ids=["block-quarter", "block-all", "topk"])
@pytest.mark.parametrize("hkv,lq,lk,causal", [(4, 33, 33, False), (2, 33, 33, True), (4, 200, 260, True)])
def test_sparse_pooled_matmul_flops_match_flop_counter(hkv, lq, lk, causal, options):
    """select=pooled: the pooled logits, then each query block's rows against its kept blocks only."""
    site = make_site(b=1, hkv=hkv, lq=lq, lk=lk, d=8, causal=causal)
    options = {**options, "select": "pooled"}
    model = site_cost(site, "sparse", options)
    assert model["flops_matmul"] == sparse_counted(site, options)
    assert model["runs"] == f"sparse/{options['mode']} pooled"


def test_sparse_pooled_is_priced_below_scoring_every_key():
    """At 10 % density and n = 4096 the pooled choice scores about a tenth of the keys; the exact
    ranking scores all of them (and its P·V is dense)."""
    site = make_site(b=1, h=4, hkv=4, lq=4096, d=64, causal=True)
    o = {"mode": "block", "block": 64, "density": 0.1}
    pooled, ranked = site_cost(site, "sparse", {**o, "select": "pooled"}), site_cost(site, "sparse", o)
    assert pooled["flops_matmul"] < 0.15 * ranked["flops_matmul"]
    assert pooled["peak_extra_bytes"] <= ranked["peak_extra_bytes"]
    assert pooled["flops_algorithm"] <= pooled["flops"]


@pytest.mark.parametrize("path", ["dense", "fft"])
@pytest.mark.parametrize("options", [{"k": 4}, {"k": 64}, {"k": 4, "starts": [3, 9, 40]}], ids=["k4", "k64", "starts"])
@pytest.mark.parametrize("n,causal", [(16, False), (33, True), (33, False)])
def test_conv_basis_matmul_flops_match_flop_counter(n, causal, options, path, monkeypatch):
    """Start columns (2nDk') are matmuls; H̃·[V|1] is one too on the dense path (2n²(D+1)),
    and FFTs (not counted) on the FFT path — forced at small n by moving the threshold in
    both the reference and the model."""
    if path == "fft":
        monkeypatch.setattr(conv_basis.convolve, "DENSE_MAX_N", 0)
        monkeypatch.setattr(costing, "CONV_DENSE_MAX_N", 0)
    site = make_site(hkv=2, lq=n, d=8, causal=causal)
    q, k, v = qkv(site)
    o = {**conv_basis.VARIANT.defaults(), **options}
    got = counted(lambda: conv_basis.reference(q, k, v, None, 8 ** -0.5, 0.0, causal, 0.0,
                                               *conv_basis.op_args(site, o)))
    model = site_cost(site, "conv_basis", options)
    assert model["runs"] == f"conv_basis/{path}"
    assert model["flops_matmul"] == got
    assert (model["flops_fft"] > 0) == (path == "fft")


def test_conv_basis_cross_attention_is_priced_as_exact(monkeypatch):
    # the model prices the reference code; the fallback otherwise runs SDPA, whose CPU kernel
    # FlopCounterMode does not count
    monkeypatch.setenv(impl.FORCE_ENV, "reference")
    site = make_site(lq=16, lk=24)
    model = site_cost(site, "conv_basis", {"k": 4})
    assert model["runs"] == "conv_basis->exact"
    q, k, v = qkv(site)
    got = counted(lambda: conv_basis.reference(q, k, v, None, 0.3, 0.0, False, 0.0, 4, None, 0.0))
    assert model["flops_matmul"] == got == site_cost(site, "exact", {})["flops_matmul"]


def test_sampled_diagonals_close_to_the_reference():
    """T as the reference computes it (float32 logspace), against the model's double-precision T."""
    for n in (33, 100, 600, 1000, 4096):
        grid = torch.logspace(0, math.log10(n - 1), costing.CONV_SAMPLED_DIAGONALS).long().tolist()
        ref = len({t for t in {*range(min(8, n)), *grid} if t < n})
        assert abs(costing._sampled_diagonals(n, False) - ref) <= 1
        assert costing._sampled_diagonals(n, True) == costing._sampled_diagonals(n, False) - 1


# ----------------------------------------------------------------------------- depth

def test_exact_depth_hand_counted():
    """Exact attention, D = 8, n = 16, no mask, softcap or causal; each step's depth:

        s = q·kᵀ        1 multiply level + ⌈log₂ 8⌉ = 3 add levels           4
        s · scale       1                                                     5
        safe_softmax:   dead-row check: max over 16 keys (4), == −inf (1),
                        masked_fill (1)                                       11
                        softmax: max (4), subtract (1), exp (1), sum (4),
                        divide (1)                                            22
                        masked_fill (1)                                       23
        P·V             1 multiply level + ⌈log₂ 16⌉ = 4 add levels           28

    The algorithm needs one max, not two: 28 − 6 = 22 less the fill after the softmax = 21
    (= L(D) + 3L(n) + 6 = 3 + 12 + 6).
    """
    c = site_cost(make_site(b=1, h=1, hkv=1, lq=16, d=8), "exact", {})
    assert c["depth"] == 28
    assert c["depth_algorithm"] == 21
    # a mask adds its bias add, a softcap its div, tanh, mul
    assert site_cost(make_site(b=1, h=1, hkv=1, lq=16, d=8, mask="additive"), "exact", {})["depth"] == 29
    assert site_cost(make_site(b=1, h=1, hkv=1, lq=16, d=8, softcap=30.0), "exact", {})["depth"] == 31


def test_depth_scaling():
    """Doubling n adds one level to each reduction over keys: 4 in the reference (dead-row
    max, max, sum, P·V), 3 in the algorithm; doubling D adds one (the dot product)."""
    for n in (16, 64, 1024):
        a = site_cost(make_site(b=1, h=1, hkv=1, lq=n, d=8), "exact", {})
        b = site_cost(make_site(b=1, h=1, hkv=1, lq=2 * n, d=8), "exact", {})
        assert b["depth"] - a["depth"] == 4
        assert b["depth_algorithm"] - a["depth_algorithm"] == 3
        assert a["depth"] == L(8) + 4 * L(n) + 9 and a["depth_algorithm"] == L(8) + 3 * L(n) + 6
        wide = site_cost(make_site(b=1, h=1, hkv=1, lq=n, d=16), "exact", {})
        assert wide["depth"] - a["depth"] == 1
    assert site_cost(make_site(lq=16, d=8), "exact", {})["depth"] == 28      # batch, heads: parallel
    # sparse topk over n = 16 keys, k = 4: q·scale (1), dot (4), sort network Sd(16) = 10,
    # softmax over 4: max 2, fill 2, sub, exp, sum 2, where 2, div = 11, P·V 1 + 2
    assert site_cost(make_site(b=1, h=1, hkv=1, lq=16, d=8), "sparse", {"mode": "topk", "k": 4})["depth"] == \
        2 + 3 + Sd(16) + 11 + 3 == 29
    # preconditioned output-norm: exact (28) + dead check again (4 + 2) + the extra fill (1),
    # then ‖O‖ (square 1, sum over 8: 3, sqrt 1), 1/x (4), O·C (1), gain (1)
    assert site_cost(make_site(b=1, h=1, hkv=1, lq=16, d=8), "preconditioned", {})["depth"] == 28 + 7 + 11


# ----------------------------------------------------------------------------- flops scaling

def test_exact_flops_scale_as_n_squared():
    for d in (8, 64):
        for n in (16, 100, 1000):
            a = site_cost(make_site(lq=n, d=d), "exact", {})
            b = site_cost(make_site(lq=2 * n, d=d), "exact", {})
            assert b["flops"] == 4 * a["flops"]
            assert a["flops"] == 2 * 4 * n * n * (4 * d + 7)        # G·n²·(4D + 7): no mask, softcap, causal
    # causal: the reference still does every pair, the algorithm about half
    c = site_cost(make_site(lq=1024, causal=True), "exact", {})
    assert c["flops"] == 2 * 4 * 1024 ** 2 * (4 * 8 + 8)
    assert c["flops_algorithm"] == 2 * 4 * ((1024 * 1025 // 2) * (4 * 8 + 5) + 1024 * 8)   # scale on q, one max


def test_conv_basis_flops_grow_like_k_n_log_n():
    """FFT path (n > 512), overlap-save with block P = 2^⌈log₂⌈n/16⌉⌉, b = n/P blocks and
    σ = b + k segments: per head and triangle 2.5·S·log₂S·(σ(D+1) + kb + b(D+1)), S = 2P —
    exactly, and so ≈ linear in k and in n·log n."""
    def fft(n, k, d=16):
        p = max(16, 1 << (-(-n // 16) - 1).bit_length())
        s, b, m = 2 * p, -(-n // p), d + 1
        return 2.5 * s * math.log2(s) * ((b + k) * m + k * b + b * m)

    def combine(n, k, d=16):                    # the spectra's product, as the flop counter counts it
        p = max(16, 1 << (-(-n // 16) - 1).bit_length())
        b = -(-n // p)
        return 2 * (p + 1) * b * (b + k) * (d + 1)

    for n, k, causal in ((1024, 16, True), (4096, 16, True), (4096, 64, False)):
        c = site_cost(make_site(b=1, h=2, hkv=2, lq=n, d=16, causal=causal), "conv_basis", {"k": k})
        assert c["runs"] == "conv_basis/fft"
        assert c["flops_fft"] == int(2 * (1 if causal else 2) * fft(n, k))
        band = 2 * -(-n // 64) * 64 * 16 * 128                  # the search's near-diagonal band
        assert c["flops_matmul"] == 2 * (1 if causal else 2) * (2 * n * 16 * k + combine(n, k) + band)
    small = site_cost(make_site(b=1, h=1, hkv=1, lq=2048, d=16, causal=True), "conv_basis", {"k": 16})["flops"]
    big = site_cost(make_site(b=1, h=1, hkv=1, lq=4096, d=16, causal=True), "conv_basis", {"k": 16})["flops"]
    assert 2.0 < big / small < 2 * 10 / 9                          # at most n·log S, S = 2n/16: 256 → 512
    k16 = site_cost(make_site(b=1, h=1, hkv=1, lq=4096, d=16, causal=True), "conv_basis", {"k": 16})["flops_fft"]
    k32 = site_cost(make_site(b=1, h=1, hkv=1, lq=4096, d=16, causal=True), "conv_basis", {"k": 32})["flops_fft"]
    assert k32 / k16 == pytest.approx(1.5, rel=0.07)               # + the k-free segment and inverse FFTs
    # the dense path below 512 is O(n²·D): the algorithm's FFT count differs from it there
    dense = site_cost(make_site(b=1, h=1, hkv=1, lq=512, d=16, causal=True), "conv_basis", {"k": 16})
    assert dense["runs"] == "conv_basis/dense" and dense["flops_fft"] == 0
    assert dense["flops_algorithm"] - dense["flops"] == int(fft(512, 16) + combine(512, 16) - 2 * 512 * 512 * 17)


def test_window_flops_like_n_times_width():
    """Backward band, w = 128, no sinks, causal: chunks of 128 rows; the first scores 128 keys,
    every later one its rows plus the 127 keys before them (255). The algorithm keeps
    min(i + 1, 128) keys per row."""
    options = {"mode": "window", "window": 128, "sinks": 0}
    for chunks in (4, 8, 16):
        n = 128 * chunks
        c = site_cost(make_site(b=1, h=1, hkv=1, lq=n, d=16, causal=True), "sparse", options)
        assert c["flops_matmul"] == 4 * 16 * (128 * 128 + (chunks - 1) * 128 * 255)
        kept = 128 * 129 // 2 + (n - 128) * 128
        assert c["flops_algorithm"] == kept * (4 * 16 + 5) + n * 16   # softmax 5; q·scale
        assert c["flops"] == c["flops_matmul"] + 128 * 128 * 5 + (chunks - 1) * 128 * 255 * 5 + n * 16
    a = site_cost(make_site(b=1, h=1, hkv=1, lq=4096, d=16, causal=True), "sparse", options)["flops"]
    b = site_cost(make_site(b=1, h=1, hkv=1, lq=8192, d=16, causal=True), "sparse", options)["flops"]
    assert b / a == pytest.approx(2, rel=0.01)                      # linear in n at fixed w
    # and in w at fixed n: w = 256 → chunks of 256 rows scoring 256 + 255 keys
    wide = site_cost(make_site(b=1, h=1, hkv=1, lq=4096, d=16, causal=True), "sparse", {**options, "window": 256})
    assert wide["flops_matmul"] == 4 * 16 * (256 * 256 + 15 * 256 * 511)
    narrow = site_cost(make_site(b=1, h=1, hkv=1, lq=4096, d=16, causal=True), "sparse", options)
    assert wide["flops_matmul"] / narrow["flops_matmul"] == pytest.approx(2, rel=0.02)


def test_algorithm_never_exceeds_the_reference_and_says_where_it_wastes():
    n = 2048
    causal = make_site(lq=n, causal=True)
    for variant, options in [("exact", {}), ("preconditioned", {}), ("sparse", {"mode": "topk"}),
                             ("sparse", {"mode": "window"}), ("sparse", {"mode": "block"}),
                             ("conv_basis", {})]:
        c = site_cost(causal, variant, options)
        assert c["flops_algorithm"] <= c["flops"], variant
    block = site_cost(make_site(lq=n), "sparse", {"mode": "block", "block": 64, "density": 0.25})
    assert block["flops_algorithm"] < 0.7 * block["flops"]         # P·V over a quarter of the blocks
    topk = site_cost(make_site(lq=n), "sparse", {"mode": "topk", "k": 64})
    assert topk["flops_algorithm"] == topk["flops"]                # exact top-k needs every score


# ----------------------------------------------------------------------------- bytes

def test_bytes_hand_counted():
    """B = H = 1, n = 4, D = 2. q, k, v, out: 4·8 = 32 elements; S and P: 16 each.
    float32: 4·32 + 2·(4·32) = 384 bytes; float16: 2·32 + 2·(4·(8 + 16) + 4·32) = 512
    (fp32 copies of q, k, v and fp32 S, P); peak = one 4×4 fp32 matrix = 64 bytes."""
    f32 = site_cost(make_site(b=1, h=1, hkv=1, lq=4, d=2), "exact", {})
    f16 = site_cost(make_site(b=1, h=1, hkv=1, lq=4, d=2, dtype="float16"), "exact", {})
    assert (f32["bytes"], f32["peak_extra_bytes"]) == (384, 64)
    assert (f16["bytes"], f16["peak_extra_bytes"]) == (512, 64)
    boolean = site_cost(make_site(b=1, h=1, hkv=1, lq=4, d=2, mask="boolean"), "exact", {})
    assert boolean["bytes"] == 384 + 16 + 2 * 16 * 4                # the mask read, the bias built from it


def test_sparse_peak_is_per_chunk():
    n = 8192
    dense = site_cost(make_site(b=1, h=8, hkv=8, lq=n, d=64), "exact", {})
    topk = site_cost(make_site(b=1, h=8, hkv=8, lq=n, d=64), "sparse", {"mode": "topk", "k": 64})
    assert dense["peak_extra_bytes"] == 8 * n * n * 4
    # the largest: the chunk outputs kept for the final cat (output-sized), not an n×n matrix
    assert topk["peak_extra_bytes"] == 8 * n * 64 * 4 < dense["peak_extra_bytes"] // 100


# ----------------------------------------------------------------------------- sizes and the model sum

def test_symbolic_sizes():
    sym = make_site(lq="s0", d=8)
    assert site_cost(sym, "exact", {}) is None
    assert site_cost(sym, "exact", {}, sizes={"s0": 16}) == site_cost(make_site(lq=16, d=8), "exact", {})
    assert site_cost(make_site(lq="2*s0"), "sparse", {}, sizes={"s0": 8}) == site_cost(make_site(lq=16), "sparse", {})
    assert site_cost(make_site(lq="Max(1, s0)"), "exact", {}, sizes={"s0": 8}) is None
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        site_cost(make_site(), "nope", {})


def test_model_cost_sums_a_stack():
    a, b = make_site(id=0, lq=16), make_site(id=1, lq=32, causal=True)
    sym = make_site(id=2, lq="s1")
    b.options = {"mode": "window", "window": 8}
    out = model_cost([(a, "exact", {}), (b, "sparse", None), (sym, "exact", {})])
    ca, cb = site_cost(a, "exact", {}), site_cost(b, "sparse", b.options)
    assert out["sites"] == [ca, cb, None] and out["unknown"] == [2]
    assert out["total"]["flops"] == ca["flops"] + cb["flops"]
    assert out["total"]["bytes"] == ca["bytes"] + cb["bytes"]
    assert out["total"]["depth"] == ca["depth"] + cb["depth"]       # layers run one after another
    assert out["total"]["peak_extra_bytes"] == max(ca["peak_extra_bytes"], cb["peak_extra_bytes"])
    full = model_cost([(a, "exact", {}), (sym, "exact", {})], sizes={"s1": 16})
    assert full["unknown"] == [] and full["total"]["flops"] == 2 * ca["flops"]
