"""Real `transformers` architectures: every attention found, and `exact` reproduces them.

Each family is built from a small config (2 layers, hidden 64, 4 heads, vocab 100) with
random weights, exported once per attention implementation ("eager": the decomposed
matmul/softmax spelling; "sdpa": the fused op) and cached for the session. For each
export we assert the exact number of sites, derived from the architecture (one per
attention call: encoder self + decoder self + cross), the fields that the architecture
fixes (heads, GQA kv_heads, lengths, scale, causal, mask kind), and that the `exact`
rewrite of every site reproduces the original both per site and end to end.
"""
from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch

T = pytest.importorskip("transformers")

import attnrewrite  # noqa: E402

H, LAYERS, HEADS, VOCAB, B, S = 64, 2, 4, 100, 2, 8
S_DEC = 5            # decoder length != encoder length, so cross-attention has q_len != kv_len
D = H // HEADS
BOUND = 1e-5


def _ids(n=S, lo=3, hi=VOCAB):
    return torch.randint(lo, hi, (B, n))


def _padded(n=S):
    m = torch.ones(B, n, dtype=torch.long)
    m[1, n - 3:] = 0                         # right padding in batch row 1
    return m


def text(**extra):
    return {"input_ids": _ids(), "attention_mask": _padded(), **extra}


def causal_lm():
    return text(use_cache=False)


def seq2seq():
    return text(decoder_input_ids=_ids(S_DEC), use_cache=False)


# Per-site roles in graph order, each a (q_len, kv_len, causal) triple.
ENC = (S, S, False)
DEC = (S, S, True)
XDEC = (S_DEC, S_DEC, True)
CROSS = (S_DEC, S, False)
ENCODER, DECODER, ENC_DEC = [ENC] * LAYERS, [DEC] * LAYERS, [ENC] * LAYERS + [XDEC, CROSS] * LAYERS

# family: (model class, config class, config kwargs, inputs(), impls, roles,
#          kv_heads, scale (None: not a fixed score scale, see below), masks {impl: kinds per role})
EAGER_SDPA = ("eager", "sdpa")
STD = {"hidden_size": H, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
       "intermediate_size": 128, "vocab_size": VOCAB}
