"""The `preconditioned` variant: its two modes against formulas written out here, the
calibrated gain, κ diagnostics against numpy, gradients (C detached in output-norm), and
end to end on small HF BERT / GPT-2: rewrite, report, save/load, a training step, the CLI.
"""
from __future__ import annotations

import functools
import json
import math
import types
import warnings

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree

import attnrewrite
from attnrewrite.cli import main
from attnrewrite.variants import VARIANTS, preconditioned as P
from attnrewrite.variants.base import parse_params
from _models import save_tiny  # noqa: E402

F64 = torch.float64


# ------------------------------------------------------------ an independent reference

def hand_weights(q, k, v, mask, scale, softcap, causal):
    """(e, alive, v): e = exp(s − rowmax) over visible keys (0 elsewhere), alive = row sees a key.

    Written out without attnrewrite.variants.base: GQA by repeat_interleave, bool mask =
    keep, float mask added, causal bottom-right.
    """
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = scale * q @ k.transpose(-1, -2)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    lq, lk = s.shape[-2:]
    keep = torch.ones(s.shape, dtype=torch.bool)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = keep & mask
        else:
            s = s + mask
    if causal:
        keep = keep & torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    alive = keep.any(-1, keepdim=True)
    s = s.masked_fill(~keep, -math.inf)
    m = torch.where(alive, s.amax(-1, keepdim=True), torch.zeros((), dtype=s.dtype))
    return torch.exp(s - m), alive, v


def hand(q, k, v, mask, scale, softcap, causal, mode, gain, detach=True):
    e, alive, v = hand_weights(q, k, v, mask, scale, softcap, causal)
    one = torch.ones((), dtype=e.dtype)
    if mode == "row-equilibrate":       # e / sqrt(Σ e²): the L2-normalised weights, directly
        w = e / torch.where(alive, (e * e).sum(-1, keepdim=True).sqrt(), one)
        o = w @ v
    else:
        o = (e / torch.where(alive, e.sum(-1, keepdim=True), one)) @ v
        n = o.norm(dim=-1, keepdim=True)
        n = n.detach() if detach else n
        o = torch.where(n > 0, o / torch.where(n > 0, n, one), 0 * o)
    return o * torch.tensor(gain, dtype=o.dtype).view(1, -1, 1, 1)


def case(b=2, h=4, hkv=2, lq=5, lk=7, d=8, dtype=F64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, L, d, generator=g, dtype=dtype) for n, L in ((h, lq), (hkv, lk), (hkv, lk)))
    return [t.requires_grad_(grad) for t in (q, k, v)]


def bool_mask(b=2, lq=5, lk=7):
    m = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    m[1, :, :, lk - 2:] = False          # key padding in batch 1
    m[0, :, 2, :] = False                # query 2 of batch 0 sees no key
    return m


def additive(m):
    return torch.zeros(m.shape, dtype=F64).masked_fill(~m, torch.finfo(F64).min)


GAIN = [0.5, 1.0, 2.0, 3.0]
MASKS = {"none": lambda: None, "bool": bool_mask, "additive": lambda: additive(bool_mask())}


# ------------------------------------------------------------ the op's math

@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", P.MODES)
def test_op_matches_the_formula(mode, causal, mask):
    q, k, v = case()
    m = MASKS[mask]()
    got = P.op(q, k, v, m, 0.4, 0.0, causal, 0.0, mode, GAIN)
    want = hand(q, k, v, m, 0.4, 0.0, causal, mode, GAIN)
    assert got.shape == (2, 4, 5, 8) and not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_softcap_and_one_gain_for_all_heads():
    q, k, v = case(seed=1)
    got = P.op(q, k, v, None, 1.0, 2.5, True, 0.0, "row-equilibrate", [1.5])
    torch.testing.assert_close(got, hand(q, k, v, None, 1.0, 2.5, True, "row-equilibrate", [1.5] * 4))
    with pytest.raises(Exception, match="3 gains for 4 heads"):
        P.op(q, k, v, None, 1.0, 0.0, False, 0.0, "output-norm", [1.0, 2.0, 3.0])


