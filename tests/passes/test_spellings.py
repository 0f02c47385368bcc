"""Attention spellings: every way a model writes softmax(scale·q·kᵀ + bias)·v is one site.

Each positive case is a small nn.Module exported with `torch.export.export(strict=False)`,
checked on the training IR and on core ATen (`run_decompositions()`): the exact site
count, the site's fields, and that the exact rewrite reproduces the model to 1e-5.
Each negative case is a softmax that is not attention: zero sites.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnrewrite
from attnrewrite import pipeline

B, H, L, D = 2, 4, 6, 8
HKV = 2
LK = 10
SD = 1.0 / math.sqrt(D)
NEG = float("-inf")
FMIN = torch.finfo(torch.float32).min
IRS = ["training", "core_aten"]


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape) * 7 + len(shape))
    return torch.randn(*shape, generator=g, dtype=dtype)


def qkv(lq=L, lk=L, hkv=H):
    return (_randn(B, H, lq, D, seed=1), _randn(B, hkv, lk, D, seed=2), _randn(B, hkv, lk, D, seed=3))


def bool_mask(lq=L, lk=L, shape=None):
    g = torch.Generator().manual_seed(5)
    m = torch.rand(*(shape or (B, 1, lq, lk)), generator=g) > 0.3
    m[..., 0] = True                  # every row keeps at least one key
    return m


def float_mask(lq=L, lk=L, dtype=torch.float32):
    return torch.where(bool_mask(lq, lk), 0.0, -1e9).to(dtype) + 0.1 * _randn(B, 1, lq, lk, seed=9).to(dtype)


def pad_mask():
    m = torch.ones(B, L, dtype=torch.bool)
    m[1, -2:] = False
    return m


def attend(q, k, v, scale=SD):
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v


# ----------------------------------------------------------------------------- fused
class SdpaPlain(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class SdpaMask(nn.Module):
    def forward(self, q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


class SdpaCausal(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class SdpaScale(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=0.3)


class SdpaGQA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


# ----------------------------------------------------------------------------- products
class Matmul(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(D)
        return torch.matmul(torch.softmax(s, dim=-1), v)


class Bmm(nn.Module):
    def forward(self, q, k, v):
        b, h, l, d = q.shape
        q3, k3, v3 = (t.reshape(b * h, l, d) for t in (q, k, v))
        s = torch.bmm(q3, k3.transpose(1, 2)) * SD
        o = torch.bmm(torch.softmax(s, dim=-1), v3)
        return o.reshape(b, h, l, d)


class EinsumBHQD(nn.Module):
    def forward(self, q, k, v):
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * SD
        return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


class EinsumBQHD(nn.Module):
    """q, k, v arrive as (B, L, H, D)."""
    def forward(self, q, k, v):
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * SD
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


class Baddbmm(nn.Module):
    """alpha is the scale, beta * input the bias."""
    def forward(self, q, k, v, bias):
        b, h, l, d = q.shape
        q3, k3, v3 = (t.reshape(b * h, l, d) for t in (q, k, v))
        bias3 = bias.expand(b, h, l, l).reshape(b * h, l, l)
        s = torch.baddbmm(bias3, q3, k3.transpose(-2, -1), beta=0.5, alpha=SD)
        return torch.bmm(torch.softmax(s, dim=-1), v3).reshape(b, h, l, d)


# ----------------------------------------------------------------------------- K layouts
class KPermute(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.permute(0, 1, 3, 2) * SD, dim=-1) @ v


class KPermuteBSHD(nn.Module):
    """q, k, v arrive as (B, L, H, D); K is turned to (B, H, D, L) by one permute."""
    def forward(self, q, k, v):
        s = q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1) * SD
        return (torch.softmax(s, dim=-1) @ v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)


# ----------------------------------------------------------------------------- scales
class ScaleMul(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax((q @ k.transpose(-2, -1)) * 0.25, dim=-1) @ v


class ScaleOnQ(nn.Module):
    def forward(self, q, k, v):
        q = q * SD
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


class ScaleSplitSqrt(nn.Module):
    def forward(self, q, k, v):
        f = D ** -0.25
        return torch.softmax((q * f) @ (k * f).transpose(-2, -1), dim=-1) @ v


class ScaleBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.35))

    def forward(self, q, k, v):
        return torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1) @ v


class ScaleSize(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax((q @ k.transpose(-2, -1)) / q.size(-1) ** 0.5, dim=-1) @ v


class ScaleAbsent(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


# ----------------------------------------------------------------------------- masks
class AddMask(nn.Module):
    def forward(self, q, k, v, m):
        s = q @ k.transpose(-2, -1) * SD + m
        return torch.softmax(s, dim=-1).to(q.dtype) @ v


class FillNegInf(nn.Module):
    def forward(self, q, k, v, m):
        s = (q @ k.transpose(-2, -1) * SD).masked_fill(~m, NEG)
        return torch.softmax(s, dim=-1) @ v


class FillFinfoMin(nn.Module):
    def forward(self, q, k, v, m):
        s = (q @ k.transpose(-2, -1) * SD).masked_fill(~m, torch.finfo(q.dtype).min)
        return torch.softmax(s, dim=-1) @ v


class WhereMin(nn.Module):
    def forward(self, q, k, v, m):
        s = q @ k.transpose(-2, -1) * SD
        s = torch.where(m, s, torch.finfo(s.dtype).min)
        return torch.softmax(s, dim=-1) @ v


class CausalTril(nn.Module):
    def forward(self, q, k, v):
        l = q.shape[-2]
        keep = torch.tril(torch.ones(l, l, dtype=torch.bool, device=q.device))
        s = (q @ k.transpose(-2, -1) * SD).masked_fill(~keep, NEG)
        return torch.softmax(s, dim=-1) @ v


class CausalTriu(nn.Module):
    def forward(self, q, k, v):
        l = q.shape[-2]
        bias = torch.triu(torch.full((l, l), NEG, device=q.device), diagonal=1)
        s = q @ k.transpose(-2, -1) * SD + bias
        return torch.softmax(s, dim=-1) @ v


class PaddingMask(nn.Module):
    """A (B, S) key-padding mask broadcast as (B, 1, 1, S)."""
    def forward(self, q, k, v, pad):
        s = (q @ k.transpose(-2, -1) * SD).masked_fill(~pad[:, None, None, :], NEG)
        return torch.softmax(s, dim=-1) @ v


# ----------------------------------------------------------------------------- softmax forms
class SoftmaxDtype(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * SD, dim=-1, dtype=torch.float32) @ v


class SoftmaxCasts(nn.Module):
    def forward(self, q, k, v):
        s = (q @ k.transpose(-2, -1) * SD).float()
        return torch.softmax(s, dim=-1).to(q.dtype) @ v


class Dropout(nn.Module):
    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) * SD, dim=-1)
        return F.dropout(p, 0.1, training=self.training) @ v


# ----------------------------------------------------------------------------- GQA / MQA
class RepeatKV(nn.Module):
    def forward(self, q, k, v):
        def rep(x, n=H // HKV):
            b, hkv, l, d = x.shape
            return x[:, :, None, :, :].expand(b, hkv, n, l, d).reshape(b, hkv * n, l, d)
        return attend(q, rep(k), rep(v))


class RepeatInterleave(nn.Module):
    def forward(self, q, k, v):
        return attend(q, k.repeat_interleave(H // HKV, dim=1), v.repeat_interleave(H // HKV, dim=1))


class MQABroadcast(nn.Module):
    """Falcon-style: one key/value head, broadcast by matmul."""
    def forward(self, q, k, v):
        return attend(q, k, v)


# ----------------------------------------------------------------------------- the rest
class Softcap(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * SD
        s = torch.tanh(s / 5.0) * 5.0
        return torch.softmax(s, dim=-1) @ v


class ReturnProbs(nn.Module):
    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) * SD, dim=-1)
        return p @ v, p


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Matmul()

    def forward(self, q, k, v):
        return self.attn(q, k, v) + self.attn(k, q, v)


class CosineAttention(nn.Module):
    """Swin V2: cosine similarity of q and k times a learned per-head temperature, clamped
    and exponentiated in the graph: scores × (H, 1, 1)."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.log(10 * torch.rand(H, 1, 1) + 1.0))

    def forward(self, q, k, v):
        s = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        s = s * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        return s.softmax(-1) @ v


