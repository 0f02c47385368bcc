"""The torch.compile backend: same sites as the export path, same numbers, trains, survives recompiles."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import attnrewrite
from attnrewrite import backend as B
from attnrewrite.frontends.dynamo import native_multi_head_attention, transformer_encoder_layer_fwd
from _models import TinyAttention


def compiled(model, variant="exact", **options):
    torch._dynamo.reset()
    be = attnrewrite.compile_backend(variant, **options)
    return torch.compile(model, backend=be), be


class TwoLayers(nn.Module):
    """Two attention layers with a graph break between them."""

    def __init__(self, graph_break: bool = False, dropout: float = 0.0):
        super().__init__()
        self.a, self.b, self.out = TinyAttention(), TinyAttention(), nn.Linear(16, 16)
        self.graph_break, self.drop = graph_break, nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.a(x)
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.out(self.drop(x + self.b(x)))


def test_exact_outputs_and_gradients_match_eager_eager_and_inductor():
    torch.manual_seed(0)
    m, x = TwoLayers(), torch.randn(2, 6, 16)
    ref = m(x)
    ref.square().sum().backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    for inner in ("eager", "inductor"):
        m.zero_grad()
        f, be = compiled(m, inner=inner)
        y = f(x)
        assert (y - ref).abs().max().item() <= 1e-5
        y.square().sum().backward()
        for n, p in m.named_parameters():
            assert (p.grad - want[n]).abs().max().item() <= 1e-5, (inner, n)
        assert be.sites_rewritten == 2 and len(be.reports) == 1
        assert [s["status"] for s in be.reports[0]["sites"]] == ["rewritten"] * 2


def test_rewritten_graph_holds_the_op(monkeypatch):
    graphs = []
    real = B.Backend.__call__

    def spy(self, gm, example_inputs, **kw):
        out = real(self, gm, example_inputs, **kw)
        graphs.append(out)
        return out

    monkeypatch.setattr(B.Backend, "__call__", spy)
    f, _ = compiled(TinyAttention(), "sparse", inner="eager", mode="window", window=2)
    f(torch.randn(1, 5, 16))
    ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.attnrewrite.sparse_attention.default) == 1
    assert torch.ops.aten.softmax.int not in ops and torch.ops.aten._softmax.default not in ops


def test_graph_breaks_recompiles_and_dynamic_lengths_keep_every_site():
    torch.manual_seed(0)
    m = TwoLayers(graph_break=True)
    f, be = compiled(m, inner="eager")
    for n in (5, 7, 9, 11):
        x = torch.randn(2, n, 16)
        assert (f(x) - m(x)).abs().max().item() <= 1e-5
    # two graphs at n = 5, two more once the length turns dynamic, none after
    assert len(be.reports) == 4
    assert all([s["status"] for s in r["sites"]] == ["rewritten"] for r in be.reports)
    assert [r["sites"][0]["q_len"] for r in be.reports[2:]] == [r["sites"][0]["q_len"] for r in be.reports[2:]]
    assert all(isinstance(r["sites"][0]["q_len"], str) for r in be.reports[2:])   # symbolic, not specialised


def test_string_backend_options_and_log(capfd, monkeypatch):
    monkeypatch.setenv("ATTNREWRITE_LOG", "1")
    torch._dynamo.reset()
    torch.manual_seed(0)
    m, x = TinyAttention(), torch.randn(2, 6, 16)
    f = torch.compile(m, backend="attnrewrite", options={"variant": "sparse", "mode": "topk", "k": 6,
                                                          "inner": "eager"})
    assert (f(x) - m(x)).abs().max().item() <= 1e-5          # k = n: exact
    assert B.REPORTS[-1]["variant"] == "sparse"
    assert B.REPORTS[-1]["sites"][0]["options"]["k"] == 6
    assert B.REPORTS.maxlen == B.REPORTS_KEPT                 # bounded: a long-running process does not grow
    assert "1 attention site(s), 1 rewritten into sparse" in capfd.readouterr().err


def test_bad_options_fail_at_construction():
    with pytest.raises(attnrewrite.pipeline.InputError, match="unknown option 'top_k'"):
        attnrewrite.compile_backend("sparse", top_k=3)
    with pytest.raises(attnrewrite.pipeline.InputError, match="inner"):
        attnrewrite.compile_backend("exact", inner="tvm")


# ---------------------------------------------------------------- torch.nn, eval + no_grad (fast paths)

def test_fast_path_decompositions_equal_torch():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    sa = layer.self_attn
    with torch.no_grad():
        for mask, mtype in ((None, None), (pad, 1)):
            for norm_first, gelu in ((False, False), (True, True)):
                args = (x, 16, 2, sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias, gelu,
                        norm_first, 1e-5, layer.norm1.weight, layer.norm1.bias, layer.norm2.weight,
                        layer.norm2.bias, layer.linear1.weight, layer.linear1.bias, layer.linear2.weight,
                        layer.linear2.bias, mask, mtype)
                got, want = transformer_encoder_layer_fwd(*args), torch._transformer_encoder_layer_fwd(*args)
                keep = ~pad.unsqueeze(-1) if mask is not None else torch.ones(1, dtype=torch.bool)
                assert ((got - want) * keep).abs().max().item() <= 1e-5
            margs = (x, x, x, 16, 2, sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias,
                     mask, True, False, mtype)
            (o1, w1), (o2, w2) = native_multi_head_attention(*margs), torch._native_multi_head_attention(*margs)
            assert (o1 - o2).abs().max().item() <= 1e-5 and (w1 - w2).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", ["mha", "encoder_layer", "encoder"])
def test_torch_nn_eval_no_grad_counts_match_export(case):
    torch.manual_seed(0)
    if case == "mha":
        m, sites = nn.MultiheadAttention(16, 2, batch_first=True).eval(), 1
        args = (torch.randn(2, 5, 16),) * 3
    elif case == "encoder_layer":
        m, sites = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True).eval(), 1
        args = (torch.randn(2, 5, 16),)
    else:
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
        m, sites = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval(), 2
        args = (torch.randn(2, 5, 16),)
    assert len(attnrewrite.detect(m, example_inputs=args)) == sites
    with torch.no_grad():
        ref = m(*args)
        f, be = compiled(m, inner="eager")
        got = f(*args)
    ref, got = (ref[0], got[0]) if case == "mha" else (ref, got)
    assert (ref - got).abs().max().item() <= 1e-5
    if case == "mha":               # need_weights=True (the default) returns the dense weights: kept
        found = [s for r in be.reports for s in r["sites"]]
        assert [s["status"] for s in found] == ["kept"] and "need_weights=True" in found[0]["reason"]
    else:
        assert be.sites_rewritten == sites


# ---------------------------------------------------------------- training, every variant

TRAIN = [("exact", {}), ("sparse", {"mode": "topk", "k": 3}), ("sparse", {"mode": "window", "window": 2}),
         ("sparse", {"mode": "block", "block": 16, "density": 0.5}), ("conv_basis", {"k": 2}),
         ("preconditioned", {"mode": "output-norm"}), ("preconditioned", {"mode": "row-equilibrate"})]


@pytest.mark.parametrize("variant,options", TRAIN, ids=[f"{v}-{'-'.join(map(str, o.values()))}" for v, o in TRAIN])
def test_training_through_backend_matches_rewritten_program(variant, options):
    torch.manual_seed(0)
    m, x = TwoLayers(), torch.randn(2, 8, 16)
    target = torch.randn(2, 8, 16)
    ep = torch.export.export(m, (x,))
    res = attnrewrite.rewrite(ep, variant, **options)
    assert [s.status for s in res.sites] == ["rewritten"] * 2
    ref_module = res.program.module()
    f, be = compiled(m, variant, inner="eager", **options)
    assert be.sites_rewritten == 0
    loss = ((f(x) - target) ** 2).mean()
    assert be.sites_rewritten == 2
    loss.backward()
    # the same op through the saved-program path gives the same loss and gradients
    ref_params = dict(ref_module.named_parameters())
    ref_loss = ((ref_module(x) - target) ** 2).mean()
    grads = torch.autograd.grad(ref_loss, [ref_params[n] for n, _ in m.named_parameters()])
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    for (n, p), g in zip(m.named_parameters(), grads):
        assert torch.allclose(p.grad, g, atol=1e-5), n
    # and it trains: a few SGD steps lower the loss
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    first = loss.item()
    for _ in range(3):
        opt.step()
        opt.zero_grad()
        loss = ((f(x) - target) ** 2).mean()
        loss.backward()
    assert loss.item() < first


def test_dropout_trains_in_train_mode_and_is_reproducible():
    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
            o = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.5 if self.training else 0.0)
            return o.transpose(1, 2).reshape(b, n, 16)

    torch.manual_seed(0)
    m, x = Drop().train(), torch.randn(2, 8, 16)
    f, be = compiled(m, inner="eager")
    torch.manual_seed(1)
    a = f(x)
    a.sum().backward()
    g1 = m.qkv.weight.grad.clone()
    m.zero_grad()
    torch.manual_seed(1)
    b = f(x)
    b.sum().backward()
    torch.manual_seed(2)
    c = f(x)
    assert torch.equal(a, b) and not torch.equal(a, c)             # the mask follows the RNG, reproducibly
    assert torch.equal(g1, m.qkv.weight.grad)
    site = be.reports[0]["sites"][0]
    assert site["status"] == "rewritten" and site["dropout"] == 0.5
    with torch.no_grad():                                          # eval: dropout off, exact again
        m.eval()
        torch._dynamo.reset()
        assert (compiled(m, inner="eager")[0](x) - m(x)).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- transformers families: same sites as export

from test_hf_models import CASES, FAMILIES, build, exported  # noqa: E402


@pytest.mark.parametrize("family,impl", CASES)
def test_hf_families_through_backend_match_export(family, impl):
    roles = FAMILIES[family][5]
    model, kw = build(family, impl)
    n_export = len(attnrewrite.detect(*exported(family, impl)))
    assert n_export == len(roles)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model(**kw)
        f, be = compiled(model, inner="eager")
        got = f(**kw)
    assert sum(len(r["sites"]) for r in be.reports) == n_export, [len(r["sites"]) for r in be.reports]
    assert be.sites_rewritten == n_export
    a, b = ref[0], got[0]
    assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())


# ---------------------------------------------------------------- Python floats that Dynamo turns into graph inputs

class ScaleAttribute(nn.Module):
    """Decomposed attention whose softmax scale is a Python attribute (changed between calls)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.scale = nn.Linear(16, 48), 0.3

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return ((q @ k.transpose(-2, -1) * self.scale).softmax(-1) @ v).transpose(1, 2).reshape(b, n, 16)


