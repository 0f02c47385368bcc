"""Spellings real models use that the FX detector once got wrong, one class each.

* in-place twins of the score-chain steps (CompVis' `sim.masked_fill_(~mask, -max)`):
  found, and the rewrite removes the in-place step only when nobody else sees its write;
* permutes/(un)squeezes that only move size-1 axes (core ATen's einsum: bmm → view →
  permute → view), on the operands, the scores and the probabilities;
* a site computing in lower precision than its q (`p.half() @ v.half()` with fp32 q/k):
  its `compute_dtype` sets the exact rewrite's default tolerance.

Each module is exported with `torch.export.export(strict=False)` and rewritten with the
exact variant: site count, fields, status, per-site and end-to-end rel_err.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnrewrite
from attnrewrite.check import default_tolerance
from attnrewrite.passes import fx_detect
from attnrewrite.site import AttentionSite
from test_spellings import EinsumBHQD, EinsumBQHD  # noqa: E402 - the same einsum spellings

B, H, L, D = 2, 4, 6, 8
LK = 10
SD = 1.0 / math.sqrt(D)
NEG = float("-inf")
EXACT = torch.ops.attnrewrite.exact_attention.default


def _randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def qkv(lq=L, lk=L, layout="bhld"):
    q, k, v = _randn(B, H, lq, D, seed=1), _randn(B, H, lk, D, seed=2), _randn(B, H, lk, D, seed=3)
    return (q, k, v) if layout == "bhld" else tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))


def keep_mask(shape, seed=5):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(*shape, generator=g) > 0.3
    m[..., 0] = True                    # every row keeps a key
    return m


def export(module, args, core=False):
    ep = torch.export.export(module.eval(), args, strict=False)
    return ep.run_decompositions() if core else ep


def rewrite_one(ep, args, tol=1e-5, **fields):
    """Rewrite `ep` with exact; one site with `fields`, rewritten, within `tol` per site and end to end."""
    r = attnrewrite.rewrite(ep, "exact", example_inputs=args)
    assert len(r.sites) == 1, [s.to_dict() for s in r.sites]
    (s,) = r.sites
    got = {k: getattr(s, k) for k in fields}
    assert got == fields, s.to_dict()
    assert s.status == "rewritten", s.to_dict()
    assert s.check["rel_err"] <= tol, s.check
    assert r.report["check"]["rel_err"] <= tol and r.report["check"]["passed"] is True, r.report["check"]
    targets = [n.target for n in r.program.graph.nodes if n.op == "call_function"]
    assert targets.count(EXACT) == 1
    return r, s


def unmatched(ep) -> list[str]:
    sites, why = fx_detect.find_sites(ep.graph)
    assert sites == []
    return [reason for _, reason in why]


def targets(program) -> set:
    return {n.target for n in program.graph.nodes if n.op == "call_function"}


# ============================================================================ 1. in place
class CompVisCrossAttention(nn.Module):
    """ldm.modules.attention.CrossAttention: heads folded into the batch, an in-place mask."""

    def forward(self, q, k, v, mask):                     # q (B*H, Lq, D), k/v (B*H, Lk, D), mask (B, Lk)
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * SD
        keep = mask[:, None, :].repeat_interleave(H, dim=0)      # (B*H, 1, Lk)
        sim.masked_fill_(~keep, -torch.finfo(sim.dtype).max)
        attn = sim.softmax(dim=-1)
        return torch.einsum("b i j, b j d -> b i d", attn, v)


def compvis_args():
    q, k, v = qkv(lk=LK)
    return (q.reshape(B * H, L, D), k.reshape(B * H, LK, D), v.reshape(B * H, LK, D), keep_mask((B, LK)))


@pytest.mark.parametrize("core", [False, True], ids=["training", "core_aten"])
def test_in_place_masked_fill(core):
    args = compvis_args()
    ep = export(CompVisCrossAttention(), args, core)
    if not core:
        assert torch.ops.aten.masked_fill_.Scalar in targets(ep)
    r, s = rewrite_one(ep, args, q_len=L, kv_len=LK, head_dim=D, mask="boolean", scale=pytest.approx(SD))
    left = targets(r.program)          # nobody else reads the scores: the fill and softmax are gone
    assert not left & {torch.ops.aten.masked_fill_.Scalar, torch.ops.aten.masked_fill.Scalar,
                       torch.ops.aten.softmax.int, torch.ops.aten._softmax.default}
    torch.testing.assert_close(r.program.module()(*args), CompVisCrossAttention()(*args), rtol=1e-5, atol=1e-6)


class InPlaceBaddbmm(nn.Module):
    """Scores written into a fresh buffer by `baddbmm_` (beta 0, the scale as alpha)."""

    def forward(self, q, k, v):
        b, h, l, d = q.shape
        qq, kk = q.reshape(b * h, l, d), k.reshape(b * h, l, d)
        s = torch.empty(b * h, l, l, dtype=q.dtype).baddbmm_(qq, kk.transpose(1, 2), beta=0, alpha=SD)
        return (s.softmax(-1) @ v.reshape(b * h, l, d)).reshape(b, h, l, d)


def test_in_place_baddbmm():
    args = qkv()
    ep = export(InPlaceBaddbmm(), args)
    assert torch.ops.aten.baddbmm_.default in targets(ep)
    r, s = rewrite_one(ep, args, q_len=L, kv_len=L, head_dim=D, mask="none", scale=pytest.approx(SD))
    torch.testing.assert_close(r.program.module()(*args), InPlaceBaddbmm()(*args), rtol=1e-5, atol=1e-6)


class CopiedIntoBuffer(nn.Module):
    """Scores copied into a preallocated buffer, which softmax then reads."""

    def __init__(self, read_first=False):
        super().__init__()
        self.read_first = read_first

    def forward(self, q, k, v):
        buf = torch.zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        early = buf.softmax(-1) if self.read_first else None      # read before the copy: not the scores
        buf.copy_(q @ k.transpose(-1, -2) * SD)
        out = buf.softmax(-1) @ v
        return out if early is None else out + early @ v


def test_scores_copied_into_a_buffer():
    args = qkv()
    ep = export(CopiedIntoBuffer(), args)
    assert torch.ops.aten.copy_.default in targets(ep)
    r, s = rewrite_one(ep, args, q_len=L, kv_len=L, head_dim=D, mask="none", scale=pytest.approx(SD))
    torch.testing.assert_close(r.program.module()(*args), CopiedIntoBuffer()(*args), rtol=1e-5, atol=1e-6)
    # read before the copy too: only the read of the copy's result is attention
    early_model = CopiedIntoBuffer(read_first=True)
    early = export(early_model, args)
    r, s = rewrite_one(early, args, q_len=L, kv_len=L, head_dim=D, mask="none", scale=pytest.approx(SD))
    torch.testing.assert_close(r.program.module()(*args), early_model(*args), rtol=1e-5, atol=1e-6)


class InPlaceChain(nn.Module):
    """Every score step in place: scale, soft-cap, bias, sub, fill, a size-1 unsqueeze; dropout in place."""

    def forward(self, q, k, v, bias, keep):
        b, h, l, d = q.shape
        s = torch.bmm(q.reshape(b * h, l, d), k.reshape(b * h, l, d).transpose(1, 2))    # (B*H, L, L)
        s.mul_(SD)
        s.div_(5.0).tanh_().mul_(5.0)
        s.add_(bias.expand(b, h, l, l).reshape(b * h, l, l))
        s.sub_(0.5 * bias.expand(b, h, l, l).reshape(b * h, l, l))
        s.unsqueeze_(1)                                     # (B*H, 1, L, L), after a mask: replayed on it
        s.masked_fill_(~keep, NEG)
        p = F.dropout(torch.softmax(s, dim=-1), 0.1, training=self.training, inplace=True)
        return (p.squeeze(1) @ v.reshape(b * h, l, d)).reshape(b, h, l, d)


def test_in_place_chain_of_every_step():
    args = (*qkv(), _randn(B, 1, L, L, seed=7), keep_mask((1, 1, L, L)))
    ep = export(InPlaceChain(), args)
    aten = torch.ops.aten
    assert {aten.mul_.Tensor, aten.div_.Tensor, aten.tanh_.default, aten.add_.Tensor, aten.sub_.Tensor,
            aten.unsqueeze_.default, aten.masked_fill_.Scalar} <= targets(ep), targets(ep)
    rewrite_one(ep, args, q_len=L, kv_len=L, head_dim=D, softcap=5.0, mask="additive", scale=pytest.approx(SD))


class FillObserved(nn.Module):
    """The filled scores are also returned; a view taken before the fill sees it too;
    a reduction taken before the fill must not."""

    def __init__(self, outputs=("o", "s", "flat", "before")):
        super().__init__()
        self.outputs = outputs

    def forward(self, q, k, v, keep):
        s = q @ k.transpose(-2, -1) * SD
        before = s.sum(-1)
        flat = s.view(B, H, L * L)
        s.masked_fill_(~keep, -1e9)
        o = torch.softmax(s, dim=-1) @ v
        out = {"o": o, "s": s, "flat": flat, "before": before}
        return tuple(out[n] for n in self.outputs)


@pytest.mark.parametrize("outputs", [("o", "s", "flat", "before"), ("o", "flat"), ("o", "before")],
                         ids=["all", "alias_only", "read_before_only"])
def test_in_place_write_seen_elsewhere_is_kept(outputs):
    """The site is found and rewritten; what else reads the scores sees what it saw before."""
    args = (*qkv(), keep_mask((B, 1, L, L)))
    model = FillObserved(outputs)
    ep = export(model, args)
    r, _ = rewrite_one(ep, args, mask="boolean")
    got, want = r.program.module()(*args), model(*args)
    for name, a, b in zip(outputs, got, want):
        if name == "o":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b), name
    fill = torch.ops.aten.masked_fill_.Scalar in targets(r.program)
    assert fill == ("flat" in outputs or "s" in outputs)     # kept only while someone can see the write
    if "flat" in outputs:
        assert (got[outputs.index("flat")] == -1e9).any()    # the alias still sees the fill


class ScoresZeroedAfterUse(nn.Module):
    """The scores' buffer is zeroed in place once the softmax has read it: no effect on the site."""

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * SD
        p = torch.softmax(s, dim=-1)
        s.zero_()
        return p @ v