GQA = {**STD, "num_key_value_heads": 2}
BART_LIKE = {"d_model": H, "encoder_layers": LAYERS, "decoder_layers": LAYERS,
             "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS,
             "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "vocab_size": VOCAB}
# Masks: eager paths add a float mask; sdpa paths pass a boolean one.
MASKED = {"eager": "additive", "sdpa": "boolean"}

FAMILIES = {
    "bert": ("BertModel", "BertConfig", STD, text, EAGER_SDPA, ENCODER, HEADS, 1 / math.sqrt(D), MASKED),
    "roberta": ("RobertaModel", "RobertaConfig", STD, text, EAGER_SDPA, ENCODER, HEADS, 1 / math.sqrt(D), MASKED),
    "distilbert": ("DistilBertModel", "DistilBertConfig",
                   {"dim": H, "n_layers": LAYERS, "n_heads": HEADS, "hidden_dim": 128, "vocab_size": VOCAB},
                   text, EAGER_SDPA, ENCODER, HEADS, 1 / math.sqrt(D), MASKED),
    "gpt2": ("GPT2Model", "GPT2Config",
             {"n_embd": H, "n_layer": LAYERS, "n_head": HEADS, "vocab_size": VOCAB, "n_positions": 32,
              "bos_token_id": 1, "eos_token_id": 2},
             causal_lm, EAGER_SDPA, DECODER, HEADS, 1 / math.sqrt(D), MASKED),
    "gpt_neox": ("GPTNeoXModel", "GPTNeoXConfig", STD, causal_lm, EAGER_SDPA, DECODER, HEADS,
                 1 / math.sqrt(D), MASKED),
    # OPT scales q_proj's output before the head split: the scale lives inside q.
    "opt": ("OPTModel", "OPTConfig",
            {"hidden_size": H, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "ffn_dim": 128,
             "vocab_size": VOCAB, "word_embed_proj_dim": H, "max_position_embeddings": 32},
            causal_lm, EAGER_SDPA, DECODER, HEADS, None, MASKED),
    # Falcon (new_decoder_architecture=False): multi-query, one key/value head broadcast by
    # the matmul; eager scales with an in-place `div_`.
    "falcon": ("FalconModel", "FalconConfig",
               {"hidden_size": H, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "vocab_size": VOCAB},
               causal_lm, EAGER_SDPA, DECODER, 1, 1 / math.sqrt(D), MASKED),
    "llama": ("LlamaModel", "LlamaConfig", GQA, causal_lm, EAGER_SDPA, DECODER, 2, 1 / math.sqrt(D), MASKED),
    "mistral": ("MistralModel", "MistralConfig", GQA, causal_lm, EAGER_SDPA, DECODER, 2, 1 / math.sqrt(D), MASKED),
    "qwen2": ("Qwen2Model", "Qwen2Config", GQA, causal_lm, EAGER_SDPA, DECODER, 2, 1 / math.sqrt(D), MASKED),
    "phi": ("PhiModel", "PhiConfig", STD, causal_lm, EAGER_SDPA, DECODER, HEADS, 1 / math.sqrt(D), MASKED),
    "gemma": ("GemmaModel", "GemmaConfig", {**GQA, "head_dim": D}, causal_lm, EAGER_SDPA, DECODER, 2,
              1 / math.sqrt(D), MASKED),
    # Gemma2: soft-capped logits (50) and query_pre_attn_scalar (256) as the scale; its
    # sdpa path refuses soft-capping, so eager only. Layers alternate sliding window / global.
    "gemma2": ("Gemma2Model", "Gemma2Config", {**GQA, "head_dim": D, "sliding_window": 4}, causal_lm,
               ("eager",), DECODER, 2, 256 ** -0.5, MASKED),
    # T5: no score scaling; the relative position bias is an additive mask in both spellings.
    "t5": ("T5Model", "T5Config",
           {"d_model": H, "d_kv": D, "d_ff": 128, "num_layers": LAYERS, "num_decoder_layers": LAYERS,
            "num_heads": HEADS, "vocab_size": VOCAB},
           seq2seq, EAGER_SDPA, ENC_DEC, HEADS, 1.0, {"eager": "additive", "sdpa": "additive"}),
    "bart": ("BartModel", "BartConfig", {**BART_LIKE, "max_position_embeddings": 32}, seq2seq, EAGER_SDPA,
             ENC_DEC, HEADS, 1 / math.sqrt(D), MASKED),
    # ViT has no padding but passes an all-keep mask of its own.
    "vit": ("ViTModel", "ViTConfig",
            {"hidden_size": H, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "intermediate_size": 128,
             "image_size": 16, "patch_size": 4},
            lambda: {"pixel_values": torch.randn(B, 3, 16, 16)}, EAGER_SDPA,
            [(17, 17, False)] * LAYERS, HEADS, 1 / math.sqrt(D), MASKED),
    # ESM scales q before its rotary embedding: the scale lives inside q.
    "esm": ("EsmModel", "EsmConfig", {**STD, "vocab_size": 33, "pad_token_id": 1,
                                      "position_embedding_type": "rotary"},
            lambda: {"input_ids": _ids(hi=33, lo=4), "attention_mask": _padded()}, EAGER_SDPA, ENCODER,
            HEADS, None, MASKED),
    # Whisper: conv front end halves 16 frames to 8 encoder positions; no encoder mask and
    # no cross mask, a causal decoder mask; q is pre-scaled (scale inside q).
    "whisper": ("WhisperModel", "WhisperConfig",
                {**BART_LIKE, "num_mel_bins": 8, "max_source_positions": S, "max_target_positions": 16,
                 "pad_token_id": 1, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1},
                lambda: {"input_features": torch.randn(B, 8, 2 * S), "decoder_input_ids": _ids(S_DEC),
                         "use_cache": False},
                EAGER_SDPA, ENC_DEC, HEADS, None,
                {"eager": ["none"] * LAYERS + ["additive", "none"] * LAYERS,
                 "sdpa": ["none"] * LAYERS + ["boolean", "none"] * LAYERS}),
}

CASES = [pytest.param(fam, impl, id=f"{fam}-{impl}") for fam, spec in FAMILIES.items() for impl in spec[4]]


def build(family: str, impl: str):
    """(model in eval mode, keyword inputs) for one family and attention implementation, seed 0."""
    model_cls, config_cls, kwargs, inputs, *_ = FAMILIES[family]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = getattr(T, config_cls)(**kwargs, attn_implementation=impl)
        return getattr(T, model_cls)(config).eval(), inputs()


@functools.cache
def exported(family: str, impl: str):
    """(ExportedProgram, inputs) for one family and attention implementation, built once."""
    model, kw = build(family, impl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, (), kw, strict=False)
    return ep, {"args": (), "kwargs": kw}


@functools.cache
def rewritten(family: str, impl: str):
    return attnrewrite.rewrite(exported(family, impl)[0], "exact")


@pytest.mark.parametrize("family,impl", CASES)
def test_detect(family, impl):
    *_, roles, kv_heads, scale, masks = FAMILIES[family]
    sites = attnrewrite.detect(*exported(family, impl))
    assert len(sites) == len(roles), [s.name for s in sites]
    kinds = masks[impl] if isinstance(masks[impl], list) else [masks[impl]] * len(roles)
    for site, (q_len, kv_len, _), mask in zip(sites, roles, kinds):
        assert site.source == ("sdpa" if impl == "sdpa" else "decomposed"), site
        assert (site.batch, site.heads, site.kv_heads, site.head_dim) == (B, HEADS, kv_heads, D), site
        assert (site.q_len, site.kv_len) == (q_len, kv_len), site
        assert site.mask == mask, site
        if scale is not None:
            assert site.scale == pytest.approx(scale, rel=1e-6), site
        assert site.softcap == (50.0 if family == "gemma2" else None), site
        assert site.dropout == 0.0


@pytest.mark.parametrize("family,impl", CASES)
def test_exact_rewrite(family, impl):
    roles = FAMILIES[family][5]
    r = rewritten(family, impl)
    rep = r.report
    assert len(rep["sites"]) == len(roles)
    for site, (_, _, causal) in zip(rep["sites"], roles):
        assert site["status"] == "rewritten", site
        assert site["check"]["rel_err"] <= BOUND, site
        assert site["causal"] is causal, site
    assert rep["check"]["rel_err"] <= BOUND, rep["check"]
    assert rep["check"]["passed"] is True
    # the rewritten program holds one exact-attention op per site, and nothing of the original
    ops = [n for n in r.program.graph.nodes if n.op == "call_function"]
    assert sum(n.target == torch.ops.attnrewrite.exact_attention.default for n in ops) == len(roles)
    assert not any(n.target in (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default,
                                torch.ops.aten.scaled_dot_product_attention.default) for n in ops)


# Every family through every approximate variant at its exact limit (k ≥ kv_len): each site is
# either rewritten and exact, or kept with the reason; preconditioned rewrites every site.
EXACT_LIMIT = {"sparse": {"mode": "topk", "k": 64}, "conv_basis": {"k": 64}}


ONE_PER_FAMILY = [c for c in CASES if c.values[1] == "sdpa" or c.id == "gemma2-eager"]


@pytest.mark.parametrize("variant", ["sparse", "conv_basis"])
@pytest.mark.parametrize("family,impl", ONE_PER_FAMILY)
def test_variant_exact_limit(family, impl, variant):
    roles = FAMILIES[family][5]
    ep, inputs = exported(family, impl)
    rep = attnrewrite.rewrite(ep, variant, example_inputs=inputs, **EXACT_LIMIT[variant]).report
    assert len(rep["sites"]) == len(roles)
    for site in rep["sites"]:
        if site["status"] == "kept":
            assert variant == "conv_basis" and site["reason"], site
            continue
        assert site["status"] == "rewritten", site
        assert site["check"]["rel_err"] <= BOUND, site
    rewritten = sum(s["status"] == "rewritten" for s in rep["sites"])
    kept_ok = family in ("t5", "bart", "whisper", "gemma2") and variant == "conv_basis"
    assert rewritten == len(roles) or kept_ok, [(s["status"], s["reason"]) for s in rep["sites"]]
    assert rep["check"]["rel_err"] <= BOUND, rep["check"]


@pytest.mark.parametrize("family,impl", ONE_PER_FAMILY)
def test_preconditioned_rewrites_every_site(family, impl):
    roles = FAMILIES[family][5]
    ep, inputs = exported(family, impl)
    rep = attnrewrite.rewrite(ep, "preconditioned", example_inputs=inputs).report
    assert [s["status"] for s in rep["sites"]] == ["rewritten"] * len(roles)
    assert math.isfinite(rep["check"]["rel_err"])
