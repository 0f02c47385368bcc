"""The implementation table: each fast path against the reference on the normal forms it takes,
forward and backward; which implementation each case takes and why; the compile backend's
lowering (no Python op left in the graph Inductor compiles); the AOTInductor round trip."""
from __future__ import annotations

import math

import pytest
import torch

import attnrewrite
import attnrewrite.io
from attnrewrite import backend as B
from attnrewrite.variants import exact, flex, impl, sparse
from attnrewrite.variants.base import IMPLEMENTATIONS

EXACT = torch.ops.attnrewrite.exact_attention
SPARSE = torch.ops.attnrewrite.sparse_attention
WINDOW = ("window", 64)            # mode, top_k; then window, sinks, band, block, density, mass, select, head_density


def _mask(kind, b, h, lq, lk, dtype):
    g = torch.Generator().manual_seed(3)
    if kind == "boolean":
        m = torch.rand(b, 1, lq, lk, generator=g) > 0.3
        m[0, 0, 1] = False                         # a row with no visible key: zeros, not NaN
        return m
    if kind == "additive":
        return torch.randn(1, h, lq, lk, generator=g, dtype=dtype)
    if kind == "key":
        m = torch.zeros(b, 1, 1, lk, dtype=dtype)
        m[..., -3:] = -math.inf
        return m
    return None


def _qkv(b, h, hkv, lq, lk, d, dtype, grad=False):
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(b, h, lq, d, generator=g).to(dtype), torch.randn(1, hkv, lk, d, generator=g).to(dtype),
         torch.randn(1, hkv, lk, d, generator=g).to(dtype)]
    return [x.requires_grad_() for x in t] if grad else t


def _grads(fn, q, k, v, *rest):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves, *rest)
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape).to(out.dtype))
    return out.detach(), [x.grad for x in leaves]


EXACT_CASES = [  # b, h, hkv, lq, lk, causal, mask
    (2, 4, 4, 9, 9, False, None), (2, 4, 2, 9, 9, True, None), (2, 4, 1, 5, 11, True, "boolean"),
    (1, 2, 2, 11, 5, True, "additive"), (2, 2, 2, 1, 12, True, None), (2, 4, 2, 7, 7, False, "key"),
    (2, 2, 2, 8, 8, True, "boolean"),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("case", EXACT_CASES)
def test_exact_sdpa_matches_reference_forward_and_backward(case, dtype, tol):
    b, h, hkv, lq, lk, causal, kind = case
    q, k, v = _qkv(b, h, hkv, lq, lk, 16, dtype)
    mask = _mask(kind, b, h, lq, lk, dtype)
    args = (mask, 0.3, 0.0, causal, 0.0)
    assert impl.describe(IMPLEMENTATIONS["exact_attention"], (q, k, v, *args))["impl"] == "sdpa-cpu"
    with impl.counting() as calls:
        out, grads = _grads(EXACT, q, k, v, *args)
    assert calls == {"sdpa-cpu": 1}
    ref, ref_grads = _grads(exact.reference, q, k, v, *args)
    assert not out.isnan().any()
    assert (out - ref).abs().max() <= tol
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() <= 10 * tol
    if kind == "boolean":
        assert (out[0, :, 1] == 0).all()            # the dead row


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exact_sdpa_half_precision_within_half_rounding(dtype):
    q, k, v = _qkv(2, 4, 2, 33, 33, 32, dtype)
    mask = _mask("boolean", 2, 4, 33, 33, dtype)
    out = EXACT(q, k, v, mask, 32 ** -0.5, 0.0, True, 0.0)
    ref = exact.reference(q.double(), k.double(), v.double(), mask, 32 ** -0.5, 0.0, True, 0.0)
    assert out.dtype == dtype and float((out.double() - ref).abs().max()) <= 2e-2


def test_softcap_runs_the_reference_and_says_why():
    q, k, v = _qkv(1, 2, 2, 6, 6, 8, torch.float32)
    d = impl.describe(IMPLEMENTATIONS["exact_attention"], (q, k, v, None, 0.3, 5.0, True, 0.0))
    assert d["impl"] == "reference" and "soft-cap" in d["impl_reason"]
    with impl.counting() as calls:
        out = EXACT(q, k, v, None, 0.3, 5.0, True, 0.0)
    assert calls == {"reference": 1}
    assert torch.equal(out, exact.reference(q, k, v, None, 0.3, 5.0, True, 0.0))


def test_exact_dropout_replays_from_its_seed():
    """Same seed, same output; the backward recomputes the same dropout mask, so its gradient is
    the gradient of the forward that ran (compared with SDPA's own autograd under the same seed)."""
    q, k, v = _qkv(1, 2, 2, 16, 16, 8, torch.float32)
    seed = torch.tensor(1234)
    a = EXACT(q, k, v, None, 0.3, 0.0, True, 0.5, seed)
    b = EXACT(q, k, v, None, 0.3, 0.0, True, 0.5, seed)
    c = EXACT(q, k, v, None, 0.3, 0.0, True, 0.5, torch.tensor(99))
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain = EXACT(q, k, v, None, 0.3, 0.0, True, 0.0)
    assert float((a - plain).abs().max()) > 0.1    # dropout did act
    out, grads = _grads(EXACT, q, k, v, None, 0.3, 0.0, True, 0.5, seed)
    from attnrewrite.variants.base import seeded_rng
    with seeded_rng(1234, "cpu"):
        ref, ref_grads = _grads(exact.sdpa, q, k, v, None, 0.3, 0.0, True, 0.5)
    assert torch.equal(out, ref)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-6)