def test_in_place_write_after_the_last_read_is_harmless():
    args = qkv()
    rewrite_one(export(ScoresZeroedAfterUse(), args), args, mask="none", scale=pytest.approx(SD))


class FillAboveFloor(nn.Module):
    def forward(self, q, k, v, keep):
        s = q @ k.transpose(-2, -1) * SD
        s.masked_fill_(~keep, -1.0)
        return torch.softmax(s, dim=-1) @ v


class AddScoresIntoBias(nn.Module):
    """bias.add_(scores): the write lands in the bias tensor, not the scores."""

    def forward(self, q, k, v, bias):
        t = bias.clone()
        t.add_(q @ k.transpose(-2, -1) * SD)
        return torch.softmax(t, dim=-1) @ v


class WriteThroughAlias(nn.Module):
    """The fill writes the scores under one name, the softmax reads them under another."""

    def forward(self, q, k, v, keep):
        s = q @ k.transpose(-2, -1) * SD
        s3 = s.view(B * H, L, L)
        s.masked_fill_(~keep, NEG)
        return torch.softmax(s3, dim=-1).view(B, H, L, L) @ v


def test_in_place_negatives():
    args = (*qkv(), keep_mask((B, 1, L, L)))
    (why,) = unmatched(export(FillAboveFloor(), args))
    assert why.startswith("masked_fill_ sets scores to -1: a fill above -10000 is not a mask (closest form: none")
    (why,) = unmatched(export(WriteThroughAlias(), args))      # once found without its mask
    assert why.startswith("masked_fill_ (aten.masked_fill_.Scalar) writes in place into mul, "
                          "which the attention reads under another name")
    args = (*qkv(), _randn(B, H, L, L, seed=7))
    (why,) = unmatched(export(AddScoresIntoBias(), args))
    assert "writes the scores in place into another tensor" in why


