"""The sparse variant: exact limits, the L1 identity, masks, window sets, memory, gradients, end to end.

Everything is checked against an independent dense computation written here: scores with
the mask and (bottom-right) causal bias, the dense softmax row pᵢ, the keep set Ωᵢ built
from the documented rules by plain loops, qᵢ = pᵢ·1_Ω / mᵢ. The op's own weights are read
back by feeding one-hot values (v = I: output row i *is* the op's qᵢ).
"""
from __future__ import annotations

import contextlib
import json
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import attnrewrite
from attnrewrite.cli import main
from attnrewrite.variants import VARIANTS, exact, sparse
from attnrewrite.variants.base import parse_params
from _models import save_tiny  # noqa: E402

F64 = torch.float64


def run_op(q, k, v, mask=None, scale=0.5, /, *, softcap=0.0, causal=False, dropout_p=0.0, **options):
    return sparse.op(q, k, v, mask, scale, softcap, causal, dropout_p, *sparse.op_args(None, options))


# ---------------------------------------------------------------- the independent dense computation

def dense(q, k, mask, scale, causal, softcap=0.0):
    """(scores, p) in float64: every key, the mask, the causal bias j <= i + Lk − Lq."""
    q, k = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    lq, lk = s.shape[-2:]
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(lk - lq + 1), -math.inf)
    s = s.expand(q.shape[0], q.shape[1], lq, lk)
    p = torch.softmax(s, -1).nan_to_num(0.0)                 # dead rows: zeros
    return s, p


def omega(s, p, causal, mode, k=64, window=256, sinks=4, band="auto", block=64, density=0.25, mass=1.0):
    """Ωᵢ by the documented rules, with loops (B, H, Lq, Lk) bool."""
    bsz, h, lq, lk = s.shape
    out = torch.zeros(s.shape, dtype=torch.bool)
    if mode == "topk":
        idx = s.argsort(dim=-1, descending=True, stable=True)[..., :min(k, lk)]
        return out.scatter(-1, idx, True)
    if mode == "window":
        backward = band == "backward" or (band == "auto" and causal)
        for i in range(lq):
            ip = i + lk - lq
            for j in range(lk):
                inside = (ip - window < j <= ip) if backward else abs(j - ip) <= window // 2
                out[..., i, j] = (inside or j < sinks) and (not causal or j <= ip)
        return out
    for bb in range(bsz):                                   # block
        for hh in range(h):
            for r0 in range(0, lq, block):
                rows = slice(r0, r0 + block)
                live_rows = (s[bb, hh, rows] > -math.inf).any(-1).sum().item()
                blocks = [(p[bb, hh, rows, c0:c0 + block].sum().item(), c0) for c0 in range(0, lk, block)]
                n_vis = sum((s[bb, hh, rows, c0:c0 + block] > -math.inf).any().item() for _, c0 in blocks)
                budget = max(1, math.ceil(density * n_vis))
                got = 0.0
                for rank, (m, c0) in enumerate(sorted(blocks, key=lambda t: -t[0])):
                    if rank >= budget or (mass < 1 and got >= mass * live_rows):
                        break
                    out[bb, hh, rows, c0:c0 + block] = True
                    got += m
    return out


def renormalised(p, om):
    """qᵢ = pᵢ restricted to Ωᵢ over mᵢ (zeros where mᵢ = 0), and mᵢ."""
    m = (p * om).sum(-1)
    return torch.where(om, p, 0.0) / m.clamp(min=1e-300)[..., None], m


def rand_qkv(b, h, hkv, lq, lk, d, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g, dtype=dtype), torch.randn(b, hkv, lk, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, lk, d, generator=g, dtype=dtype))


def one_hot_v(b, hkv, lk):
    return torch.eye(lk, dtype=F64).expand(b, hkv, lk, lk)


