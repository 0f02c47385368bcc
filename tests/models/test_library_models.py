"""Attention as the model libraries write it: timm and diffusers models on every front end.

Each model is built from the library's own classes with a small config and random weights
(nothing downloaded). On each of the three front ends —

* `.pt2`: torch.export, then `attnrewrite.rewrite(program, "exact")`;
* ONNX: the dynamo exporter, then the same rewrite, checked in onnxruntime;
* the compile backend: `torch.compile(model, backend=compile_backend("exact", check=True))`;

it asserts the exact number of sites the architecture has (one per attention call), that
every site is rewritten, and that the rewrite reproduces the model to 1e-5 per site and end
to end (the compiled model against eager as well). Softmaxes that are not attention
(a classifier head, selective-kernel branch weights, factorised attention's per-axis
softmaxes, CaiT's talking heads, which mix heads before the softmax) give no site.

The library forms each front end once missed:
* a learned per-head temperature on the scores — Swin V2's cosine attention
  (`logit_scale.clamp(max=…).exp()`, (H, 1, 1)) and XCiT's cross-covariance attention;
* Swin's shifted-window mask, added while the scores are viewed as (B, nW, H, N, N);
* attention pooling with a learned latent query (ViT's `global_pool="map"`), whose query
  the ONNX exporter folds into a constant;
* EfficientViT-MSRA's P·V product written transposed, `v @ attn.transpose(-2, -1)`.
Swin V2 is also rewritten into top-k with k = N (every key kept: exact) on all three.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
diffusers = pytest.importorskip("diffusers")

from _libraries import import_timm  # noqa: E402

import attnrewrite  # noqa: E402
from attnrewrite import pipeline  # noqa: E402
from attnrewrite.backend import compile_backend  # noqa: E402

timm = import_timm()
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402
from timm.layers import SelectiveKernel, set_fused_attn  # noqa: E402

BOUND = 1e-5
DIR = Path(tempfile.mkdtemp(prefix="attnrewrite-libraries-"))
atexit.register(shutil.rmtree, DIR, ignore_errors=True)


class Call(nn.Module):
    """`fn(model, *inputs)` as a module: keyword arguments, a tensor out of an output object."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *inputs):
        return self.fn(self.model, *inputs)


def _timm(cls, fused: bool = False, softmax_out: bool = False, **config):
    """A timm model; `fused=False` builds its attention in the decomposed matmul/softmax form."""
    set_fused_attn(fused)
    try:
        m = cls(img_size=32, num_classes=5, **config)
    finally:
        set_fused_attn(True)
    return Call(m, lambda m, x: m(x).softmax(-1)) if softmax_out else m


def image():
    return (torch.randn(2, 3, 32, 32),)


def _attention(processor, cross: bool = False, masked: bool = False):
    a = Attention(query_dim=32, heads=2, dim_head=16, cross_attention_dim=24 if cross else None)
    a.set_processor(processor())
    if masked:
        return Call(a, lambda m, x, e, bias: m(x, encoder_hidden_states=e, attention_mask=bias))
    if cross:
        return Call(a, lambda m, x, e: m(x, encoder_hidden_states=e))
    return Call(a, lambda m, x: m(x))


def tokens():
    return (torch.randn(2, 8, 32),)


def tokens_context_mask():
    bias = torch.zeros(2, 1, 6)
    bias[1, :, 4:] = -10000.0                 # diffusers' encoder mask: an additive (B, 1, Lk) bias
    return torch.randn(2, 8, 32), torch.randn(2, 6, 24), bias


class FactorisedAttention(nn.Module):
    """Efficient attention (Shen et al.): q normalised over its features, k over the tokens,
    then q·(kᵀ·v) — two softmaxes, neither over the keys of a q·kᵀ product."""

    def __init__(self, dim: int = 32, heads: int = 2):
        super().__init__()
        self.heads, self.qkv = heads, nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        context = k.softmax(dim=-2).transpose(-2, -1) @ v
        return (q.softmax(dim=-1) @ context).transpose(1, 2).reshape(b, n, c)