# ============================================================================ 2. size-1 axes
class EinsumKT(nn.Module):
    """K stored transposed, (B, H, D, Lk)."""

    def forward(self, q, kt, v):
        s = torch.einsum("bhqd,bhdk->bhqk", q, kt) * SD
        return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def _einsum_case(name, lq):
    q, k, v = qkv(lq=lq, lk=LK, layout="blhd" if name == "bqhd" else "bhld")
    if name == "kT":
        k = k.transpose(-2, -1).contiguous()
    return {"bhqd": EinsumBHQD, "bqhd": EinsumBQHD, "kT": EinsumKT}[name](), (q, k, v)


@pytest.mark.parametrize("lq", [L, 1], ids=["prefill", "decode"])
@pytest.mark.parametrize("name", ["bhqd", "bqhd", "kT"])
@pytest.mark.parametrize("core", [False, True], ids=["training", "core_aten"])
def test_einsum_through_size_one_permutes(name, lq, core):
    model, args = _einsum_case(name, lq)
    ep = export(model, args, core)
    if core:
        assert torch.ops.aten.einsum.default not in targets(ep)
        assert torch.ops.aten.permute.default in targets(ep)
    r, _ = rewrite_one(ep, args, heads=H, kv_heads=H, q_len=lq, kv_len=LK, head_dim=D, mask="none",
                       scale=pytest.approx(SD), source="decomposed")
    torch.testing.assert_close(r.program.module()(*args), model(*args), rtol=1e-5, atol=1e-6)


