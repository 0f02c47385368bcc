"""sparse mode=heads: a pattern (window + sinks, vertical-slash, pooled blocks) and a budget per head.

Checked against exact attention where every key is kept (each pattern, masks, GQA, forward and
backward), against planted patterns (a head built as a window, as vertical-slash or as block
clusters is recognised as such), against select=pooled at the same cost, and through the three
front ends.
"""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import attnrewrite
from attnrewrite.backend import compile_backend
from attnrewrite.cli import main
from attnrewrite.variants import sparse
from attnrewrite.variants.sparse import heads
from _models import SdpaAttention  # noqa: E402
from test_onnx_speed_lowerings import BOUND, _check, _graph, _inputs, _rel, _run  # noqa: E402 - ORT against the reference

F64 = torch.float64


def run(q, k, v, mask=None, causal=False, **options):
    return sparse.reference(q, k, v, mask, q.shape[-1] ** -0.5, 0.0, causal, 0.0,
                            *sparse.op_args(None, {"mode": "heads", **options}))


def exact(q, k, v, mask=None, causal=False):
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
    if causal:
        lq, lk = s.shape[-2:]
        s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(lk - lq + 1), -math.inf)
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("pattern", [[0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 2, 2], [0, 1, 2, 1], []])
@pytest.mark.parametrize("causal,mask_kind", [(True, None), (False, "bool"), (False, "additive")])
def test_every_block_kept_is_exact_forward_and_backward(pattern, causal, mask_kind):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 45, 8, dtype=F64, requires_grad=True)
    k, v = (torch.randn(2, 2, 45, 8, dtype=F64, requires_grad=True) for _ in range(2))   # GQA 4:2
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 45, 45) > 0.3
        mask[..., 0] = True
    elif mask_kind == "additive":
        mask = torch.randn(2, 1, 1, 45, dtype=F64)
    o = dict(block=8, density=1.0, last=5, head_pattern=pattern)
    out = run(q, k, v, mask, causal, **o)
    want = exact(q, k, v, mask, causal)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    ref = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    d = sparse.diagnostics(q, k, v, mask, 8 ** -0.5, 0.0, causal, {"mode": "heads", **o})
    assert d["retained_mass_min"] == pytest.approx(1.0, abs=1e-12)
    assert d["head_pattern"] == [("window", "vslash", "blocks")[x] for x in pattern] or (
        not pattern and d["head_pattern"] == ["vslash"] * 4)


L, D, BS = 512, 576, 32


