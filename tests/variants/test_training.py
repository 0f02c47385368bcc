"""Training through the variant ops: gradcheck, the backward ops, and dropout replayed by seed.

Every case is small and in float64; k/v have one head for two query heads (GQA), so the
backward op's dk/dv are checked at their own, un-expanded shape.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnrewrite.variants import VARIANTS, base, conv_basis, exact, impl, preconditioned, sparse
from _models import SdpaAttention  # noqa: E402 - pytest puts tests/ on the path

F64 = torch.float64
L, D, SCALE, P = 8, 4, 0.6, 0.3

# case id: (variant module, its op arguments) — each at a setting where it is not exact attention
CASES = {
    "exact": (exact, ()),
    "sparse-topk": (sparse, sparse.op_args(None, {"mode": "topk", "k": 3})),
    "sparse-window": (sparse, sparse.op_args(None, {"mode": "window", "window": 3, "sinks": 1})),
    "sparse-block": (sparse, sparse.op_args(None, {"mode": "block", "block": 2, "density": 0.5})),
    "conv-basis": (conv_basis, conv_basis.op_args(None, {"k": 3, "eps": 0.0})),
    "precond-output-norm": (preconditioned, preconditioned.op_args(None, {"mode": "output-norm", "gain": [0.7, 1.3]})),
    "precond-row-equilibrate": (preconditioned, preconditioned.op_args(None, {"mode": "row-equilibrate",
                                                                               "gain": [1.1]})),
}

# output-norm's gradient holds C = 1/‖AV‖ constant by design (test_preconditioned checks that),
# so finite differences, which move C too, cannot agree with it
NOT_THE_TRUE_GRADIENT = {"precond-output-norm"}


def qkv(seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    shapes = ((1, 2, L, D), (1, 1, L, D), (1, 1, L, D))
    return tuple(torch.randn(s, generator=g, dtype=F64).requires_grad_(grad) for s in shapes)


def padding_mask():
    """Key-only (the form conv-basis represents without falling back): the last two keys removed."""
    m = torch.ones(1, 1, 1, L, dtype=torch.bool)
    m[..., -2:] = False
    return m


def call(case, q, k, v, mask=None, causal=False, dropout_p=0.0, **kw):
    mod, params = CASES[case]
    return mod.op(q, k, v, mask, SCALE, 0.0, causal, dropout_p, *params, **kw)


def test_backward_ops_are_registered():
    for mod in VARIANTS.values():
        assert base.BACKWARD_OPS[mod.OP_NAME] is mod.backward_op
        assert mod.backward_op is getattr(torch.ops.attnrewrite, f"{mod.OP_NAME}_backward").default
        seed, out_map = mod.op._schema.arguments[-2:]
        assert seed.name == "dropout_seed" and seed.has_default_value()
        assert out_map.name == "out_map" and out_map.has_default_value()


def test_cases_are_not_exact():
    q, k, v = qkv(grad=False)
    want = call("exact", q, k, v)
    for case in CASES:
        if case != "exact":
            assert (call(case, q, k, v) - want).abs().max() > 1e-3, case


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_gradcheck(case, masked, causal):
    if case in NOT_THE_TRUE_GRADIENT:
        pytest.skip("gradient treats the preconditioner as a constant")
    mask = padding_mask() if masked else None
    assert torch.autograd.gradcheck(lambda q, k, v: call(case, q, k, v, mask, causal), qkv(seed=1), fast_mode=True)


@pytest.mark.parametrize("dropout_p", [0.0, P])
@pytest.mark.parametrize("case", CASES)
def test_backward_op_is_the_autograd_gradient(case, dropout_p):
    mod, params = CASES[case]
    q, k, v = qkv(seed=2)
    mask, seed = padding_mask(), torch.tensor(7)
    out = call(case, q, k, v, mask, True, dropout_p, dropout_seed=seed)
    up = torch.randn(out.shape, dtype=F64)
    want = torch.autograd.grad(out, (q, k, v), up)
    got = mod.backward_op(up, q, k, v, mask, SCALE, 0.0, True, dropout_p, *params, dropout_seed=seed)
    assert [g.shape for g in got] == [q.shape, k.shape, v.shape]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("dropout_p", [0.0, P])
@pytest.mark.parametrize("case", CASES)
def test_gradient_is_the_references(case, dropout_p):
    """The op's gradient is autograd through the implementation it runs here (exact: SDPA; the
    others at this size: their eager reference) on the seeded generator."""
    mod, params = CASES[case]
    q, k, v = qkv(seed=10)
    mask, seed = padding_mask(), torch.tensor(4)
    out = call(case, q, k, v, mask, False, dropout_p, dropout_seed=seed)
    args = (q, k, v, mask, SCALE, 0.0, False, dropout_p, *params)
    chosen, _ = impl.choose(base.IMPLEMENTATIONS[mod.OP_NAME], args)
    assert chosen.name == ("sdpa" if case == "exact" else "reference")
    with base.seeded_rng(seed, q.device):
        ref = chosen.run(*args)
    assert torch.equal(out, ref)
    up = torch.randn(out.shape, dtype=F64)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up)):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("case", CASES)
def test_dropout_is_a_function_of_the_seed(case):
    q, k, v = qkv(seed=3, grad=False)
    s1, s2 = torch.tensor(11), torch.tensor(12)
    state = torch.get_rng_state()
    a = call(case, q, k, v, None, False, P, dropout_seed=s1)
    assert torch.equal(torch.get_rng_state(), state)          # the caller's stream is untouched
    assert torch.equal(a, call(case, q, k, v, None, False, P, dropout_seed=s1))
    assert not torch.equal(a, call(case, q, k, v, None, False, P, dropout_seed=s2))
    assert not torch.equal(a, call(case, q, k, v))            # dropout is active


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_gradcheck_with_dropout(case, causal):
    """Passes only if the backward replays the forward's mask: the op with a fixed seed is a pure function."""
    if case in NOT_THE_TRUE_GRADIENT:
        pytest.skip("gradient treats the preconditioner as a constant")
    seed, mask = torch.tensor(5), padding_mask()
    assert torch.autograd.gradcheck(
        lambda q, k, v: call(case, q, k, v, mask, causal, P, dropout_seed=seed), qkv(seed=4), fast_mode=True)