class CrossCovariance(nn.Module):
    """XCiT: attention over channels, scores × a learned (H, 1, 1) temperature."""

    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.rand(H, 1, 1) + 0.5)

    def forward(self, q, k, v):
        s = (q @ k.transpose(-2, -1)) * self.temperature
        return s.softmax(-1) @ v


class WindowMask(nn.Module):
    """Swin's shifted windows: the window mask is added while the scores of B·nW windows
    are viewed as (B, nW, H, N, N), then viewed back. Swin's fill is -100, a bias."""

    def forward(self, q, k, v, mask):            # q (B·nW, H, N, D), mask (nW, N, N)
        nw, n = mask.shape[0], q.shape[-2]
        s = q * SD @ k.transpose(-2, -1)
        s = s.view(-1, nw, H, n, n) + mask.unsqueeze(1).unsqueeze(0)
        return s.view(-1, H, n, n).softmax(-1) @ v


def window_mask(nw=B):
    keep = bool_mask(shape=(nw, L, L))
    return torch.zeros(nw, L, L).masked_fill(~keep, -100.0)


class LearnedQueryPooling(nn.Module):
    """Attention pooling: a learned query attends over the tokens (timm's AttentionPoolLatent)."""

    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, D))

    def forward(self, x):                       # x (B, L, D)
        s = self.query @ x.transpose(-2, -1) * SD  # (B, 1, L)
        return torch.softmax(s, dim=-1) @ x