# ---------------------------------------------------------------- sparse window on FlexAttention

@pytest.fixture
def small_flex(monkeypatch):
    """FlexAttention at test sizes: no length threshold, 16-row blocks (so blocks are partial,
    full and skipped within a few dozen rows)."""
    monkeypatch.setattr(sparse.compute, "FLEX_MIN_KEYS", 1)
    monkeypatch.setattr(flex, "BLOCK", 16)


WINDOW_CASES = [  # lq, lk, h, hkv, causal, mask, band, window, sinks, softcap
    (40, 40, 4, 2, True, None, "auto", 8, 2, 0.0),
    (33, 50, 2, 2, True, "boolean", "auto", 7, 0, 0.0),
    (50, 33, 2, 1, False, "additive", "auto", 12, 3, 0.0),
    (45, 45, 2, 2, False, None, "two-sided", 10, 1, 5.0),
]


@pytest.mark.slow                  # a FlexAttention compile per case (~10 s each on 2 cores)
@pytest.mark.parametrize("case", WINDOW_CASES)
def test_window_on_flex_matches_reference(case, small_flex):
    lq, lk, h, hkv, causal, kind, band, window, sinks, cap = case
    q, k, v = _qkv(2, h, hkv, lq, lk, 16, torch.float32)
    mask = _mask(kind, 2, h, lq, lk, torch.float32)
    args = (q, k, v, mask, 0.3, cap, causal, 0.0, *WINDOW, window, sinks, band, 64, 0.25, 1.0, "exact", [])
    assert impl.describe(IMPLEMENTATIONS["sparse_attention"], args)["impl"] == "flex-cpu"
    with impl.counting() as calls:
        out = SPARSE(*args)
    assert calls == {"flex-cpu": 1}
    ref = sparse.reference(*args)
    assert float((out - ref).abs().max()) <= 2e-6
    # the full-window limit is exact attention
    args_full = (*args[:10], 2 * max(lq, lk) + 2, *args[11:])
    assert float((SPARSE(*args_full) - exact.reference(*args[:8])).abs().max()) <= 2e-6


@pytest.mark.slow
def test_window_backward_on_cpu_recomputes_with_the_reference(small_flex):
    q, k, v = _qkv(1, 2, 2, 40, 40, 16, torch.float32)
    rest = (None, 0.3, 0.0, True, 0.0, *WINDOW, 8, 2, "auto", 64, 0.25, 1.0, "exact", [])
    with impl.counting() as calls:
        out, grads = _grads(SPARSE, q, k, v, *rest)
    assert calls == {"flex-cpu": 1}
    ref, ref_grads = _grads(sparse.reference, q, k, v, *rest)
    assert float((out - ref).abs().max()) <= 2e-6
    for g, r in zip(grads, ref_grads):
        assert float((g - r).abs().max()) <= 1e-5