def test_sparse_chunks_replay_their_masks(monkeypatch):
    """One query row per checkpointed chunk: each chunk's recompute must see its own mask."""
    monkeypatch.setattr(sparse.scores, "CHUNK_ELEMENTS", 1)
    seed = torch.tensor(9)
    for case in ("sparse-topk", "sparse-window", "sparse-block"):
        assert torch.autograd.gradcheck(
            lambda q, k, v: call(case, q, k, v, None, True, P, dropout_seed=seed), qkv(seed=5), fast_mode=True), case


def test_exact_dropout_is_the_seeded_mask():
    q, k, v = qkv(seed=6, grad=False)
    mask = padding_mask()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(21)
        s = SCALE * q @ k.repeat_interleave(2, 1).transpose(-1, -2)
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
        dropped = F.dropout(p, P, training=True)
    want = dropped @ v.repeat_interleave(2, 1)
    assert 0 < (dropped[..., :-2] == 0).float().mean() < 1       # some weights dropped, not all
    got = call("exact", q, k, v, mask, False, P, dropout_seed=torch.tensor(21))
    torch.testing.assert_close(got, want)


def test_conv_basis_dropout_falls_back_to_seeded_exact():
    q, k, v = qkv(seed=7)
    seed = torch.tensor(3)
    got = call("conv-basis", q, k, v, padding_mask(), True, P, dropout_seed=seed)
    want = call("exact", q, k, v, padding_mask(), True, P, dropout_seed=seed)
    assert torch.equal(got, want)
    up = torch.randn(got.shape, dtype=F64)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), up), torch.autograd.grad(want, (q, k, v), up)):
        assert torch.equal(g, w)


@pytest.mark.parametrize("case", CASES)
def test_old_call_shape_without_a_seed(case):
    """Programs that predate dropout_seed call the op without it: same forward and gradient at dropout_p = 0."""
    q, k, v = qkv(seed=8)
    out = call(case, q, k, v, padding_mask(), True)
    assert torch.equal(out, call(case, q, k, v, padding_mask(), True, dropout_seed=torch.tensor(1)))
    (gq, gk, gv) = torch.autograd.grad(out.sum(), (q, k, v))
    assert gq.shape == q.shape and gk.shape == k.shape and torch.isfinite(gv).all()