class TransposedPV(nn.Module):
    """EfficientViT-MSRA: channels-first q, k, v (B·H, D, L); scores qᵀ·k plus a learned
    bias, and the P·V product written as v @ Pᵀ, (B·H, Dv, Lq)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(L, L))

    def forward(self, q, k, v):
        q, k, v = (t.flatten(0, 1).transpose(-2, -1) for t in (q, k, v))
        s = (q * SD).transpose(-2, -1) @ k + self.bias
        return v @ s.softmax(-1).transpose(-2, -1)


class LearnedQueryMixingWeights(nn.Module):
    """A learned query whose probabilities mix a weight table: nothing from the input is attended to."""

    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, D))
        self.table = nn.Parameter(torch.randn(1, L, D))

    def forward(self, x):                        # x (B, L, D)
        s = self.query @ x.transpose(-2, -1) * SD
        return torch.softmax(s, dim=-1) @ self.table


def bshd():
    return tuple(t.transpose(1, 2).contiguous() for t in qkv())


# id: (module, args, expected count, expected fields of every site)
FIELDS = dict(heads=H, kv_heads=H, q_len=L, kv_len=L, head_dim=D, scale=SD, softcap=None,
              mask="none", causal=False, source="decomposed")
POSITIVE = {
    # core ATen decomposes SDPA (math form; a bool/causal mask becomes an additive one)
    "sdpa": (SdpaPlain, qkv, 1, dict(source="sdpa", core=dict(source="decomposed"))),
    "sdpa_bool_mask": (SdpaMask, lambda: (*qkv(), bool_mask()), 1,
                       dict(source="sdpa", mask="boolean", core=dict(source="decomposed", mask="additive"))),
    "sdpa_float_mask": (SdpaMask, lambda: (*qkv(), float_mask()), 1,
                        dict(source="sdpa", mask="additive", core=dict(source="decomposed"))),
    "sdpa_causal": (SdpaCausal, qkv, 1,
                    dict(source="sdpa", causal=True, core=dict(source="decomposed", mask="additive"))),
    "sdpa_scale": (SdpaScale, qkv, 1, dict(source="sdpa", scale=0.3, core=dict(source="decomposed"))),
    "matmul": (Matmul, qkv, 1, {}),
    "bmm": (Bmm, qkv, 1, {}),
    "einsum_bhqd": (EinsumBHQD, qkv, 1, dict(irs=["training"])),
    "einsum_bqhd": (EinsumBQHD, bshd, 1, dict(irs=["training"])),
    "baddbmm": (Baddbmm, lambda: (*qkv(), float_mask()), 1, dict(mask="additive")),
    "k_permute": (KPermute, qkv, 1, {}),
    "k_permute_bshd": (KPermuteBSHD, bshd, 1, {}),
    "scale_mul": (ScaleMul, qkv, 1, dict(scale=0.25)),
    "scale_on_q": (ScaleOnQ, qkv, 1, {}),
    "scale_split_sqrt": (ScaleSplitSqrt, qkv, 1, {}),
    "scale_buffer": (ScaleBuffer, qkv, 1, dict(scale=0.35)),
    "scale_size": (ScaleSize, qkv, 1, {}),
    "scale_absent": (ScaleAbsent, qkv, 1, dict(scale=1.0)),
    "mask_add": (AddMask, lambda: (*qkv(), float_mask()), 1, dict(mask="additive")),
    "mask_add_fp64": (AddMask, lambda: (*qkv(), float_mask(dtype=torch.float64)), 1, dict(mask="additive")),
    "mask_fill_neginf": (FillNegInf, lambda: (*qkv(), bool_mask()), 1, dict(mask="boolean")),
    "mask_fill_finfo": (FillFinfoMin, lambda: (*qkv(), bool_mask()), 1, dict(mask="boolean")),
    "mask_where": (WhereMin, lambda: (*qkv(), bool_mask()), 1, dict(mask="boolean")),
    "causal_tril": (CausalTril, qkv, 1, dict(mask="boolean", causal=True)),
    "causal_triu": (CausalTriu, qkv, 1, dict(mask="additive", causal=True)),
    "padding_mask": (PaddingMask, lambda: (*qkv(), pad_mask()), 1, dict(mask="boolean")),
    "softmax_dtype": (SoftmaxDtype, qkv, 1, {}),
    "softmax_casts": (SoftmaxCasts, qkv, 1, {}),
    "dropout_eval": (Dropout, qkv, 1, {}),
    "gqa_repeat_interleave": (RepeatInterleave, lambda: qkv(hkv=HKV), 1, dict(kv_heads=HKV, irs=["training"])),
    "mqa_broadcast": (MQABroadcast, lambda: qkv(hkv=1), 1, dict(kv_heads=1, irs=["training"])),
    "softcap": (Softcap, qkv, 1, dict(softcap=5.0)),
    "cross_attention": (Matmul, lambda: qkv(lk=LK), 1, dict(kv_len=LK)),
    "shared_twice": (Shared, qkv, 2, {}),
    # the model libraries' forms (timm's Swin V2, XCiT, Swin, attention pooling)
    "per_head_cosine": (CosineAttention, qkv, 1, dict(scale="per-head")),
    "per_head_temperature": (CrossCovariance, qkv, 1, dict(scale="per-head")),
    "window_mask_regrouped": (WindowMask, lambda: (*qkv(), window_mask()), 1, dict(mask="additive")),
    "learned_query_pooling": (LearnedQueryPooling, lambda: (_randn(B, L, D),), 1,
                              dict(heads=1, kv_heads=1, q_len=1)),
    "pv_transposed": (TransposedPV, qkv, 1, dict(mask="additive", heads=1, kv_heads=1)),
}


_programs: dict = {}


def program(case: str, ir: str):
    """(ExportedProgram, args), exported once per case and IR for the whole module."""
    key = (case, ir)
    if key not in _programs:
        if ir == "training":
            cls, make_args = POSITIVE[case][:2] if case in POSITIVE else NEGATIVE[case]
            torch.manual_seed(0)
            args = make_args()
            ep = torch.export.export(cls().eval(), args, strict=False)
        else:
            ep, args = program(case, "training")
            ep = ep.run_decompositions()
        _programs[key] = (ep, args)
    return _programs[key]


def expected(case: str, ir: str) -> dict:
    extra = dict(POSITIVE[case][3])
    core = extra.pop("core", {})
    extra.pop("irs", None)
    return {**FIELDS, **extra, **(core if ir == "core_aten" else {})}


# Core ATen (run_decompositions, ~0.4 s a case) is slow: `make test-fast` checks the training IR.
POSITIVE_PARAMS = [pytest.param(case, ir, id=f"{case}-{ir}", marks=[pytest.mark.slow] if ir == "core_aten" else [])
                   for case, spec in POSITIVE.items() for ir in spec[3].get("irs", IRS)]


@pytest.mark.parametrize("case,ir", POSITIVE_PARAMS)
def test_spelling_is_one_site(case, ir):
    ep, args = program(case, ir)
    count, fields = POSITIVE[case][2], expected(case, ir)
    r = attnrewrite.rewrite(ep, "exact", example_inputs=args)
    sites = r.sites
    assert len(sites) == count, [s.to_dict() for s in sites]
    want_scale = fields.pop("scale")
    for s in sites:
        got = {k: getattr(s, k) for k in fields}
        assert got == fields, s.to_dict()
        if want_scale == "per-head":
            assert s.scale == want_scale, s.to_dict()
        else:
            assert isinstance(s.scale, float) and s.scale == pytest.approx(want_scale, rel=1e-6), s.to_dict()
    assert len({s.name for s in sites}) == count
    assert [s.status for s in sites] == ["rewritten"] * count
    assert r.report["check"]["rel_err"] <= 1e-5
    assert r.report["check"]["passed"] is True
    targets = [n.target for n in r.program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.attnrewrite.exact_attention.default) == count


def test_probabilities_returned_keep_the_site():
    """p = softmax(q·kᵀ) returned beside p·v: the dense probabilities stay, so the site is
    found but kept (a rewrite would add its op to the dense work); the model is unchanged."""
    torch.manual_seed(0)
    args = qkv()
    ep = torch.export.export(ReturnProbs().eval(), args, strict=False)
    (s,) = attnrewrite.detect(ep, example_inputs=args)
    assert "also read by output" in s.reason and "need_weights=True" in s.reason
    r = attnrewrite.rewrite(ep, "exact", example_inputs=args)
    assert [s.status for s in r.sites] == ["kept"] and r.report["check"]["rel_err"] == 0.0
    assert not any(n.target == torch.ops.attnrewrite.exact_attention.default for n in r.program.graph.nodes)


def test_detect_agrees_with_rewrite():
    """detect() on an ExportedProgram with inputs finds what rewrite() rewrites."""
    ep, args = program("causal_tril", "training")
    (s,) = attnrewrite.detect(ep, example_inputs=args)
    assert (s.source, s.mask, s.causal, s.heads, s.q_len) == ("decomposed", "boolean", True, H, L)


# ----------------------------------------------------------------------------- negatives
class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 5)

    def forward(self, x):
        return torch.softmax(self.fc(x), dim=-1)


class SoftmaxOverQueries(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * SD, dim=-2) @ v


class SigmoidAttention(nn.Module):
    def forward(self, q, k, v):
        return torch.sigmoid(q @ k.transpose(-2, -1) * SD) @ v


class WrongAxisMatmul(nn.Module):
    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) * SD, dim=-1)
        return p.transpose(-2, -1) @ v            # contracts over the query axis


class WrongAxisEinsum(nn.Module):
    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) * SD, dim=-1)
        return torch.einsum("bhqk,bhqd->bhkd", p, v)


class Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, 4)
        self.experts = nn.Linear(D, 4 * D)

    def forward(self, x):                        # x (B, L, D)
        probs = torch.softmax(self.gate(x), dim=-1)
        w, idx = torch.topk(probs, 2, dim=-1)
        out = self.experts(x).unflatten(-1, (4, D))          # (B, L, 4, D)
        picked = torch.gather(out, 2, idx[..., None].expand(*idx.shape, D))
        return (w[..., None] * picked).sum(2)


NEGATIVE = {
    "classifier_head": (Classifier, lambda: (_randn(B, L, D),)),
    "learned_query_mixing_weights": (LearnedQueryMixingWeights, lambda: (_randn(B, L, D),)),
    "softmax_over_queries": (SoftmaxOverQueries, qkv),
    "sigmoid_attention": (SigmoidAttention, qkv),
    "wrong_axis_matmul": (WrongAxisMatmul, qkv),
    "wrong_axis_einsum": (WrongAxisEinsum, qkv),
    "moe_router": (Router, lambda: (_randn(B, L, D),)),
}


# Why the FX detector refuses each negative's softmax (a substring of the reason `--list
# --verbose` prints), per IR where the two differ. A detector that found nothing would give
# no reason. sigmoid_attention has no softmax: nothing to refuse, and nothing is.
REFUSED = {
    "classifier_head": "not a q·kᵀ product",
    "learned_query_mixing_weights": {"training": "the values are a parameter",
                                     "core_aten": "probabilities are not contracted with a value tensor"},
    "softmax_over_queries": "softmax over dim -2, not the last (key) axis",
    "sigmoid_attention": None,
    "wrong_axis_matmul": "probabilities are not contracted with a value tensor",
    "wrong_axis_einsum": {"training": "probabilities are not contracted over the key axis",
                          "core_aten": "probabilities are not contracted with a value tensor"},
    "moe_router": "not a q·kᵀ product",
}


@pytest.mark.parametrize("ir", IRS)
@pytest.mark.parametrize("case", list(NEGATIVE))
def test_not_attention(case, ir):
    ep, args = program(case, ir)
    assert attnrewrite.detect(ep, example_inputs=args) == []
    sites, unmatched = pipeline.detect(pipeline.open_model(ep, args))
    softmaxes = [n for n in ep.graph.nodes if n.op == "call_function" and "softmax" in str(n.target)]
    want = REFUSED[case]
    want = want.get(ir) if isinstance(want, dict) else want
    assert sites == [] and len(unmatched) == len(softmaxes), unmatched
    if want is None:
        assert softmaxes == [] and unmatched == []
    else:
        (name, reason), = unmatched
        assert want in reason, (name, reason)