def test_output_norm_rows_have_norm_g_and_dead_rows_are_zero():
    q, k, v = case(b=2, h=4, hkv=1, dtype=torch.float32)          # MQA, fp32
    m = bool_mask()
    out = P.op(q, k, v, m, 0.35, 0.0, True, 0.0, "output-norm", GAIN)
    norms = out.norm(dim=-1)                                       # (B, H, Lq)
    alive = torch.ones(2, 4, 5, dtype=torch.bool)
    alive[0, :, 2] = False
    want = torch.tensor(GAIN).view(1, 4, 1).expand(2, 4, 5)
    torch.testing.assert_close(norms[alive], want[alive], rtol=1e-6, atol=0)
    assert (out[0, :, 2] == 0).all() and not out.isnan().any()


def test_row_equilibrate_dead_rows_are_zero_and_half_precision():
    q, k, v = case(dtype=torch.float16)
    m = bool_mask()
    out = P.op(q, k, v, m, 0.35, 0.0, False, 0.0, "row-equilibrate", GAIN)
    assert out.dtype == torch.float16 and not out.isnan().any() and (out[0, :, 2] == 0).all()
    want = hand(*(t.double() for t in (q, k, v)), m, 0.35, 0.0, False, "row-equilibrate", GAIN)
    torch.testing.assert_close(out.double(), want, rtol=2e-3, atol=2e-3)


def test_dropout_acts_and_output_norm_still_normalises():
    q, k, v = case()
    torch.manual_seed(0)
    out = P.op(q, k, v, None, 0.4, 0.0, False, 0.5, "output-norm", GAIN)
    assert not torch.allclose(out, hand(q, k, v, None, 0.4, 0.0, False, "output-norm", GAIN))
    n = out.norm(dim=-1)
    nz = n > 0
    torch.testing.assert_close(n[nz], torch.tensor(GAIN, dtype=F64).view(1, 4, 1).expand_as(n)[nz])


# ------------------------------------------------------------ gradients

def test_output_norm_gradient_treats_C_as_a_constant():
    """The op's gradient is that of g·AV/stopgrad(‖AV‖), and not that of the true normalisation."""
    q, k, v = case(grad=True, seed=3)
    m = additive(bool_mask())
    m[0, :, 2, :] = 0.0                                  # no dead row here: every row has a gradient
    up = torch.randn(2, 4, 5, 8, dtype=F64, generator=torch.Generator().manual_seed(9))
    args = (m, 0.4, 0.0, True)
    got = torch.autograd.grad(P.op(q, k, v, *args, 0.0, "output-norm", GAIN), (q, k, v), up)
    want = torch.autograd.grad(hand(q, k, v, *args, "output-norm", GAIN, detach=True), (q, k, v), up)
    true = torch.autograd.grad(hand(q, k, v, *args, "output-norm", GAIN, detach=False), (q, k, v), up)
    for a, b, c in zip(got, want, true):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert (a - c).abs().max() > 1e-3            # so C really is detached


@pytest.mark.parametrize("mode", P.MODES)
def test_dead_rows_have_finite_zero_gradients(mode):
    q, k, v = case(grad=True, seed=6)
    out = P.op(q, k, v, bool_mask(), 0.4, 0.0, True, 0.0, mode, GAIN)
    gq, gk, gv = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (gq, gk, gv))
    assert (gq[0, :, 2] == 0).all() and gq[0, :, :2].abs().min() > 0


@pytest.mark.parametrize("mask", ["bool", "additive"])
def test_row_equilibrate_gradcheck(mask):
    q, k, v = case(b=1, h=2, hkv=1, lq=3, lk=4, d=3, grad=True, seed=4)
    m = MASKS[mask]()[:1, :, :3, :4]            # bool: query 2 sees no key (zero output, zero gradient)
    if mask == "additive":
        m[0, :, 2, :] = 0.0                     # a finfo.min row is uniform, and its gradient lost to round-off
    assert torch.autograd.gradcheck(
        lambda q, k, v: P.op(q, k, v, m, 0.7, 0.0, True, 0.0, "row-equilibrate", [1.0, 2.0]), (q, k, v), fast_mode=True)


# ------------------------------------------------------------ parameters, calibration