def test_dropout_without_a_seed_runs_forward_and_refuses_backward():
    q, k, v = qkv(seed=9)
    torch.manual_seed(0)
    a = call("exact", q, k, v, None, False, P)
    torch.manual_seed(0)
    assert torch.equal(a, call("exact", q, k, v, None, False, P))   # drawn from the global RNG
    with pytest.raises(NotImplementedError, match="dropout_seed"):
        a.sum().backward()
    with pytest.raises(NotImplementedError, match="dropout_seed"):
        exact.backward_op(torch.ones_like(a), q, k, v, None, SCALE, 0.0, False, P)


@pytest.mark.parametrize("case", ["exact", "sparse-topk", "conv-basis", "precond-row-equilibrate"])
def test_opcheck(case):
    """Schema, fake impls, autograd registration and AOT tracing of both ops, dropout on and seeded;
    the backward op also under a dispatch mode (opcheck's schema check runs it inside one)."""
    mod, params = CASES[case]
    q, k, v = qkv(seed=11)
    args, seed = (padding_mask(), SCALE, 0.0, True, P, *params), {"dropout_seed": torch.tensor(2)}
    torch.library.opcheck(mod.op, (q, k, v, *args), seed)
    up = torch.randn(q.shape, dtype=F64)
    torch.library.opcheck(mod.backward_op, (up, *(t.detach() for t in (q, k, v)), *args), seed)


# ---------------------------------------------------------------- a saved, rewritten .pt2 trains, dropout included

@pytest.mark.parametrize("variant,options", [("exact", {}), ("sparse", {"mode": "topk", "k": 3})])
def test_saved_pt2_with_active_dropout_trains_and_replays_its_mask(tmp_path, variant, options):
    import attnrewrite
    torch.manual_seed(0)
    m, x = SdpaAttention(dropout=0.5).train(), torch.randn(2, 8, 16)
    ep = torch.export.export(m, (x,))
    res = attnrewrite.rewrite(ep, variant, **options)
    site = res.sites[0]
    assert site.status == "rewritten" and site.dropout == 0.5 and site.check == {"unchecked": "dropout active"}
    torch.export.save(res.program, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    calls = [n for n in loaded.graph.nodes if n.op == "call_function" and "attnrewrite" in str(n.target)]
    assert len(calls) == 1
    w = dict(loaded.named_parameters())["qkv.weight"]

    def loss_and_grad(seed):
        torch.manual_seed(seed)
        out = loaded(x)
        (g,) = torch.autograd.grad(out.square().sum(), [w])
        return out.detach(), g

    (a, ga), (b, gb), (c, _) = loss_and_grad(1), loss_and_grad(1), loss_and_grad(2)
    assert torch.equal(a, b) and torch.equal(ga, gb) and not torch.equal(a, c)
    with torch.no_grad():
        assert (a - m.eval()(x)).abs().max() > 1e-2            # dropout really changed the output
    # the gradient is the gradient of the function the forward computed: a finite difference
    # along a random direction, with the same seed (hence the same mask) on both sides
    d = torch.randn_like(w)
    with torch.no_grad():
        def f(t):
            w.copy_(t)
            torch.manual_seed(1)
            return loaded(x).square().sum().double()
        w0 = w.detach().clone()
        eps = 1e-3
        fd = (f(w0 + eps * d) - f(w0 - eps * d)) / (2 * eps)
        w.copy_(w0)
    assert abs(fd.item() - (ga * d).sum().item()) <= 2e-2 * max(1.0, abs(fd.item()))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_out_map_is_applied_per_head_and_differentiated(name):
    """The optional per-head output map (calibration): out·X_h per head, and its gradient."""
    mod = VARIANTS[name]
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    x = torch.randn(2, 4, 4, dtype=torch.float64)
    params = mod.op_args(None, base.parse_params(name, mod.PARAMS, {})) if name != "preconditioned" \
        else ("output-norm", [1.0, 1.0])
    plain = mod.op(q, k, v, None, 0.5, 0.0, False, 0.0, *params)
    mapped = mod.op(q, k, v, None, 0.5, 0.0, False, 0.0, *params, out_map=x.flatten().tolist())
    assert torch.allclose(mapped, torch.einsum("bhqd,hde->bhqe", plain, x), atol=1e-12)
    f = lambda q, k, v: mod.op(q, k, v, None, 0.5, 0.0, False, 0.0, *params, out_map=x.flatten().tolist())
    if name != "preconditioned":          # output-norm's normaliser is constant in its gradient on purpose
        assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)
    g1 = torch.autograd.grad(mapped.sum(), (q, k, v))
    g2 = torch.autograd.grad(torch.einsum("bhqd,hde->bhqe", plain, x).sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g1, g2))