def make_mask(kind, b, h, lq, lk, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "padding":                                    # (B, 1, 1, Lk): right padding per batch row
        keep = torch.ones(b, 1, 1, lk, dtype=torch.bool)
        keep[-1, ..., max(1, lk // 2):] = False
        return keep
    if kind == "bool":                                       # (B, 1, Lq, Lk), one fully masked row
        keep = torch.rand(b, 1, lq, lk, generator=g) > 0.3
        keep[0, 0, 0] = False
        return keep
    bias = torch.randn(1, h, lq, lk, generator=g, dtype=F64)  # additive, per head (T5-like), some -inf
    bias[..., 0, :] = -math.inf
    return bias.masked_fill(torch.rand(1, h, lq, lk, generator=g) < 0.2, -math.inf)


EXACT = {"topk": {"k": 10_000}, "window": {"window": 10_000, "sinks": 0}, "block": {"block": 3, "density": 1.0}}
SMALL = {"topk": {"k": 2}, "window": {"window": 3, "sinks": 1}, "block": {"block": 2, "density": 0.4}}


# ---------------------------------------------------------------- exact limits

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (F64, 1e-12)])
@pytest.mark.parametrize("mode", ["topk", "window", "block"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", ["none", "bool", "additive", "padding"])
def test_exact_limit_matches_exact(dtype, tol, mode, causal, mask):
    q, k, v = rand_qkv(2, 4, 2, 7, 9, 8, dtype)
    m = make_mask(mask, 2, 4, 7, 9)
    m = m.to(dtype) if m is not None and m.is_floating_point() else m
    want = exact.reference(q, k, v, m, 0.4, 0.0, causal, 0.0)
    got = run_op(q, k, v, m, 0.4, causal=causal, mode=mode, **EXACT[mode])
    assert not got.isnan().any()
    assert (got - want).abs().max().item() <= tol
    # k-style params are clamped: k = Lk exactly is the same op as k = 10 000
    if mode == "topk":
        assert torch.equal(run_op(q, k, v, m, 0.4, causal=causal, k=9), got)


def test_window_default_band_is_exact_at_full_width():
    # backward needs window >= Lk; two-sided window // 2 >= max(Lq, Lk) − 1 (here Lq > Lk)
    q, k, v = rand_qkv(1, 2, 2, 12, 5, 4)
    for causal, w in ((True, 5), (False, 2 * 12)):
        want = exact.reference(q, k, v, None, 0.3, 0.0, causal, 0.0)
        got = run_op(q, k, v, None, 0.3, causal=causal, mode="window", window=w, sinks=0)
        assert (got - want).abs().max().item() <= 1e-12
    narrow = run_op(q, k, v, None, 0.3, causal=True, mode="window", window=4, sinks=0)
    assert (narrow - exact.reference(q, k, v, None, 0.3, 0.0, True, 0.0)).abs().max() > 1e-3


def test_half_inputs_computed_in_fp32():
    q, k, v = rand_qkv(1, 2, 1, 16, 16, 8, torch.float16)
    got = run_op(q, k, v, mode="topk", k=4)
    want = run_op(q.float(), k.float(), v.float(), mode="topk", k=4)
    assert got.dtype == torch.float16 and (got.float() - want).abs().max() < 2e-3


# ---------------------------------------------------------------- the identity and the retained mass

@pytest.mark.parametrize("mode", ["topk", "window", "block"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1 << 20, 1])           # one chunk, or the smallest chunks allowed
def test_weights_identity_and_diagnostics_against_dense(monkeypatch, mode, causal, chunk):
    monkeypatch.setattr(sparse.scores, "CHUNK_ELEMENTS", chunk)
    b, h, hkv, lq, lk = 2, 4, 2, 9, 11
    q, k, _ = rand_qkv(b, h, hkv, lq, lk, 8, seed=1)
    mask = make_mask("padding", b, h, lq, lk)
    opts = {"mode": mode, **SMALL[mode]}
    s, p = dense(q, k, mask, 0.6, causal)
    om = omega(s, p, causal, **opts)
    want_q, m = renormalised(p, om)
    got_q = run_op(q, k, one_hot_v(b, hkv, lk), mask, 0.6, causal=causal, **opts)  # the op's qᵢ
    assert (got_q - want_q).abs().max().item() <= 1e-12
    live = (s > -math.inf).any(-1)
    ok = live & (m > 0)
    l1 = (p - got_q).abs().sum(-1)
    assert (l1 - 2 * (1 - m))[ok].abs().max().item() <= 1e-12      # ‖p − q‖₁ = 2(1 − m)
    assert m[live].min() < 0.99                                     # the small setting really drops mass
    d = sparse.diagnostics(q, k, None, mask, 0.6, 0.0, causal, opts)
    json.dumps(d)
    mm = torch.where(live, m, math.inf)
    assert d["retained_mass_min"] == pytest.approx(m[live].min().item(), abs=1e-12)
    assert d["retained_mass_mean"] == pytest.approx(m[live].mean().item(), abs=1e-12)
    assert d["retained_mass_min_per_head"] == pytest.approx(mm.amin((0, 2)).tolist(), abs=1e-12)
    assert d["l1_identity_gap"] <= 1e-12
    assert d["kept_keys_mean"] == pytest.approx((om & (s > -math.inf)).sum().item() / live.sum().item())


def test_exact_setting_reports_full_mass():
    q, k, _ = rand_qkv(1, 2, 1, 6, 6, 4)
    d = sparse.diagnostics(q, k, None, None, 0.5, 0.0, True, {"mode": "topk", "k": 6})
    assert d["retained_mass_min"] == pytest.approx(1.0, abs=1e-12) and d["kept_keys_mean"] == pytest.approx(3.5)


# ---------------------------------------------------------------- masks

@pytest.mark.parametrize("mode", ["topk", "window", "block"])
def test_fully_masked_rows_give_zeros_not_nan(mode):
    q, k, v = rand_qkv(2, 2, 1, 5, 6, 4)
    mask = torch.ones(2, 1, 5, 6, dtype=torch.bool)
    mask[0, 0, 2] = False                       # one row sees nothing
    add = torch.zeros(2, 1, 5, 6, dtype=F64).masked_fill(~mask, -math.inf)
    for m in (mask, add):
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out = run_op(qg, kg, vg, m, 0.5, mode=mode, **SMALL[mode])
        assert not out.isnan().any() and out[0, :, 2].abs().max() == 0
        assert out[0, :, 1].abs().max() > 0
        out.sum().backward()
        assert all(not t.grad.isnan().any() for t in (qg, kg, vg))
    # causal with Lq > Lk: the first rows have no visible key
    q2 = torch.randn(1, 2, 8, 4, dtype=F64)
    out = run_op(q2, k[:1], v[:1], None, 0.5, causal=True, mode=mode, **SMALL[mode])
    assert out[:, :, :2].abs().max() == 0 and not out.isnan().any()


def test_topk_never_picks_a_masked_key_over_a_visible_one():
    q, k, v = rand_qkv(1, 1, 1, 4, 8, 4)
    k[..., 5, :] = q[0, 0, 0] * 10              # key 5 would win every row ...
    mask = torch.ones(1, 1, 1, 8, dtype=torch.bool)
    mask[..., 5] = False                        # ... but it is masked
    w = run_op(q, k, one_hot_v(1, 1, 8), mask, 1.0, mode="topk", k=3)
    assert (w[..., 5] == 0).all() and ((w > 0).sum(-1) == 3).all()
    assert torch.allclose(w.sum(-1), torch.ones(1, 1, 4, dtype=F64))


def test_dropout_applies_to_renormalised_weights():
    q, k, v = rand_qkv(1, 1, 1, 4, 8, 4)
    assert run_op(q, k, v, None, 0.5, dropout_p=1.0, k=3).abs().max() == 0
    torch.manual_seed(0)
    w = run_op(q, k, one_hot_v(1, 1, 8), None, 0.5, dropout_p=0.5, k=3)
    base = run_op(q, k, one_hot_v(1, 1, 8), None, 0.5, k=3)
    kept = w != 0
    assert torch.allclose(w[kept], 2 * base[kept])          # survivors scaled by 1/(1 − p)


# ---------------------------------------------------------------- window sets

@pytest.mark.parametrize("lq,lk", [(10, 10), (4, 10), (10, 6)])
@pytest.mark.parametrize("causal,band", [(True, "auto"), (False, "auto"), (False, "backward"), (True, "two-sided")])
@pytest.mark.parametrize("window,sinks", [(3, 0), (4, 2), (1, 4)])
def test_window_keeps_exactly_the_documented_keys(lq, lk, causal, band, window, sinks):
    q = torch.randn(1, 1, lq, 4, dtype=F64) * 0.01           # near-uniform: every kept key has weight > 0
    k = torch.randn(1, 1, lk, 4, dtype=F64)
    w = run_op(q, k, one_hot_v(1, 1, lk), None, 1.0, causal=causal, mode="window", window=window,
               sinks=sinks, band=band)
    got = w[0, 0] > 0
    want = torch.zeros(lq, lk, dtype=torch.bool)
    for i in range(lq):
        ip = i + lk - lq                                      # bottom-right alignment
        for j in range(lk):
            if band == "backward" or (band == "auto" and causal):
                inside = ip - window < j <= ip                # `window` keys ending at the diagonal
            else:
                inside = abs(j - ip) <= window // 2           # two-sided band
            want[i, j] = (inside or j < sinks) and (not causal or j <= ip)
    assert torch.equal(got, want), (got.int(), want.int())
    assert torch.allclose(w.sum(-1)[0, 0][want.any(-1)], torch.ones(int(want.any(-1).sum()), dtype=F64))


# ---------------------------------------------------------------- property tests

@st.composite
def cases(draw):
    hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    return dict(b=draw(st.integers(1, 2)), hkv=hkv, h=hkv * group, lq=draw(st.integers(1, 12)),
                lk=draw(st.integers(1, 12)), d=draw(st.sampled_from([2, 5])), causal=draw(st.booleans()),
                mask=draw(st.sampled_from(["none", "bool", "additive", "padding"])),
                mode=draw(st.sampled_from(["topk", "window", "block"])), seed=draw(st.integers(0, 1000)),
                k=draw(st.integers(1, 6)), window=draw(st.integers(1, 6)), sinks=draw(st.integers(0, 3)),
                band=draw(st.sampled_from(["auto", "backward", "two-sided"])), block=draw(st.integers(1, 5)),
                density=draw(st.sampled_from([0.2, 0.5, 1.0])), mass=draw(st.sampled_from([0.5, 0.9, 1.0])),
                chunk=draw(st.sampled_from([1, 40, 1 << 20])), softcap=draw(st.sampled_from([0.0, 1.5])))


@contextlib.contextmanager
def chunk_elements(n):
    old, sparse.scores.CHUNK_ELEMENTS = sparse.scores.CHUNK_ELEMENTS, n
    try:
        yield
    finally:
        sparse.scores.CHUNK_ELEMENTS = old


@settings(max_examples=25, deadline=None)
@given(cases())
def test_property_exact_limit(c):
    q, k, v = rand_qkv(c["b"], c["h"], c["hkv"], c["lq"], c["lk"], c["d"], seed=c["seed"])
    mask = make_mask(c["mask"], c["b"], c["h"], c["lq"], c["lk"], c["seed"])
    want = exact.reference(q, k, v, mask, 0.5, c["softcap"], c["causal"], 0.0)
    opts = dict(EXACT[c["mode"]], block=c["block"]) if c["mode"] == "block" else EXACT[c["mode"]]
    with chunk_elements(c["chunk"]):
        got = run_op(q, k, v, mask, 0.5, softcap=c["softcap"], causal=c["causal"], mode=c["mode"], **opts)
    assert (got - want).abs().max().item() <= 1e-12


@settings(max_examples=25, deadline=None)
@given(cases())
def test_property_identity_and_weights(c):
    q, k, _ = rand_qkv(c["b"], c["h"], c["hkv"], c["lq"], c["lk"], c["d"], seed=c["seed"])
    mask = make_mask(c["mask"], c["b"], c["h"], c["lq"], c["lk"], c["seed"])
    keys = {"topk": ("k",), "window": ("window", "sinks", "band"), "block": ("block", "density", "mass")}
    opts = {"mode": c["mode"], **{key: c[key] for key in keys[c["mode"]]}}
    s, p = dense(q, k, mask, 0.5, c["causal"], c["softcap"])
    want_q, m = renormalised(p, omega(s, p, c["causal"], **opts))
    with chunk_elements(c["chunk"]):
        got_q = run_op(q, k, one_hot_v(c["b"], c["hkv"], c["lk"]), mask, 0.5, softcap=c["softcap"],
                       causal=c["causal"], **opts)
        diag = sparse.diagnostics(q, k, None, mask, 0.5, c["softcap"], c["causal"], opts)
    assert (got_q - want_q).abs().max().item() <= 1e-12
    live = (s > -math.inf).any(-1)
    ok = live & (m > 0)
    if ok.any():
        assert ((p - got_q).abs().sum(-1) - 2 * (1 - m))[ok].abs().max().item() <= 1e-12
        assert diag["l1_identity_gap"] <= 1e-12
    if live.any():
        assert diag["retained_mass_min"] == pytest.approx(m[live].min().item(), abs=1e-12)
        assert diag["retained_mass_mean"] == pytest.approx(m[live].mean().item(), abs=1e-12)


# ---------------------------------------------------------------- memory

class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel())
        return out


@pytest.mark.parametrize("mode,opts", [("topk", {"k": 32}), ("window", {"window": 64}),
                                       ("block", {"block": 16, "density": 0.25})])
def test_no_n_by_n_tensor(monkeypatch, mode, opts):
    n, d = 4096, 16
    monkeypatch.setattr(sparse.scores, "CHUNK_ELEMENTS", 1 << 18)   # 64 query rows × 4096 keys per chunk
    q, k, v = (torch.randn(1, 1, n, d, requires_grad=True) for _ in range(3))
    pad = torch.ones(1, 1, 1, n, dtype=torch.bool)
    pad[..., -100:] = False
    args = sparse.op_args(None, {"mode": mode, **opts})
    with MaxNumel() as rec:
        out = sparse.reference(q, k, v, pad, d ** -0.5, 0.0, True, 0.0, *args)
        out.sum().backward()
        diag = sparse.diagnostics(q, k, v, pad, d ** -0.5, 0.0, True, {"mode": mode, **opts})
    assert rec.max <= n * n // 64, rec.max                    # the largest tensor: one chunk of rows
    assert out.shape == (1, 1, n, d) and q.grad is not None and not q.grad.isnan().any()
    assert 0 < diag["retained_mass_min"] < 1


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("mode", ["topk", "window", "block"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(mode, causal):
    q, k, v = rand_qkv(1, 2, 1, 4, 5, 2, seed=3)
    mask = make_mask("padding", 1, 2, 4, 5)
    args = sparse.op_args(None, {"mode": mode, **SMALL[mode]})

    def f(q, k, v):
        return sparse.op(q, k, v, mask, 0.7, 0.0, causal, 0.0, *args)
    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_() for t in (q, k, v)))


# ---------------------------------------------------------------- params and ladders

def test_params_validate_and_ladders_end_exact():
    good = parse_params("sparse", sparse.PARAMS, {"mode": "block", "density": "0.5", "mass": 1})
    assert good["density"] == 0.5 and good["k"] == 64 and good["sinks"] == 4
    for bad, needle in [({"mode": "dense"}, "not one of"), ({"k": 0}, "below the minimum"),
                        ({"density": 0}, "(0, 1]"), ({"mass": 1.5}, "(0, 1]"), ({"kk": 1}, "unknown option"),
                        ({"window": "wide"}, "not an integer")]:
        with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("]", r"\]")):
            parse_params("sparse", sparse.PARAMS, bad)

    class Site:
        kv_len, q_len, causal = 100, 100, False
    steps = sparse.auto_ladder(Site, {"mode": "topk"})
    assert [s["k"] for s in steps] == [4, 8, 16, 32, 64, 100]
    assert sparse.auto_ladder(Site, {"mode": "window", "band": "backward"})[-1] == {"window": 100}
    assert sparse.auto_ladder(Site, {"mode": "window", "band": "two-sided"})[-1] == {"window": 200}
    assert sparse.auto_ladder(Site, {"mode": "block"})[-1] == {"density": 1.0, "mass": 1.0}
    Site.kv_len = "s0"                                        # symbolic: a generous ladder, exact at run time
    assert sparse.auto_ladder(Site, {"mode": "topk"})[-1]["k"] >= 1 << 20
    assert VARIANTS["sparse"] is sparse.VARIANT and sparse.op is torch.ops.attnrewrite.sparse_attention.default


# ---------------------------------------------------------------- end to end on transformers models

@pytest.fixture(scope="module")
def hf():
    T = pytest.importorskip("transformers")
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    am = torch.ones(2, 8, dtype=torch.long)
    am[1, 5:] = 0                                             # right padding in batch row 1
    std = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100)
    out = {}
    for name, model, cfg, kw, impl, extra in [
            ("bert", "BertModel", "BertConfig", std, "eager", {}),
            ("llama", "LlamaModel", "LlamaConfig", {**std, "num_key_value_heads": 2}, "sdpa", {"use_cache": False})]:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = getattr(T, model)(getattr(T, cfg)(**kw, attn_implementation=impl)).eval()
            out[name] = torch.export.export(m, (), {"input_ids": ids, "attention_mask": am, **extra}, strict=False)
    return out