class ScoresThroughSizeOneAxis(nn.Module):
    """A size-1 axis moved on each side: scores (B, H, Lq, 1, Lk) → (B, H, 1, Lq, Lk), then
    probabilities unsqueezed and moved back before P·v."""

    def forward(self, q, k, v):
        s = (q @ k.transpose(-2, -1) * SD).unsqueeze(3).permute(0, 1, 3, 2, 4)      # (B, H, 1, Lq, Lk)
        p = torch.softmax(s, dim=-1).squeeze(2)                                      # (B, H, Lq, Lk)
        p = p.unsqueeze(-1).transpose(-1, -2).transpose(-1, -2).squeeze(-1)          # a run back to itself
        return p @ v.unsqueeze(2).transpose(1, 2).squeeze(1)


def test_size_one_moves_on_scores_and_probabilities():
    args = qkv(lk=LK)
    rewrite_one(export(ScoresThroughSizeOneAxis(), args), args, q_len=L, kv_len=LK, mask="none")


class ScoresTransposed(nn.Module):
    def forward(self, q, k, v):
        s = (q @ k.transpose(-2, -1) * SD).transpose(-2, -1)          # softmax over the queries
        return torch.softmax(s, dim=-1) @ v


class ProbsTransposedAndBack(nn.Module):
    """P reordered (B, Lq, H, Lk) and read that way by P·v: not the probabilities' own layout."""

    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) * SD, dim=-1).transpose(1, 2)      # (B, Lq, H, Lk)
        return p @ v.transpose(1, 2)                                                  # needs H == Lq


def test_real_permutes_are_not_size_one_moves():
    args = qkv()
    (why,) = unmatched(export(ScoresTransposed(), args))
    assert "reorders the axes of the scores" in why
    q, k, v = (_randn(B, L, L, D, seed=i) for i in (1, 2, 3))        # H == L so the product type-checks
    (why,) = unmatched(export(ProbsTransposedAndBack(), (q, k, v)))
    assert "not contracted with a value tensor" in why


# ============================================================================ 3. precision
class HalfPV(nn.Module):
    def __init__(self, dtype=torch.float16):
        super().__init__()
        self.dtype = dtype

    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) * SD, dim=-1)
        return p.to(self.dtype) @ v.to(self.dtype)


class HalfSoftmax(nn.Module):
    """Scores rounded to half before the softmax, the probabilities back to fp32 for P·v."""

    def forward(self, q, k, v):
        s = (q @ k.transpose(-2, -1) * SD).half()
        return torch.softmax(s, dim=-1).float() @ v


@pytest.mark.parametrize("model,low", [(HalfPV(), "float16"), (HalfPV(torch.bfloat16), "bfloat16"),
                                       (HalfSoftmax(), "float16")], ids=["pv_fp16", "pv_bf16", "softmax_fp16"])
def test_lower_precision_inside_the_site(model, low):
    args = qkv()
    ep = export(model, args)
    r, s = rewrite_one(ep, args, tol=1e-2, dtype="float32", compute_dtype=low)
    assert s.to_dict()["compute_dtype"] == low
    assert r.report["check"]["tolerance"] == 1e-2
    assert s.check["rel_err"] > 1e-5           # the gate had to move: the original rounds there
    out = r.program.module()(*args)
    assert out.dtype == model(*args).dtype     # the op's output is cast back to the product's dtype
    (op,) = [n for n in r.program.graph.nodes if n.target == EXACT]
    assert op.meta["val"].dtype == torch.float32


class HalfMask(nn.Module):
    """An fp16 additive mask added to fp32 scores: the sum is fp32, nothing is computed in half."""

    def forward(self, q, k, v, m):
        return torch.softmax(q @ k.transpose(-2, -1) * SD + m, dim=-1) @ v


def test_half_inputs_that_are_not_computed_in_half_keep_the_fp32_gate():
    m = torch.where(keep_mask((B, 1, L, L)), 0.0, -1e4).half()
    args = (*qkv(), m)
    r, _ = rewrite_one(export(HalfMask(), args), args, dtype="float32", compute_dtype="float32", mask="additive")
    assert r.report["check"]["tolerance"] == 1e-4


def test_default_tolerance_reads_compute_dtype():
    def site(**kw):
        return AttentionSite(id=0, name="a", source="decomposed", **kw)
    assert default_tolerance("exact", [site(dtype="float32")]) == 1e-4
    assert default_tolerance("exact", [site(dtype="float32", compute_dtype="float32")]) == 1e-4
    assert default_tolerance("exact", [site(dtype="float32", compute_dtype="bfloat16")]) == 1e-2
    assert default_tolerance("exact", [site(dtype="float16")]) == 1e-2          # compute_dtype unknown (ONNX)
    assert default_tolerance("sparse", [site(dtype="float32", compute_dtype="float16")]) is None