def test_params_validate():
    assert parse_params(P.NAME, P.PARAMS, {}) == {"mode": "output-norm", "gain": None}
    assert parse_params(P.NAME, P.PARAMS, {"mode": "row-equilibrate", "gain": "2"})["gain"] == 2.0
    for bad, needle in [({"mode": "bogus"}, "mode=bogus is not one of"), ({"gain": "abc"}, "not a number"),
                        ({"gain": "-1"}, "below the minimum")]:
        with pytest.raises(ValueError, match=needle):
            parse_params(P.NAME, P.PARAMS, bad)


def samples():
    out = []
    for i, (b, lq) in enumerate([(2, 5), (1, 7)]):
        q, k, v = case(b=b, lq=lq, lk=7, seed=10 + i)
        m = bool_mask(b, lq, 7) if i == 0 else additive(torch.rand(b, 1, lq, 7) > 0.3)
        out.append({"q": q * 2, "k": k, "v": v, "mask": m, "scale": 0.4, "softcap": 0.0, "causal": i == 1,
                    "dropout_p": 0.0})
    return out


@pytest.mark.parametrize("mode", P.MODES)
def test_calibrated_gain_keeps_each_heads_mean_output_norm(mode):
    ss = samples()
    opts = P.prepare(types.SimpleNamespace(heads=4), ss, {"mode": mode, "gain": None})
    assert opts["mode"] == mode and len(opts["gain"]) == 4 and all(type(g) is float for g in opts["gain"])
    json.dumps(opts)
    orig, new = [], []
    for s in ss:
        a = (s["q"], s["k"], s["v"], s["mask"], s["scale"], s["softcap"], s["causal"], 0.0)
        orig.append(VARIANTS["exact"].reference(*a).norm(dim=-1).transpose(0, 1).reshape(4, -1))
        new.append(P.op(*a, *P.op_args(None, opts)).norm(dim=-1).transpose(0, 1).reshape(4, -1))
    mo, mn = torch.cat(orig, 1).mean(1), torch.cat(new, 1).mean(1)
    torch.testing.assert_close(mn, mo, rtol=1e-6, atol=0)
    assert all(abs(g - 1) > 1e-2 for g in opts["gain"])          # the calibration did something


def test_given_gain_is_used_for_every_head():
    opts = P.prepare(types.SimpleNamespace(heads=4), samples(), {"mode": "output-norm", "gain": 2.0})
    assert opts["gain"] == [2.0] * 4
    assert P.op_args(None, opts) == ("output-norm", [2.0] * 4)


# ------------------------------------------------------------ κ diagnostics

@pytest.mark.parametrize("mode", P.MODES)
def test_kappa_matches_numpy_on_the_visible_block(mode):
    q, k, v = case(b=1, h=2, hkv=2, lq=5, lk=6, seed=5)
    m = torch.ones(1, 1, 5, 6, dtype=torch.bool)
    m[..., 5] = False                        # key 5 is seen by no row
    m[0, 0, 4, :] = False                    # query 4 sees no key
    d = P.diagnostics(q, k, v, m, 0.5, 0.0, False, {"mode": mode, "gain": [1.0, 3.0]})
    kap = d["kappa"]
    assert kap["heads"] == [0, 1] and kap["rows"] == [4, 4] and kap["cols"] == [5, 5]
    e, _, vv = hand_weights(q, k, v, m, 0.5, 0.0, False)
    a = (e / e.sum(-1, keepdim=True).clamp_min(1e-300)).numpy()
    o = a @ vv.numpy()
    for h in (0, 1):
        blk = a[0, h, :4, :5]
        c = 1 / np.linalg.norm(blk if mode == "row-equilibrate" else o[0, h, :4], axis=-1)
        assert kap["A"][h] == pytest.approx(np.linalg.cond(blk), rel=1e-8)
        assert kap["CA"][h] == pytest.approx(np.linalg.cond(c[:, None] * blk), rel=1e-8)
    want = hand(q, k, v, m, 0.5, 0.0, False, mode, [1.0, 3.0])
    ex = VARIANTS["exact"].reference(q, k, v, m, 0.5, 0.0, False, 0.0)
    assert d["output_rel_change"] == pytest.approx(((want - ex).norm() / ex.norm()).item(), rel=1e-9)
    assert d["gain"] == [1.0, 3.0] and d["mode"] == mode
    json.dumps(d)