@pytest.mark.parametrize("model,opts", [("bert", {}), ("llama", {"mode": "window", "window": 8, "sinks": 0}),
                                        ("bert", {"mode": "block", "block": 4, "density": 1.0})])
def test_end_to_end_exact_limit(hf, model, opts):
    rep = attnrewrite.rewrite(hf[model], "sparse", **opts).report
    assert len(rep["sites"]) == 2 and rep["check"]["rel_err"] <= 1e-5
    for s in rep["sites"]:
        assert s["status"] == "rewritten" and s["check"]["rel_err"] <= 1e-5
        assert s["check"]["diagnostics"]["retained_mass_min"] == pytest.approx(1.0, abs=1e-9)
    if model == "llama":                                       # causal by its mask: the band looks back
        assert rep["sites"][0]["options"] == {"mode": "window", "window": 8, "sinks": 0, "band": "backward"}
    if not opts:                                               # default k = 64 clamped to kv_len
        assert rep["sites"][0]["options"] == {"mode": "topk", "k": 8}


def test_end_to_end_small_k_saves_and_loads(hf, tmp_path):
    r = attnrewrite.rewrite(hf["llama"], "sparse", k=2)
    for s in r.report["sites"]:
        d = s["check"]["diagnostics"]
        assert s["kv_heads"] == 2 and d["retained_mass_min"] < d["retained_mass_mean"] < 1
        assert len(d["retained_mass_min_per_head"]) == 4 and d["l1_identity_gap"] < 1e-6
        assert s["check"]["rel_err"] > 1e-3
    assert r.report["check"]["passed"] is None                 # approximate variants are not gated
    torch.export.save(r.program, tmp_path / "s.pt2")
    loaded = torch.export.load(tmp_path / "s.pt2")
    ops = [n.target for n in loaded.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.attnrewrite.sparse_attention.default) == 2
    kw = {k: v for k, v in hf["llama"].example_inputs[1].items()}
    a, b = r.program.module()(**kw), loaded.module()(**kw)
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, rtol=0, atol=0)