def _models():
    vt, swin, swin2 = timm.models.vision_transformer, timm.models.swin_transformer, timm.models.swin_transformer_v2
    vit = dict(patch_size=8, embed_dim=32, num_heads=2)
    win = dict(patch_size=2, window_size=4, embed_dim=16, depths=(2,), num_heads=(2,))
    # name: (library, make(), inputs(), sites per front end {pt2, onnx, backend})
    return {
        "timm_vit_fused": ("timm", lambda: _timm(vt.VisionTransformer, fused=True, depth=2, **vit), image, 2),
        "timm_vit_classifier_softmax": ("timm", lambda: _timm(vt.VisionTransformer, depth=2, softmax_out=True, **vit),
                                        image, 2),
        "timm_vit_latent_pool": ("timm", lambda: _timm(vt.VisionTransformer, depth=1, global_pool="map",
                                                       class_token=False, **vit), image, 2),
        "timm_swin_shifted_windows": ("timm", lambda: _timm(swin.SwinTransformer, **win), image, 2),
        "timm_swinv2_cosine": ("timm", lambda: _timm(swin2.SwinTransformerV2, **win), image, 2),
        "timm_xcit_cross_covariance": ("timm", lambda: _timm(timm.models.xcit.Xcit, patch_size=8, embed_dim=32,
                                                             depth=1, num_heads=2, cls_attn_layers=1), image, 2),
        "timm_cait_talking_heads": ("timm", lambda: _timm(timm.models.cait.Cait, patch_size=8, embed_dim=32, depth=1,
                                                          num_heads=2, depth_token_only=1), image, 1),
        "timm_efficientvit_msra": ("timm", lambda: timm.models.efficientvit_msra.EfficientVitMsra(
            img_size=32, num_classes=5, embed_dim=(16, 32), key_dim=(4, 4), depth=(1, 1), num_heads=(2, 2),
            window_size=(4, 4), down_ops=(("", 1), ("subsample", 2))), image, 4),
        "timm_selective_kernel": ("timm", lambda: SelectiveKernel(8, 8), lambda: (torch.randn(2, 8, 8, 8),), 0),
        "diffusers_self_baddbmm": ("diffusers", lambda: _attention(AttnProcessor), tokens, 1),
        "diffusers_cross_sdpa_masked": ("diffusers", lambda: _attention(AttnProcessor2_0, cross=True, masked=True),
                                        tokens_context_mask, 1),
        "diffusers_cross_baddbmm_masked": ("diffusers", lambda: _attention(AttnProcessor, cross=True, masked=True),
                                           tokens_context_mask, 1),
        "diffusers_transformer2d": ("diffusers", lambda: Call(
            diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4,
                                         cross_attention_dim=12, num_layers=1),
            lambda m, x, e: m(x, encoder_hidden_states=e).sample),
            lambda: (torch.randn(1, 16, 4, 4), torch.randn(1, 5, 12)), 2),
        "diffusers_vae": ("diffusers", lambda: Call(
            diffusers.AutoencoderKL(block_out_channels=(16,), norm_num_groups=4, latent_channels=4, layers_per_block=1),
            lambda m, x: m(x).sample), lambda: (torch.randn(1, 3, 16, 16),), 2),
        "diffusers_dit": ("diffusers", lambda: Call(
            diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                            sample_size=8, patch_size=2, norm_num_groups=4, num_embeds_ada_norm=10),
            lambda m, x, t, c: m(x, timestep=t, class_labels=c).sample),
            lambda: (torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.tensor([1])), 1),
        "factorised_attention": ("torch", FactorisedAttention, tokens, 0),
    }


MODELS = _models()
SOFTMAXES_NOT_ATTENTION = {"timm_vit_classifier_softmax": 1, "timm_cait_talking_heads": 1,
                           "timm_selective_kernel": 1, "factorised_attention": 2}


@functools.cache
def built(name: str):
    """The model in eval mode and its inputs. Parameters the library initialises to zero
    (Swin V2's post-norm scales, DiT's adaLN-zero gates, zero-initialised output
    projections) are drawn at random, so that every attention reaches the output and the
    end-to-end comparisons can fail."""
    _, make, inputs, _ = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.normal_(0.0, 0.5)
    return model, inputs()


@functools.cache
def exported(name: str):
    model, args = built(name)
    return torch.export.export(model, args)


@functools.cache
def onnx_file(name: str):
    model, args = built(name)
    path = DIR / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=True, verbose=False)
    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    return path, {n: a.numpy() for n, a in zip(names, args)}


def _assert_exact(result, count: int) -> None:
    rep = result.report
    assert len(rep["sites"]) == count, rep["sites"]
    for s in rep["sites"]:
        assert s["status"] == "rewritten" and s["check"]["rel_err"] <= BOUND, s
    if count:
        assert rep["check"]["rel_err"] <= BOUND and rep["check"]["passed"] is True, rep["check"]