class DropoutAttribute(nn.Module):
    """Attention dropout whose rate is a Python attribute: through SDPA's dropout_p, or F.dropout."""

    def __init__(self, fused: bool):
        super().__init__()
        self.qkv, self.p, self.fused = nn.Linear(16, 48), 0.1, fused

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        if self.fused:
            o = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.p)
        else:
            o = nn.functional.dropout((q @ k.transpose(-2, -1) / 8 ** 0.5).softmax(-1), p=self.p) @ v
        return o.transpose(1, 2).reshape(b, n, 16)


@pytest.mark.parametrize("inner", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_a_scale_that_changes_between_calls_stays_an_argument_of_the_rewritten_graph(inner, recwarn):
    """After the second value Dynamo passes the scale as a graph input (a 0-d tensor read by .item());
    the lowering used to fail on it and Dynamo ran the frame un-rewritten with no report."""
    torch.manual_seed(0)
    m, x = ScaleAttribute(), torch.randn(2, 6, 16)
    f, be = compiled(m, inner=inner)
    for scale in (0.3, 0.4, 0.5, 0.6):
        m.scale = scale
        assert (f(x) - m(x)).abs().max().item() <= 1e-5, scale
    assert len(be.reports) == 2                      # specialised at 0.3, then one graph for every value
    assert [s["status"] for r in be.reports for s in r["sites"]] == ["rewritten", "rewritten"]
    assert be.reports[0]["sites"][0]["scale"] == 0.3 and be.reports[1]["sites"][0]["scale"] == "dynamic"
    assert not any("declined" in r for r in be.reports)
    assert not [w for w in recwarn if "attnrewrite" in str(w.message)]


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa-dropout_p", "F.dropout"])
def test_a_dropout_rate_that_changes_between_calls_is_rewritten_at_each_rate(fused):
    """A rate no op can take as a symbol: Dynamo guards on its value, so each rate is its own graph,
    and each is rewritten with that rate (the same again reuses its graph)."""
    torch.manual_seed(0)
    m, x = DropoutAttribute(fused).train(), torch.randn(2, 6, 16)
    f, be = compiled(m, inner="eager")
    for p in (0.1, 0.2, 0.3, 0.2):
        m.p = p
        f(x).sum().backward()
    assert [[s["dropout"] for s in r["sites"]] for r in be.reports] == [[0.1], [0.2], [0.3]]
    assert be.sites_rewritten == 3 and not any("declined" in r for r in be.reports)


@pytest.mark.slow                                      # three Inductor compiles
def test_a_restarted_frame_leaves_no_report():
    """Inductor asks Dynamo to restart a frame whose float it must specialise (TensorifyScalarRestartAnalysis):
    the abandoned graph's report is dropped, so there is one report per graph that runs."""
    torch.manual_seed(0)
    m, x = DropoutAttribute(True).train(), torch.randn(2, 6, 16)
    f, be = compiled(m)
    for p in (0.1, 0.2):
        m.p = p
        f(x)
    assert [[s["dropout"] for s in r["sites"]] for r in be.reports] == [[0.1], [0.2]]
    assert all(s["status"] == "rewritten" for r in be.reports for s in r["sites"])


def test_a_declined_graph_is_recorded_with_its_reason_and_warned_about_once(monkeypatch):
    """Any failure inside the backend: the graph runs as Dynamo gave it, the report says why."""
    monkeypatch.setattr(B, "WARNED", set())

    def broken(*args, **kwargs):
        raise RuntimeError("lowering exploded\nsecond line")

    monkeypatch.setattr(B, "DynamoFrontEnd", broken)
    torch.manual_seed(0)
    m, x = TwoLayers(graph_break=True), torch.randn(2, 6, 16)
    f, be = compiled(m, inner="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert (f(x) - m(x)).abs().max().item() <= 1e-6
    assert len(be.reports) == 2                                   # both graphs of the graph break
    assert [r["declined"] for r in be.reports] == ["RuntimeError: lowering exploded"] * 2
    assert all(r["sites"] == [] and r in B.REPORTS for r in be.reports)
    ours = [w for w in caught if "attnrewrite" in str(w.message)]
    assert len(ours) == 1 and "lowering exploded" in str(ours[0].message)       # once per reason


def test_a_graph_declined_after_its_rewrite_reports_its_sites_as_kept(monkeypatch):
    """A failure after planning (here: lowering the ops for Inductor): the original graph is compiled
    instead, and the report no longer claims the sites were rewritten."""
    monkeypatch.setattr(B, "WARNED", set())

    def refuse(gm, ops):
        raise ValueError("cannot lower")

    monkeypatch.setattr(B.impl, "lower_graph", refuse)
    monkeypatch.setattr(B, "compile_fx", lambda gm, inputs, **kw: gm)          # (no Inductor build needed)
    torch.manual_seed(0)
    m, x = TinyAttention(), torch.randn(2, 6, 16)
    f, be = compiled(m)
    with pytest.warns(UserWarning, match="cannot lower"):
        assert (f(x) - m(x)).abs().max().item() <= 1e-6
    (report,) = be.reports
    assert report["declined"] == "ValueError: cannot lower"
    (site,) = report["sites"]
    assert site["status"] == "kept" and "the graph was declined: ValueError: cannot lower" in site["reason"]
    assert be.sites_rewritten == 0


def test_a_failed_check_still_raises():
    torch.manual_seed(0)
    f, be = compiled(TinyAttention(), "sparse", inner="eager", check=True, tolerance=0.0, mode="topk", k=1)
    with pytest.raises(Exception, match="check failed on a compiled graph"):
        f(torch.randn(2, 8, 16))


# ---------------------------------------------------------------- site names

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = TinyAttention()

    def forward(self, x):
        return x + self.attn(x)


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


STACK = Stack()


def _through_a_global(x):
    return STACK(x)


@pytest.mark.parametrize("how", ["module", "argument", "global", "submodule"])
def test_site_names_are_module_paths_without_dynamo_sources(how):
    """Dynamo names the root by how it reached it (L['self'], L['fn'], G['STACK']); reports use the
    model's own paths, as the export path does, and --sites selects by them."""
    x = torch.randn(2, 6, 16)
    fn, args, want = {"module": (STACK, (x,), ["layers.0.attn", "layers.1.attn"]),
                      "argument": (lambda mod, x: mod(x), (STACK, x), ["layers.0.attn", "layers.1.attn"]),
                      "global": (_through_a_global, (x,), ["layers.0.attn", "layers.1.attn"]),
                      "submodule": (lambda x: STACK.layers[1](x), (x,), ["layers.1.attn"])}[how]
    f, be = compiled(fn, inner="eager", sites="layers.1.*")
    f(*args)
    sites = [s for r in be.reports for s in r["sites"]]
    assert [s["name"] for s in sites] == want
    assert [s["status"] for s in sites] == ["unselected"] * (len(want) - 1) + ["rewritten"]
    assert [n for n, _ in STACK.named_modules() if n.endswith("attn")] == ["layers.0.attn", "layers.1.attn"]


# ---------------------------------------------------------------- planning: no model run that the plan does not need

class CausalSdpa(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x, mask=None):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return o.transpose(1, 2).reshape(b, n, 16)


PLANS = [("exact", {}), ("sparse", {"mode": "window", "window": 4}),
         ("sparse", {"mode": "block", "block": 16, "density": 0.5, "select": "pooled"}),
         ("conv_basis", {"k": 4})]


@pytest.mark.parametrize("variant,options", PLANS, ids=[v + "-" + o.get("mode", "") for v, o in PLANS])
def test_with_the_check_off_planning_runs_nothing_the_site_record_settles(variant, options, monkeypatch):
    """Each variant's plan of a causal site without a mask needs no captured values, so the backend
    does not run the (dense) original graph to plan it; the rewrite is the one a capture gives."""
    runs = []
    real = B.DynamoFrontEnd.capture
    monkeypatch.setattr(B.DynamoFrontEnd, "capture", lambda self, *a: runs.append(1) or real(self, *a))
    torch.manual_seed(0)
    m, x = CausalSdpa(), torch.randn(1, 32, 16)
    f, be = compiled(m, variant, inner="eager", **options)
    y = f(x)
    assert runs == [] and be.sites_rewritten == 1
    f, checked = compiled(m, variant, inner="eager", check=True, **options)     # the check captures
    assert torch.equal(f(x), y) and runs == [1]
    site, with_capture = be.reports[0]["sites"][0], checked.reports[0]["sites"][0]
    assert site["options"] == with_capture["options"]
    assert site["impl"] == with_capture["impl"]                  # judged on the site's shape: the same choice


def test_planning_still_captures_where_the_record_leaves_a_question_open(monkeypatch):
    """A window whose graph has a mask but no causal flag: is the mask a materialised causal one?
    Only the values can say (band=auto), so the backend captures them."""
    runs = []
    real = B.DynamoFrontEnd.capture
    monkeypatch.setattr(B.DynamoFrontEnd, "capture", lambda self, *a: runs.append(1) or real(self, *a))
    torch.manual_seed(0)
    m, x = CausalSdpa(), torch.randn(1, 32, 16)
    causal = torch.ones(32, 32, dtype=torch.bool).tril()
    f, be = compiled(m, "sparse", inner="eager", mode="window", window=4)
    f(x, causal)
    assert runs == [1]
    assert be.reports[0]["sites"][0]["options"]["band"] == "backward"


# ---------------------------------------------------------------- decoding with a KV cache

import transformers as T  # noqa: E402  (test_hf_models above skips this module without it)


def _causal_lm(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        config = T.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100, n_positions=64,
                              bos_token_id=1, eos_token_id=2)
        model = T.GPT2LMHeadModel(config)
    else:
        config = T.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                               intermediate_size=128, vocab_size=100, max_position_embeddings=64,
                               bos_token_id=1, eos_token_id=2)
        model = T.LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    return model.eval(), config


def _decode(forward, config, ids, steps: int) -> list[torch.Tensor]:
    """Prefill, then `steps` greedy decode steps of one token each against the growing KV cache."""
    out = forward(input_ids=ids, past_key_values=T.DynamicCache(config=config), use_cache=True)
    logits = [out.logits]
    for _ in range(steps):
        out = forward(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits)
    return logits


@pytest.mark.slow                                     # three Inductor compiles
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decode_steps_with_a_kv_cache_run_on_the_fast_path(family):
    """What `model.forward = torch.compile(model.forward, backend=...)` gives generate(): a prefill
    graph, a first decode step (q_len 1 against 9 cached keys), then one graph for every later
    length; every site exact, on SDPA (not the reference), matching the uncompiled model."""
    model, config = _causal_lm(family)
    ids = torch.randint(3, 100, (1, 8))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _decode(model.forward, config, ids, steps=4)
        torch._dynamo.reset()
        be = attnrewrite.compile_backend("exact")
        got = _decode(torch.compile(model.forward, backend=be), config, ids, steps=4)
    for a, b in zip(want, got):
        assert (a - b).abs().max().item() <= 1e-5
    assert len(be.reports) == 3
    sites = [s for r in be.reports for s in r["sites"]]
    assert len(sites) == 6 and all(s["status"] == "rewritten" for s in sites)
    assert [s["q_len"] for s in sites] == [8, 8, 1, 1, 1, 1] and [s["kv_len"] for s in sites[:4]] == [8, 8, 9, 9]
    assert all(isinstance(s["kv_len"], str) for s in sites[4:])                 # decoding: one dynamic graph
    assert {s["impl"] for s in sites} == {"sdpa-cpu"}
    assert all(set(r["lowered"].values()) == {"sdpa-cpu"} for r in be.reports)  # no op, no reference


def test_compiling_the_wrapper_does_not_compile_generate():
    """Why the README says to compile the forward: `torch.compile(model).generate` runs the
    uncompiled model (no graph reaches the backend); `model.compile(backend=...)` does compile it."""
    model, config = _causal_lm("gpt2")
    ids = torch.randint(3, 100, (1, 6))
    kw = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = model.generate(ids, **kw)
        torch._dynamo.reset()
        be = attnrewrite.compile_backend("exact", inner="eager")
        assert torch.equal(torch.compile(model, backend=be).generate(ids, **kw), want)
        assert be.reports == []
        torch._dynamo.reset()
        be = attnrewrite.compile_backend("exact", inner="eager")
        model.compile(backend=be)
        assert torch.equal(model.generate(ids, **kw), want)
    assert be.sites_rewritten >= 4 and all(s["status"] == "rewritten" for r in be.reports for s in r["sites"])