def test_end_to_end_auto_picks_the_cheapest_k_within_tolerance(hf):
    loose = attnrewrite.rewrite(hf["bert"], "sparse", tolerance=0.05, auto=True).report
    assert loose["check"]["passed"] is True and loose["check"]["rel_err"] <= 0.05
    assert any(s["options"]["k"] < 8 for s in loose["sites"])               # a cheaper rung than exact
    tight = attnrewrite.rewrite(hf["bert"], "sparse", tolerance=1e-6, auto=True).report
    assert [s["options"] for s in tight["sites"]] == [{"mode": "topk", "k": 8}] * 2   # the exact rung
    assert tight["check"]["rel_err"] <= 1e-6


# ---------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("sparse"), 12)


def test_cli_window(tiny, capsys, tmp_path):
    code = main([str(tiny), "--variant", "sparse", "--set", "mode=window", "--set", "window=8",
                 "-o", str(tmp_path / "w.pt2"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rep = json.loads(out)
    site = rep["sites"][0]
    assert site["options"] == {"mode": "window", "window": 8, "sinks": 4, "band": "two-sided"}
    assert 0 < site["check"]["diagnostics"]["retained_mass_min"] < 1   # 12 keys, band of 9 + sinks
    ops = [n.target for n in torch.export.load(tmp_path / "w.pt2").graph.nodes]
    assert torch.ops.attnrewrite.sparse_attention.default in ops


@pytest.mark.parametrize("pair,needle", [("kk=3", "unknown option 'kk'"), ("mode=dense", "not one of"),
                                         ("k=0", "below the minimum"), ("density=0", "not in (0, 1]"),
                                         ("window=wide", "not an integer")])
def test_cli_bad_set_is_one_line_exit_2(tiny, capsys, tmp_path, pair, needle):
    code = main([str(tiny), "--variant", "sparse", "--set", pair, "-o", str(tmp_path / "x.pt2")])
    _, err = capsys.readouterr()
    assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err


# ---------------------------------------------------------------- select=pooled and budget=global

def pooled_omega(q, k, s, mask, scale, causal, block, density, k_top=None):
    """Ω for select=pooled by the documented rule, with loops: rank key blocks by
    scale·q̄_I·k̄_J + mean bias + log(visible pairs); keep ⌈density·n_I⌉ (topk: at least
    ⌈k/b⌉ + 1, then the k best scores among their keys)."""
    bsz, h, lq, lk = s.shape
    k = k.repeat_interleave(h // k.shape[1], 1)
    out = torch.zeros(s.shape, dtype=torch.bool)
    bias = torch.zeros(s.shape, dtype=F64)
    if mask is not None and mask.dtype != torch.bool:
        bias = torch.where(s > -math.inf, mask.double().expand(s.shape), 0.0)
    for bb in range(bsz):
        for hh in range(h):
            for r0 in range(0, lq, block):
                rows = slice(r0, r0 + block)
                qbar = q[bb, hh, rows].double().mean(0)
                ranked, n_vis = [], 0
                for c0 in range(0, lk, block):
                    vis = (s[bb, hh, rows, c0:c0 + block] > -math.inf).sum().item()
                    n_vis += vis > 0
                    z = scale * qbar @ k[bb, hh, c0:c0 + block].double().mean(0)
                    z = z + (bias[bb, hh, rows, c0:c0 + block].sum() / vis + math.log(vis) if vis else -math.inf)
                    ranked.append((-z, c0))
                budget = math.ceil(density * n_vis)
                if k_top is not None:
                    budget = max(budget, -(-k_top // block) + 1)
                budget = max(1, min(budget, n_vis))
                for z, c0 in sorted(ranked)[:budget]:
                    if z < math.inf:
                        out[bb, hh, rows, c0:c0 + block] = True
            if k_top is not None:                             # the k best scores among the candidates
                cand = s[bb, hh].masked_fill(~out[bb, hh], -math.inf)
                idx = cand.argsort(dim=-1, descending=True, stable=True)[:, :k_top]
                keep = torch.zeros(lq, lk, dtype=torch.bool).scatter(-1, idx, True)
                out[bb, hh] = keep & (cand > -math.inf)
    return out


@pytest.mark.parametrize("mode", ["block", "topk"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", ["none", "bool", "additive", "padding"])
@pytest.mark.parametrize("chunk", [1, 1 << 20])
def test_pooled_exact_limit_and_weights(monkeypatch, mode, causal, mask, chunk):
    monkeypatch.setattr(sparse.scores, "CHUNK_ELEMENTS", chunk)
    b, h, hkv, lq, lk = 2, 4, 2, 9, 11
    q, k, v = rand_qkv(b, h, hkv, lq, lk, 8, seed=2)
    m = make_mask(mask, b, h, lq, lk)
    full = {"block": 3, "density": 1.0} if mode == "block" else {"k": 11, "block": 2, "density": 0.1}
    got = run_op(q, k, v, m, 0.4, causal=causal, mode=mode, select="pooled", **full)
    assert (got - exact.reference(q, k, v, m, 0.4, 0.0, causal, 0.0)).abs().max().item() <= 1e-12
    small = {"block": 2, "density": 0.4} if mode == "block" else {"k": 2, "block": 2, "density": 0.3}
    s, p = dense(q, k, m, 0.4, causal)
    om = pooled_omega(q, k, s, m, 0.4, causal, small["block"], small["density"], small.get("k"))
    want_q, mm = renormalised(p, om)
    got_q = run_op(q, k, one_hot_v(b, hkv, lk), m, 0.4, causal=causal, mode=mode, select="pooled", **small)
    assert (got_q - want_q).abs().max().item() <= 1e-12
    live = (s > -math.inf).any(-1)
    d = sparse.diagnostics(q, k, None, m, 0.4, 0.0, causal, {"mode": mode, "select": "pooled", **small})
    assert d["retained_mass_mean"] == pytest.approx(mm[live].mean().item(), abs=1e-12)
    assert d["l1_identity_gap"] <= 1e-12 and mm[live].min() < 0.99


def separated(b, h, n, d, block, seed=0):
    """q and k whose rows are constant within each block (plus 1e-3 noise) and far apart across
    blocks, so the pooled logit orders key blocks as their exact softmax mass does."""
    g = torch.Generator().manual_seed(seed)
    nb = n // block
    qb, kb = torch.randn(b, h, nb, d, generator=g, dtype=F64) * 3, torch.randn(b, h, nb, d, generator=g, dtype=F64) * 3
    noise = lambda: 1e-3 * torch.randn(b, h, n, d, generator=g, dtype=F64)  # noqa: E731
    return (qb.repeat_interleave(block, 2) + noise(), kb.repeat_interleave(block, 2) + noise(),
            torch.randn(b, h, n, d, generator=g, dtype=F64))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("opts", [{"mode": "block", "block": 4, "density": 0.25},
                                  {"mode": "block", "block": 4, "density": 0.5, "mass": 0.9},
                                  {"mode": "topk", "k": 3, "block": 4, "density": 0.25}])
def test_pooled_selection_equals_exact_on_separated_blocks(causal, opts):
    q, k, v = separated(1, 3, 32, 6, 4)
    got = run_op(q, k, v, None, 1.0, causal=causal, select="pooled", **opts)
    want = run_op(q, k, v, None, 1.0, causal=causal, select="exact", **opts)
    if opts["mode"] == "block":
        assert (got - want).abs().max().item() <= 1e-12
    else:                                   # topk: the exact top k lie in the pooled candidates
        assert (got - want).abs().max().item() <= 1e-12
    assert (want - exact.reference(q, k, v, None, 1.0, 0.0, causal, 0.0)).abs().max() > 1e-3   # truly sparse


@pytest.mark.parametrize("opts", [{"mode": "block", "block": 16, "density": 0.25, "select": "pooled"},
                                  {"mode": "topk", "k": 32, "block": 16, "density": 0.25, "select": "pooled"},
                                  {"mode": "block", "block": 16, "density": 0.25, "head_density": [0.1]}])
def test_no_n_by_n_tensor_new_paths(monkeypatch, opts):
    n, d = 1024, 16
    monkeypatch.setattr(sparse.scores, "CHUNK_ELEMENTS", 1 << 14)   # 16 query rows × 1024 keys per chunk
    q, k, v = (torch.randn(1, 1, n, d, requires_grad=True) for _ in range(3))
    pad = torch.ones(1, 1, 1, n, dtype=torch.bool)
    pad[..., -100:] = False
    with MaxNumel() as rec:
        out = sparse.reference(q, k, v, pad, d ** -0.5, 0.0, True, 0.0, *sparse.op_args(None, opts))
        out.sum().backward()
    assert rec.max <= n * n // 64, rec.max                    # the largest tensor: one chunk of rows
    assert out.shape == (1, 1, n, d) and not q.grad.isnan().any()


@pytest.mark.parametrize("opts", [{"mode": "block", "block": 2, "density": 0.4, "select": "pooled"},
                                  {"mode": "topk", "k": 2, "block": 2, "density": 0.3, "select": "pooled"},
                                  {"mode": "block", "block": 2, "density": 0.4, "head_density": [0.3, 0.7]}])
def test_gradcheck_new_paths(opts):
    q, k, v = rand_qkv(1, 2, 1, 5, 5, 2, seed=3)
    mask = make_mask("padding", 1, 2, 5, 5)
    args = sparse.op_args(None, opts)
    for causal in (False, True):
        def f(q, k, v):
            return sparse.op(q, k, v, mask, 0.7, 0.0, causal, 0.0, *args)
        assert torch.autograd.gradcheck(f, tuple(t.detach().requires_grad_() for t in (q, k, v)))


def kept_blocks(q, k, mask, causal, block, opts):
    """Blocks the op keeps, read from its weights: (near-uniform q) a kept visible key has weight > 0."""
    lk = k.shape[-2]
    w = run_op(q, k, one_hot_v(k.shape[0], k.shape[1], lk), mask, 1.0, causal=causal, mode="block",
               block=block, **opts)
    nb = -(-lk // block)
    rows = F.pad(F.pad(w > 0, (0, nb * block - lk)), (0, 0, 0, -q.shape[-2] % block))
    return rows.view(*rows.shape[:2], -1, block, nb, block).any(-1).any(-2).sum().item()


def two_sites(shapes, g):
    """share_budget's inputs for sites of 4 heads, head 0 peaked … head 3 nearly uniform."""
    seen, planned = {}, {}
    for sid, (n, causal) in enumerate(shapes):
        q = torch.randn(1, 4, n, 8, generator=g, dtype=F64) * torch.tensor([3.0, 1.0, 0.5, 0.01]).view(1, 4, 1, 1)
        k = torch.randn(1, 4, n, 8, generator=g, dtype=F64)
        seen[sid] = (SimpleNamespace(id=sid), [{"q": q, "k": k, "v": k, "mask": None, "scale": 1.0, "softcap": 0.0,
                                                "causal": causal, "dropout_p": 0.0}])
        planned[sid] = {"mode": "block", "block": 8, "density": 0.25, "mass": 1.0, "budget": "global"}
    return seen, sparse.share_budget(planned, seen)


def test_global_budget_hits_the_density():
    seen, shared = two_sites([(64, True), (40, False)], torch.Generator().manual_seed(5))
    kept = 0
    for sid, (_, (smp,)) in seen.items():
        hd = shared[sid]["head_density"]
        assert len(hd) == 4 and max(hd) > min(hd)                        # not the same density per head
        tiny = smp["q"] * 1e-6                                          # near-uniform: every kept key weighs > 0
        kept += kept_blocks(tiny, smp["k"], None, smp["causal"], 8, {"density": 0.25, "head_density": hd})
    visible = (8 * 9 // 2 + 5 * 5) * 4                                  # causal 8 query blocks; 5 × 5 blocks
    # never above the target; below it by less than one block in each query block of one head
    assert 0.25 * visible - 8 < kept <= 0.25 * visible, (kept, visible)


def test_global_budget_keeps_more_mass_than_uniform():
    # both sites: 0.25 of 8 (or 4) key blocks is a whole number, so uniform keeps the same total
    seen, shared = two_sites([(64, False), (32, False)], torch.Generator().manual_seed(6))
    mass, kept = {"global": 0.0, "uniform": 0.0}, {"global": 0, "uniform": 0}
    for sid, (_, (smp,)) in seen.items():
        for name, o in (("global", {"head_density": shared[sid]["head_density"]}), ("uniform", {})):
            diag = sparse.diagnostics(smp["q"], smp["k"], None, None, 1.0, 0.0, False,
                                      {"mode": "block", "block": 8, "density": 0.25, **o})
            mass[name] += diag["retained_mass_mean"]
            kept[name] += kept_blocks(smp["q"] * 1e-6, smp["k"], None, False, 8, {"density": 0.25, **o})
    assert kept["global"] <= kept["uniform"] and mass["global"] > mass["uniform"] + 0.01, (mass, kept)


def test_end_to_end_global_budget(hf):
    rep = attnrewrite.rewrite(hf["bert"], "sparse", mode="block", block=2, density=0.5, budget="global").report
    for s in rep["sites"]:
        assert s["status"] == "rewritten" and s["options"]["budget"] == "global"
        assert len(s["options"]["head_density"]) == 4 and all(0 < x <= 1 for x in s["options"]["head_density"])
    exact_rung = sparse.auto_ladder(SimpleNamespace(kv_len=8, q_len=8, causal=False), rep["sites"][0]["options"])[-1]
    assert exact_rung == {"density": 1.0, "mass": 1.0, "head_density": []}


def test_auto_tune_with_global_budget(hf):
    """auto=true with budget=global: every rung scales the shared per-head densities by the same
    factor (d / density); a tight tolerance ends on the exact rung, a loose one on the cheapest."""
    kw = dict(mode="block", block=2, density=0.5, budget="global")
    planned = {s["id"]: s["options"]["head_density"]
               for s in attnrewrite.rewrite(hf["bert"], "sparse", check=False, **kw).report["sites"]}
    for tol, density in ((1e-6, 1.0), (10.0, 1 / 16)):
        rep = attnrewrite.rewrite(hf["bert"], "sparse", tolerance=tol, auto=True, **kw).report
        assert rep["check"]["passed"] is True and rep["check"]["rel_err"] <= tol
        for s in rep["sites"]:
            o = s["options"]
            assert s["status"] == "rewritten" and o["budget"] == "global" and o["density"] == density
            want = [] if density == 1.0 else [min(1.0, x * density / 0.5) for x in planned[s["id"]]]
            assert o["head_density"] == pytest.approx(want)
    assert rep["check"]["rel_err"] > 1e-3             # the cheapest rung is not exact