def test_window_below_the_threshold_and_other_modes_say_why():
    q, k, v = _qkv(1, 2, 2, 40, 40, 16, torch.float32)
    table = IMPLEMENTATIONS["sparse_attention"]
    short = impl.describe(table, (q, k, v, None, 0.3, 0.0, True, 0.0, *WINDOW, 8, 2, "auto", 64, 0.25, 1.0,
                                  "exact", []))
    assert short["impl"] == "reference" and f"below {sparse.compute.FLEX_MIN_KEYS}" in short["impl_reason"]
    topk = impl.describe(table, (q, k, v, None, 0.3, 0.0, True, 0.0, "topk", 8, 8, 2, "auto", 64, 0.25, 1.0,
                                 "exact", []))
    assert topk["impl"] == "reference" and "mode=topk" in topk["impl_reason"]


# ---------------------------------------------------------------- the compile backend and AOTInductor

class _Causal(torch.nn.Module):
    def __init__(self, d=32, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


def test_backend_lowers_exact_to_sdpa_with_no_python_op_left():
    torch.manual_seed(0)
    m, x = _Causal().eval(), torch.randn(1, 24, 32)
    backend = attnrewrite.compile_backend("exact")
    seen = []

    def spy(gm, example_inputs):                     # what the backend hands Inductor
        seen.append(gm)
        return torch._inductor.compile_fx.compile_fx(gm, example_inputs)

    import attnrewrite.backend as B
    original = B.compile_fx
    B.compile_fx = lambda gm, inputs, **kw: spy(gm, inputs)
    try:
        with torch.no_grad():
            y = torch.compile(m, backend=backend)(x)
    finally:
        B.compile_fx = original
    with torch.no_grad():
        assert torch.allclose(y, m(x), atol=1e-6)
    report = backend.reports[-1]
    assert list(report["lowered"].values()) == ["sdpa-cpu"]
    assert [s["impl"] for s in report["sites"]] == ["sdpa-cpu"]
    targets = [str(n.target) for n in seen[0].graph.nodes if n.op == "call_function"]
    assert not any("attnrewrite" in t for t in targets)         # the op is gone from what Inductor compiles
    assert sum("lowered" in t for t in targets) == 1


def test_backend_keeps_an_op_without_a_traceable_implementation():
    torch.manual_seed(0)
    m, x = _Causal().eval(), torch.randn(1, 24, 32)
    backend = attnrewrite.compile_backend("sparse", mode="topk", k=4)
    with torch.no_grad():
        torch.compile(m, backend=backend)(x)
    (lowered,) = backend.reports[-1]["lowered"].values()
    assert lowered.startswith("kept: reference") and "mode=topk" in lowered


@pytest.mark.slow                  # an AOTInductor C++ build
def test_rewritten_program_round_trips_through_aotinductor(tmp_path):
    torch.manual_seed(0)
    m, x = _Causal().eval(), torch.randn(1, 24, 32)
    ep = torch.export.export(m, (x,))
    program = attnrewrite.rewrite(ep, "exact", example_inputs=(x,)).program
    torch.export.save(program, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2")
    assert any("attnrewrite.exact_attention" in str(n.target) for n in loaded.graph.nodes)   # swappable
    lowered = attnrewrite.lower(loaded)
    assert not any("attnrewrite" in str(n.target) for n in lowered.graph.nodes)
    pkg = torch._inductor.aoti_compile_and_package(lowered, package_path=str(tmp_path / "m.aoti.pt2"))
    runner = torch._inductor.aoti_load_package(pkg)
    with torch.no_grad():
        assert torch.allclose(runner(x), m(x), atol=1e-5)


def test_an_option_the_mode_ignores_is_an_error():
    with pytest.raises(attnrewrite.io.InputError, match="window applies to mode=window, not mode=topk"):
        attnrewrite.compile_backend(variant="sparse", window=16)
    with pytest.raises(attnrewrite.io.InputError, match="k applies to mode=topk, not mode=block"):
        attnrewrite.rewrite(torch.export.export(_Causal().eval(), (torch.randn(1, 8, 32),)), "sparse",
                            mode="block", k=3)
    assert attnrewrite.compile_backend(variant="sparse", mode="window", window=16).options["window"] == 16


@pytest.mark.parametrize("variant,options", [("exact", {}),
                                             pytest.param("sparse", {"mode": "window", "window": 8},
                                                          marks=pytest.mark.slow)])
def test_backend_when_the_length_turns_dynamic(variant, options, small_flex):
    """A second length makes Dynamo recompile with a symbolic length: exact still lowers to SDPA
    (is_causal only where Lq == Lk is known), and window keeps the op, which runs FlexAttention
    at the call's real sizes from inside the compiled graph. Outputs equal the backend's eager
    run (the op's reference)."""
    torch._dynamo.reset()              # Dynamo remembers a code object's dynamic sizes across tests
    torch.manual_seed(0)
    m = _Causal().eval()
    backend = attnrewrite.compile_backend(variant, **options)
    compiled = torch.compile(m, backend=backend)
    flex_calls = []
    for n in (24, 40):
        x = torch.randn(1, n, 32)
        with torch.no_grad(), impl.counting() as calls:
            y = compiled(x)
            want = torch.compile(m, backend=attnrewrite.compile_backend(variant, inner="eager", **options))(x)
        assert float((y - want).abs().max()) <= 1e-5
        flex_calls.append(calls.get("flex-cpu", 0))
    assert len(backend.reports) == 2                       # one static graph, then one dynamic
    first, second = (list(r["lowered"].values()) for r in backend.reports)
    if variant == "exact":
        assert first == second == ["sdpa-cpu"]
    else:
        assert first == ["flex-cpu"]                       # static sizes: lowered into the graph
        assert second[0].startswith("kept:") and "symbolic" in second[0]
        assert flex_calls[1] >= 1                          # the kept op ran FlexAttention itself


def test_backend_falls_back_to_the_ops_when_inductor_refuses_the_flex_form(small_flex, monkeypatch):
    import attnrewrite.backend as B
    real, calls = B.compile_fx, []

    def refusing(gm, inputs, **kw):
        calls.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        if kw.get("config_patches"):                   # the FlexAttention form
            raise RuntimeError("template refused")
        return real(gm, inputs, **kw)

    monkeypatch.setattr(B, "compile_fx", refusing)
    torch._dynamo.reset()
    torch.manual_seed(0)
    m, x = _Causal().eval(), torch.randn(1, 24, 32)
    backend = attnrewrite.compile_backend("sparse", mode="window", window=8)
    with torch.no_grad(), pytest.warns(UserWarning, match="template refused"):
        y = torch.compile(m, backend=backend)(x)
        want = torch.compile(m, backend=attnrewrite.compile_backend("sparse", inner="eager", mode="window",
                                                                    window=8))(x)
    assert float((y - want).abs().max()) <= 1e-5
    (lowered,) = backend.reports[-1]["lowered"].values()
    assert lowered.startswith("kept: Inductor could not compile") and "template refused" in lowered
    assert len(calls) == 2 and any("sparse_attention" in t for t in calls[1])     # the op is back in the graph


@pytest.mark.parametrize("min_keys,at_example", [(1, "flex-cpu"), (1024, "reference (flex: 40 keys: below 1024")])
def test_a_kept_op_of_symbolic_sizes_says_its_implementation_is_chosen_at_run_time(min_keys, at_example,
                                                                                   small_flex, monkeypatch):
    """The lowering decides on symbolic sizes, where FlexAttention cannot build its block layout; the
    op it keeps still takes FlexAttention per call wherever the real sizes allow, so the label must
    not read "kept: reference" alone. (Inductor and the compiled FlexAttention are not needed here:
    the backend's graph and FlexAttention both run eagerly.)"""
    monkeypatch.setattr(sparse.compute, "FLEX_MIN_KEYS", min_keys)
    monkeypatch.setattr(B, "compile_fx", lambda gm, inputs, **kw: gm)
    monkeypatch.setattr(flex, "_compiled", lambda: torch.nn.attention.flex_attention.flex_attention)
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = _Causal().eval()
    backend = attnrewrite.compile_backend("sparse", mode="window", window=8)
    compiled = torch.compile(m, backend=backend)
    for n in (24, 40):
        x = torch.randn(1, n, 32)
        with torch.no_grad(), impl.counting() as calls:
            y = compiled(x)
        ref = torch.compile(m, backend=attnrewrite.compile_backend("sparse", inner="eager", mode="window",
                                                                   window=8))
        with torch.no_grad():
            assert float((y - ref(x)).abs().max()) <= 1e-5
    (static,), (dynamic,) = (list(r["lowered"].values()) for r in backend.reports)
    assert static == "flex-cpu" if min_keys == 1 else static.startswith("kept: reference (flex: 24 keys")
    assert dynamic.startswith(f"kept: chosen per call at run time (sizes are symbolic); at the example's sizes: "
                              f"{at_example}"), dynamic
    assert calls.get("flex-cpu", 0) == (1 if min_keys == 1 else 0)      # what the kept op ran at n = 40
    assert calls.get("reference", 0) == (0 if min_keys == 1 else 1)