def test_kappa_is_skipped_above_1024():
    q, k, v = case(b=1, h=2, hkv=2, lq=2, lk=1100, d=4)
    d = P.diagnostics(q, k, v, None, 0.5, 0.0, False, {"mode": "output-norm", "gain": [1.0, 1.0]})
    assert "kappa" not in d and "1024" in d["kappa_skipped"] and d["output_rel_change"] > 0


# ------------------------------------------------------------ end to end on HF models

HF = {"bert": ("BertModel", "BertConfig", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                            "intermediate_size": 128, "vocab_size": 100}, {},
               ("encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.key.weight",
                "encoder.layer.0.attention.self.value.weight")),
      "gpt2": ("GPT2Model", "GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100,
                                           "n_positions": 32, "bos_token_id": 1, "eos_token_id": 2},
               {"use_cache": False}, ("h.0.attn.c_attn.weight",))}


@functools.cache
def hf_rewritten(family: str, impl: str):
    T = pytest.importorskip("transformers")
    model_cls, config_cls, cfg, extra, _ = HF[family]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(T, model_cls)(getattr(T, config_cls)(**cfg, attn_implementation=impl)).eval()
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 5:] = 0
        kw = {"input_ids": torch.randint(3, 100, (2, 8)), "attention_mask": mask, **extra}
        res = attnrewrite.rewrite(model, "preconditioned", example_inputs={"args": (), "kwargs": kw})
    return res, kw


def first_float(out):
    return next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point())


@pytest.mark.parametrize("family,impl", [("bert", "sdpa"), ("bert", "eager"), ("gpt2", "sdpa")])
def test_hf_rewrite_report_save_load_and_train(family, impl, tmp_path):
    res, kw = hf_rewritten(family, impl)
    sites = res.report["sites"]
    assert len(sites) == 2 and all(s["status"] == "rewritten" for s in sites)
    for s in sites:
        assert s["options"]["mode"] == "output-norm" and len(s["options"]["gain"]) == 4
        assert all(g > 0 and math.isfinite(g) for g in s["options"]["gain"])
        diag = s["check"]["diagnostics"]
        assert diag["gain"] == s["options"]["gain"] and diag["output_rel_change"] > 1e-3
        assert len(diag["kappa"]["A"]) == 4 and all(x > 1 for x in diag["kappa"]["A"] + diag["kappa"]["CA"])
    json.dumps(res.report)
    ops = [n for n in res.program.graph.nodes if n.target is P.op]
    assert len(ops) == 2 and [list(n.args[-1]) for n in ops] != [[1.0] * 4] * 2

    path = tmp_path / f"{family}.pt2"
    torch.export.save(res.program, path)
    loaded = torch.export.load(path)
    assert sorted(list(n.args[-1]) for n in loaded.graph.nodes if n.target is P.op) == \
        sorted(s["options"]["gain"] for s in sites)
    with torch.no_grad():
        a, b = first_float(res.program.module()(**kw)), first_float(loaded.module()(**kw))
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    m = res.program.module()
    loss = first_float(m(**kw)).square().mean()
    loss.backward()
    params = dict(m.named_parameters())
    for name in HF[family][4]:
        g = params[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0, name


# ------------------------------------------------------------ CLI

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("pc"), 5)


def test_cli_row_equilibrate(tiny, tmp_path, capsys):
    out = tmp_path / "r.pt2"
    code = main([str(tiny), "--variant", "preconditioned", "--set", "mode=row-equilibrate", "-o", str(out), "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert code == 0 and rep["variant"] == "preconditioned"
    s = rep["sites"][0]
    assert s["status"] == "rewritten" and s["options"]["mode"] == "row-equilibrate" and len(s["options"]["gain"]) == 2
    assert "kappa" in s["check"]["diagnostics"]
    assert any(n.target is P.op for n in torch.export.load(out).graph.nodes)


@pytest.mark.parametrize("setting,needle", [("mode=bogus", "mode=bogus is not one of"),
                                            ("gain=abc", "not a number")])
def test_cli_bad_settings_are_one_line_exit_2(tiny, tmp_path, capsys, setting, needle):
    code = main([str(tiny), "--variant", "preconditioned", "--set", setting, "-o", str(tmp_path / "x.pt2")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err