@pytest.mark.parametrize("name", list(MODELS))
def test_pt2(name):
    count = MODELS[name][3]
    ep, (_, args) = exported(name), built(name)
    if count == 0:
        sites, unmatched = pipeline.detect(pipeline.open_model(ep, args))
        assert sites == [] and len(unmatched) == SOFTMAXES_NOT_ATTENTION[name], unmatched
        return
    _assert_exact(attnrewrite.rewrite(ep, "exact", example_inputs=args), count)
    _, unmatched = pipeline.detect(pipeline.open_model(ep, args))
    assert len(unmatched) == SOFTMAXES_NOT_ATTENTION.get(name, 0), unmatched


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx(name):
    count = MODELS[name][3]
    path, feeds = onnx_file(name)
    if count == 0:
        sites, unmatched = pipeline.detect(pipeline.open_model(str(path), feeds))
        assert sites == [] and len(unmatched) == SOFTMAXES_NOT_ATTENTION[name], unmatched
        return
    r = attnrewrite.rewrite(str(path), "exact", example_inputs=feeds)
    _assert_exact(r, count)
    lowered = [n for n in r.program.graph.node if n.name.startswith("attnrewrite/")]
    assert lowered, "the sites were not replaced"
    _, unmatched = pipeline.detect(pipeline.open_model(str(path), feeds))
    assert len(unmatched) == SOFTMAXES_NOT_ATTENTION.get(name, 0), unmatched


@pytest.mark.parametrize("name", list(MODELS))
def test_compile_backend(name):
    count = MODELS[name][3]
    model, args = built(name)
    torch._dynamo.reset()
    backend = compile_backend("exact", check=True, tolerance=BOUND)
    with torch.no_grad():
        want = model(*args)
        got = torch.compile(model, backend=backend)(*args)
    sites = [s for r in backend.reports for s in r["sites"]]
    assert len(sites) == count and backend.sites_rewritten == count, sites
    assert all(s["check"]["rel_err"] <= BOUND for s in sites), sites
    assert (got - want).norm() <= BOUND * want.norm()


# ----------------------------------------------------------------------------- a variant at its exact limit

WINDOW_KEYS = 16          # Swin V2 above: window 4 × 4


def test_per_head_scale_with_topk_keeping_every_key_is_exact_on_every_front_end():
    """Top-k with k = every key of a window is the exact attention: the per-head scale the
    rewrite moved onto q must be right for a variant other than exact too."""
    name = "timm_swinv2_cosine"
    opts = dict(mode="topk", k=WINDOW_KEYS)
    model, args = built(name)
    r = attnrewrite.rewrite(exported(name), "sparse", example_inputs=args, tolerance=BOUND, **opts)
    assert [s.scale for s in r.sites] == ["per-head"] * 2
    _assert_exact(r, 2)
    path, feeds = onnx_file(name)
    r = attnrewrite.rewrite(str(path), "sparse", example_inputs=feeds, tolerance=BOUND, **opts)
    assert [s.scale for s in r.sites] == ["per-head"] * 2
    _assert_exact(r, 2)
    torch._dynamo.reset()
    backend = compile_backend("sparse", check=True, tolerance=BOUND, **opts)
    with torch.no_grad():
        want, got = model(*args), torch.compile(model, backend=backend)(*args)
    assert backend.sites_rewritten == 2
    assert (got - want).norm() <= BOUND * want.norm()


def test_topk_below_every_key_is_not_exact():
    """The control: with fewer keys than the window holds, the same rewrite differs."""
    name = "timm_swinv2_cosine"
    model, args = built(name)
    r = attnrewrite.rewrite(exported(name), "sparse", example_inputs=args, check=True, mode="topk", k=2)
    assert min(s.check["rel_err"] for s in r.sites) > 1e-2


def test_list_verbose_names_the_closest_form_of_each_skipped_softmax(capsys):
    """`--list --verbose` says, per skipped softmax, which accepted form it came closest to."""
    from attnrewrite.cli import main
    name = "timm_cait_talking_heads"
    path, _ = onnx_file(name)
    assert main([str(path), "--list", "--verbose"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "not attention" in ln]
    assert len(lines) == 1 and "(closest form: none of per-head scale, regrouped scores, constant query)" in lines[0]
    assert "scores come from Transpose" in lines[0], out        # talking heads mix the heads' scores