def planted(seed=0):
    """Three heads, causal, L = 512, blocks of 32, over orthonormal position codes eᵢ (so a head's
    scores are exactly what is planted, 0 elsewhere):
      head 0  a window of 24 keys + the first key, score 12;
      head 1  the key 100 back (a diagonal) + the key at 200 (a column), score 12; the other keys
              of 200's block lean away from it (score −12/31), so the block's mean hides the column;
      head 2  block clusters (queries and keys of a block share one of 6 directions, with noise).
    Every key also carries a code no query reads (scores unchanged), so each key block's keys are
    alike, as real keys are; only head 2 has noise."""
    g = torch.Generator().manual_seed(seed)
    e = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))[0].T.float()   # orthonormal codes
    i = torch.arange(L)
    common = 2 * e[L]
    band = torch.stack([e[(i - t).clamp(min=0)] for t in range(24)]).sum(0)
    q0, k0 = 12 * (band + e[0]), e[:L] + common
    q1, k1 = 12 * (e[(i - 100).clamp(min=0)] + e[200]), e[:L] + common
    col = torch.arange(200 // BS * BS, 200 // BS * BS + BS)
    k1[col[col != 200]] -= e[200] / (BS - 1)
    nb = L // BS
    centres = torch.nn.functional.normalize(torch.randn(6, D, generator=g), dim=-1)
    cluster = torch.randint(0, 6, (nb,), generator=g).repeat_interleave(BS)
    q2 = 6 * centres[cluster] + 0.3 * torch.randn(L, D, generator=g)
    k2 = centres[cluster] + 0.05 * torch.randn(L, D, generator=g)
    q, k = torch.stack([q0, q1, q2])[None] * D ** 0.25, torch.stack([k0, k1, k2])[None] * D ** 0.25
    v = torch.randn(1, 3, L, D, generator=g)
    return q, k, v


def sample(q, k):
    return [{"q": q, "k": k, "mask": None, "causal": True, "scale": D ** -0.5, "softcap": 0.0}]


def test_planted_patterns_are_recognised():
    q, k, _ = planted()
    def chosen(patterns):
        o = sparse._options({"mode": "heads", "block": BS, "density": 0.25, "patterns": patterns})
        return heads.pattern_names(heads.calibrate(sample(q, k), o)[0])
    assert chosen("window,vslash,blocks") == ["window", "vslash", "blocks"]
    assert chosen("vslash,blocks") == ["vslash", "vslash", "blocks"]   # a window is a vertical-slash too
    assert chosen("window") == ["window"] * 3
    dens = heads.calibrate(sample(q, k), sparse._options({"mode": "heads", "block": BS}))[1]
    assert len(dens) == 3 and all(0 < x <= 1 for x in dens)


def test_vslash_estimate_ranks_the_planted_column_and_diagonal_first():
    q, k, _ = planted()
    z = heads.vslash_rank(q[:, 1:2], k[:, 1:2], None, True, D ** -0.5, 0.0, BS, 64)[0, 0]   # (nq, nk)
    last = z.shape[0] - 1
    best = set(z[last].topk(3).indices.tolist())
    assert 200 // BS in best                                   # the column
    assert (last * BS + BS - 1 - 100) // BS in best or (last * BS - 100) // BS in best   # the diagonal
    # and at a query block far from the last ones, the diagonal block 100 keys back still ranks high
    assert z[8].topk(3).indices.tolist()[0] in ((8 * BS - 100) // BS, (8 * BS + BS - 1 - 100) // BS, 200 // BS)


def test_per_head_patterns_keep_more_mass_than_pooled_at_the_same_cost():
    q, k, v = planted()
    o = sparse.prepare(type("S", (), {"causal": True, "kv_len": L, "q_len": L})(), sample(q, k),
                       {"mode": "heads", "block": BS, "density": 0.25})
    assert {"head_pattern", "head_density"} <= set(o)
    dh = sparse.diagnostics(q, k, v, None, D ** -0.5, 0.0, True, o)
    dp = sparse.diagnostics(q, k, v, None, D ** -0.5, 0.0, True,
                            {"mode": "block", "block": BS, "density": 0.25, "select": "pooled"})
    assert dh["kept_keys_mean"] <= dp["kept_keys_mean"] * 1.02
    assert dh["retained_mass_mean"] > dp["retained_mass_mean"] + 0.02
    assert dh["l1_identity_gap"] < 1e-9


def test_mass_threshold_and_self_similarity_guard_on_blocks_heads():
    q, k, v = planted()
    q, k = q[:, 2:3], k[:, 2:3]
    base = sparse._options({"mode": "heads", "block": BS, "density": 0.5, "head_pattern": [2]})
    full = heads.plan(q, k, None, True, base, D ** -0.5, 0.0)["valid"].sum()
    cut = heads.plan(q, k, None, True, {**base, "mass": 0.5}, D ** -0.5, 0.0)["valid"].sum()
    assert cut < full                                          # the threshold stops early
    k2 = k.clone()
    k2[..., 3 * BS:4 * BS, :] *= torch.tensor([1.0, -1.0]).repeat(BS // 2)[:, None]   # keys unalike: mean ≈ 0
    p = heads.plan(q, k2, None, True, {**base, "mass": 0.5}, D ** -0.5, 0.0)
    kept = torch.zeros(p["idx"].shape[:-1] + (L // BS,), dtype=torch.bool).scatter_(-1, p["idx"], p["valid"])
    assert bool(kept[0, 0, 4:, 3].all())                      # kept by every query block that sees it
    assert not bool(heads._alike(k2, sparse.blocks._block_means(k2, BS), BS)[0, 0, 3])


def test_calibrated_budget_stays_within_density():
    q, k, v = planted()
    o = sparse._options({"mode": "heads", "block": BS, "density": 0.25})
    chosen, dens = heads.calibrate(sample(q, k), o)
    o = {**o, "head_pattern": chosen, "head_density": dens}
    p = heads.plan(q, k, None, True, o, D ** -0.5, 0.0)
    uniform = torch.ceil(0.25 * (p["count"] > 0).sum(-1)).sum() * 3        # ⌈density·n_I⌉ for every head
    assert p["valid"].sum() <= uniform


# ---------------------------------------------------------------- front ends

def causal_model():
    torch.manual_seed(0)
    return SdpaAttention(heads=4, head_dim=8, causal=True).eval(), torch.randn(1, 64, 32)


def test_cli_on_a_saved_program(tmp_path):
    m, x = causal_model()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(m, (x,)), str(path))
    rep = tmp_path / "r.json"
    assert main([str(path), "--variant", "sparse", "--set", "mode=heads", "--set", "block=16",
                 "--set", "density=1", "-o", str(tmp_path / "o.pt2"), "--report", str(rep)]) == 0
    site = json.loads(rep.read_text())["sites"][0]
    assert site["status"] == "rewritten" and site["check"]["rel_err"] <= 1e-5
    assert len(site["options"]["head_pattern"]) == 4 and len(site["options"]["head_density"]) == 4
    assert main([str(path), "--variant", "sparse", "--set", "mode=heads", "--set", "block=16",
                 "--set", "density=0.25", "--set", "patterns=window,blocks", "-o", str(tmp_path / "o2.pt2"),
                 "--report", str(rep), "--overwrite"]) == 0
    site = json.loads(rep.read_text())["sites"][0]
    assert set(site["options"]["head_pattern"]) <= {0, 2}
    assert site["check"]["diagnostics"]["retained_mass_min"] < 1 and site["check"]["rel_err"] > 1e-4
    assert main([str(path), "--variant", "sparse", "--set", "mode=heads", "--set", "patterns=diagonal"]) == 2


def test_onnx_front_end(tmp_path):
    m, x = causal_model()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), str(path), input_names=["x"], dynamo=True, opset_version=18)
    for density in (1.0, 0.5):
        r = attnrewrite.rewrite(str(path), "sparse", example_inputs={"x": x.numpy()}, mode="heads", block=16,
                                density=density)
        site = r.report["sites"][0]
        assert site["status"] == "rewritten", site
        assert len(site["options"]["head_pattern"]) == 4
        assert (site["check"]["rel_err"] <= 1e-5) == (density == 1.0), site["check"]


HEADS = {  # id: (options, lq, lk, extra keywords) — the lowering in onnxruntime against the reference
    "mixed-causal-gqa": ({"block": 8, "density": 0.4, "last": 5, "head_pattern": [0, 1, 2, 1]}, 45, 45,
                         {"causal": True, "heads": 4, "kv_heads": 2}),
    "bidirectional": ({"block": 8, "density": 0.4, "last": 7, "head_pattern": [1, 0]}, 40, 40, {}),
    "cross": ({"block": 8, "density": 0.5, "head_pattern": [1, 2]}, 30, 45, {"causal": True}),
    "mass-guard": ({"block": 8, "density": 1.0, "mass": 0.5, "head_pattern": [2, 2]}, 37, 37, {"causal": True}),
    "softcap": ({"block": 8, "density": 0.3, "head_pattern": [2, 1], "head_density": [0.2, 0.5]}, 41, 41,
                {"causal": True, "softcap": 2.0}),
}


@pytest.mark.parametrize("config", HEADS)
def test_onnx_lowering_matches_reference(config):
    opts, lq, lk, kw = HEADS[config]
    assert _check(sparse, {"mode": "heads", **opts}, lq, lk, **kw) <= BOUND


@pytest.mark.parametrize("density,exact_limit", [(1.0, True), (0.25, False)])
def test_onnx_lowering_keeping_every_block_is_exact(density, exact_limit):
    o = {"mode": "heads", "block": 8, "density": density, "head_pattern": [0, 1]}
    feeds = _inputs(37, 37)
    got = next(iter(_run(_graph(sparse, o, 37, 37, causal=True), feeds).values()))
    t = [torch.from_numpy(feeds[k]) for k in ("q", "k", "v")]
    want = attnrewrite.variants.exact.reference(*t, None, 0.3, 0.0, True, 0.0).numpy()
    assert (_rel(want, got) <= BOUND) == exact_limit


def test_compile_backend():
    m, x = causal_model()
    torch._dynamo.reset()
    backend = compile_backend("sparse", mode="heads", block=16, density=1.0)
    with torch.no_grad():
        want, got = m(x), torch.compile(m, backend=backend)(x)
    assert backend.sites_rewritten == 1
    assert len(backend.reports[0]["sites"][0]["options"]["head_pattern"]) == 4
    assert (got - want).abs().max() <= 1e-5


def test_heads_with_unlike_budgets_run_apart_and_agree_with_one_head_at_a_time():
    """Per-head budgets put heads in groups (compute._head_groups); each head's output and gradients
    are what the op gives that head alone."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 4, 70, 8, dtype=F64, requires_grad=True) for _ in range(3))
    o = dict(block=8, density=0.3, last=6, head_pattern=[0, 1, 2, 1], head_density=[0.1, 0.6, 1.0, 0.3])
    plan = heads.plan(q.detach(), k.detach(), None, True, sparse._options({"mode": "heads", **o}), 8 ** -0.5, 0.0)
    assert len(sparse.compute._head_groups(plan, 4)) >= 3
    out = run(q, k, v, None, True, **o)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for h in range(4):
        one = dict(o, head_pattern=[o["head_pattern"][h]], head_density=[o["head_density"][h]])
        qs, ks, vs = (x[:, h:h + 1].detach().requires_grad_() for x in (q, k, v))
        want = run(qs, ks, vs, None, True, **one)
        torch.testing.assert_close(out[:, h:h + 1], want, atol=1e-12, rtol=0)
        for a, b in zip(grads, torch.autograd.grad(want, (qs, ks, vs), g[:, h:h + 1])):
            torch.testing.assert_close(a[:, h:h + 1], b, atol=1e-12, rtol=0)
