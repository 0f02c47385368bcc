"""ONNX graphs real exporters and optimizers write, each a class the ONNX path once got wrong.

1. Bloom's ALiBi through `baddbmm` (both exporters): the scores are (B·H, Lq, Lk), biased
   by alibi·beta + alpha·q·kᵀ, then split to (B, H, Lq, Lk) and masked; the probabilities
   are merged back for a bmm with v (TorchScript). The Add is told apart by which side
   reaches a q·kᵀ product (operands computed, not weights), through the head split.
2. GPT-2 eager through the TorchScript exporter with left padding: the causal mask is a
   *finite* fill (finfo.min), and in transformers 4.x it is `torch.where(causal, s, min)`
   before the padding mask is added; a query whose visible keys are all padding spreads
   over min + 0 (future keys) rather than min + min = -inf. The normal form replays the
   mask steps in order instead of turning fills into -inf.
3. q/k through contrib ops (com.microsoft RotaryEmbedding, onnxruntime's
   SimplifiedLayerNormalization) when shape inference gives up: the detector reads ranks
   (and often dims) from the graph itself.
4. Inputs that already hold contrib ops: load-time validation and the post-rewrite check
   look at what the rewrite changed, so those nodes are not errors; a broken lowering is.

Every model is small and built or exported once (functools.cache); each test asserts the
site count, status rewritten and rel_err <= 1e-5 per site and end to end in onnxruntime.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
T = pytest.importorskip("transformers")

from onnx import TensorProto, helper  # noqa: E402

import attnrewrite  # noqa: E402
from attnrewrite.cli import main  # noqa: E402
from attnrewrite.frontends.onnx import load_model  # noqa: E402
from attnrewrite.io import InputError  # noqa: E402
from attnrewrite.passes import onnx_detect, onnx_graph  # noqa: E402

BOUND = 1e-5
B, S, HIDDEN, HEADS = 2, 8, 64, 4
D = HIDDEN // HEADS
DIR = Path(tempfile.mkdtemp(prefix="attnrewrite-realworld-"))
atexit.register(shutil.rmtree, DIR, ignore_errors=True)


def _feeds(left_padding: bool) -> dict:
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    if left_padding:
        mask[1, :3] = 0                  # row 1's first queries see only padding keys
    else:
        mask[1, -3:] = 0
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


class Named(torch.nn.Module):
    """(input_ids, attention_mask) positional, first output only."""

    def __init__(self, model, **extra):
        super().__init__()
        self.model, self.extra = model, extra

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **self.extra)
        return out if isinstance(out, torch.Tensor) else out[0]


def _export(module, feeds: dict, name: str, exporter: str) -> Path:
    """torch.onnx.export: dynamo=True static, or the TorchScript exporter (opset 17, dynamic B/L)."""
    path = DIR / f"{name}-{exporter}.onnx"
    names = list(feeds)
    args = tuple(torch.from_numpy(feeds[n]) for n in names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(module.eval(), args, str(path), input_names=names, dynamo=True, verbose=False)
        else:
            torch.onnx.export(module.eval(), args, str(path), input_names=names, dynamo=False, opset_version=17,
                              dynamic_axes={n: {0: "batch", 1: "seq"} for n in names})
    return path


def _assert_exact(r, count: int) -> None:
    rep = r.report
    assert len(rep["sites"]) == count, rep["sites"]
    for s in rep["sites"]:
        assert s["status"] == "rewritten" and s["check"]["rel_err"] <= BOUND, s
    assert rep["check"]["rel_err"] <= BOUND and rep["check"]["passed"] is True, rep["check"]
    lowered = [n for n in r.program.graph.node if n.name.startswith("attnrewrite/")
               and n.op_type in ("Softmax", "Attention")]
    assert len(lowered) == count                         # the sites really were replaced


# ----------------------------------------------------------------------------- 1. Bloom / baddbmm

@functools.cache
def bloom(exporter: str):
    torch.manual_seed(0)
    config = T.BloomConfig(hidden_size=HIDDEN, n_layer=2, n_head=HEADS, vocab_size=100,
                           attn_implementation="eager")
    feeds = _feeds(left_padding=False)
    return _export(Named(T.BloomModel(config), use_cache=False), feeds, "bloom", exporter), feeds


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_bloom_alibi_baddbmm(exporter):
    """alibi.baddbmm(q, kᵀ, beta=1, alpha=1/√d) → view(B, H, Lq, Lk) + mask: both sites, exact."""
    path, feeds = bloom(exporter)
    r = attnrewrite.rewrite(str(path), "exact", example_inputs=feeds)
    _assert_exact(r, 2)
    for s in r.sites:
        assert (s.source, s.heads, s.kv_heads, s.head_dim, s.mask) == ("onnx-decomposed", HEADS, HEADS, D,
                                                                        "additive"), s.to_dict()
        assert s.scale == pytest.approx(D ** -0.5, rel=1e-6)
        assert s.q_len == s.kv_len == (S if exporter == "dynamo" else "seq")


def test_heads_merged_throughout():
    """q, k, v only ever (B·H, L, D): the rewrite splits them by the head count; a bias
    added before the split, broadcast over B·H, is expanded and split too; the finite
    fill after it leaves batch 1's first rows with no key (they spread over all keys)."""
    n, lk = B * HEADS, 6
    vi = helper.make_tensor_value_info
    inits = [helper.make_tensor("c", TensorProto.FLOAT, [], [0.25]),
             helper.make_tensor("to4", TensorProto.INT64, [4], [B, HEADS, lk, -1]),
             helper.make_tensor("to3", TensorProto.INT64, [3], [n, lk, lk]),
             helper.make_tensor("min", TensorProto.FLOAT, [], [float(np.finfo(np.float32).min)])]
    nodes = [helper.make_node("Transpose", ["k3"], ["kT"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q3", "kT"], ["qk"]),
             helper.make_node("Mul", ["qk", "c"], ["s"]),
             helper.make_node("Add", ["bias3", "s"], ["sb"]),
             helper.make_node("Reshape", ["sb", "to4"], ["s4"]),
             helper.make_node("Where", ["keep4", "s4", "min"], ["sm"]),
             helper.make_node("Softmax", ["sm"], ["p4"], axis=-1),
             helper.make_node("Reshape", ["p4", "to3"], ["p3"]),
             helper.make_node("MatMul", ["p3", "v3"], ["o3"])]
    ins = [vi(x, TensorProto.FLOAT, [n, lk, D]) for x in ("q3", "k3", "v3")]
    ins += [vi("bias3", TensorProto.FLOAT, [1, 1, lk]), vi("keep4", TensorProto.BOOL, [B, 1, lk, lk])]
    g = helper.make_graph(nodes, "g", ins, [vi("o3", TensorProto.FLOAT, [n, lk, D])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    rng = np.random.default_rng(0)
    keep = np.tril(np.ones((lk, lk), bool))[None, None].repeat(B, 0)
    keep[1, :, :, :2] = False
    feeds = {x: rng.standard_normal((n, lk, D)).astype(np.float32) for x in ("q3", "k3", "v3")}
    feeds.update(bias3=rng.standard_normal((1, 1, lk)).astype(np.float32), keep4=keep)
    r = attnrewrite.rewrite(m, "exact", example_inputs=feeds)
    _assert_exact(r, 1)
    s = r.sites[0]
    assert (s.batch, s.heads, s.kv_heads, s.q_len, s.kv_len, s.head_dim) == (B, HEADS, HEADS, lk, lk, D), s.to_dict()


def test_bias_through_a_weight_product_is_not_the_scores():
    """Add(scores, MatMul(table, W)): only the side whose product reads two computed
    operands is the scores, the other is a bias (before: 'cannot tell scores from bias')."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, HEADS, S, D])
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor("table", TensorProto.FLOAT, [S, 3], rng.standard_normal(S * 3)),
             helper.make_tensor("w", TensorProto.FLOAT, [3, S], rng.standard_normal(3 * S)),
             helper.make_tensor("c", TensorProto.FLOAT, [], [0.25])]
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["x", "xt"], ["qk"]),
             helper.make_node("Mul", ["qk", "c"], ["s"]),
             helper.make_node("MatMul", ["table", "w"], ["bias"]),
             helper.make_node("Add", ["bias", "s"], ["sb"]),
             helper.make_node("Softmax", ["sb"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "x"], ["y"])]
    g = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, HEADS, S, D])],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    r = attnrewrite.rewrite(m, "exact", example_inputs={"x": rng.standard_normal((B, HEADS, S, D)).astype(np.float32)})
    _assert_exact(r, 1)
    assert r.sites[0].mask == "additive" and r.sites[0].scale == pytest.approx(0.25)


# ----------------------------------------------------------------------------- 2. GPT-2 mask algebra

class GPT2V4Attention(torch.nn.Module):
    """transformers 4.x GPT-2 eager attention, as it spelled its masks (4.51 checked):
    scores / torch.full([], √d), torch.where(causal, scores, torch.full([], finfo.min)),
    then + the padding mask (1 - m)·finfo.min. (The installed transformers builds one
    mask in masking_utils instead, so the spelling is kept here.)"""

    def __init__(self, max_pos: int = 32):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(max_pos, max_pos, dtype=torch.bool))[None, None],
                             persistent=False)
        self.c_attn = torch.nn.Linear(HIDDEN, 3 * HIDDEN)
        self.c_proj = torch.nn.Linear(HIDDEN, HIDDEN)

    def _heads(self, x):
        return x.view(x.size()[:-1] + (HEADS, D)).permute(0, 2, 1, 3)

    def forward(self, x, attention_mask):
        q, k, v = (self._heads(t) for t in self.c_attn(x).split(HIDDEN, dim=2))
        w = torch.matmul(q, k.transpose(-1, -2))
        w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype, device=w.device)
        ql, kl = q.size(-2), k.size(-2)
        causal = self.bias[:, :, kl - ql:kl, :kl]
        mask_value = torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype, device=w.device)
        w = torch.where(causal, w.to(w.dtype), mask_value)
        w = w + attention_mask
        w = torch.nn.functional.softmax(w, dim=-1).type(v.dtype)
        o = torch.matmul(w, v).permute(0, 2, 1, 3).contiguous()
        return self.c_proj(o.view(o.size()[:-2] + (HIDDEN,)))


class GPT2V4(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(100, HIDDEN)
        self.h = torch.nn.ModuleList([GPT2V4Attention(), GPT2V4Attention()])

    def forward(self, input_ids, attention_mask):
        m = attention_mask.view(input_ids.shape[0], -1)[:, None, None, :].to(torch.float32)
        m = (1.0 - m) * torch.finfo(torch.float32).min
        x = self.wte(input_ids)
        for block in self.h:
            x = x + block(x, m)
        return x


@functools.cache
def gpt2(kind: str, exporter: str):
    torch.manual_seed(0)
    feeds = _feeds(left_padding=True)
    if kind == "transformers":
        config = T.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=HEADS, vocab_size=100, n_positions=32,
                              bos_token_id=1, eos_token_id=2, attn_implementation="eager")
        module = Named(T.GPT2Model(config), use_cache=False)
    else:
        module = GPT2V4()
    return _export(module, feeds, f"gpt2-{kind}", exporter), feeds


@pytest.mark.parametrize("kind,exporter", [("transformers", "legacy"), ("v4", "legacy"), ("v4", "dynamo")])
def test_gpt2_eager_finite_fill_then_padding(kind, exporter):
    """where(causal, s, min) [+ (1 - m)·min] with left padding: per site and end to end exact
    (before: fills read as -inf, per-site rel_err 0.27-0.56; the v4 spelling's
    s / torch.full([], √d) was not read as a scale at all)."""
    path, feeds = gpt2(kind, exporter)
    r = attnrewrite.rewrite(str(path), "exact", example_inputs=feeds)
    _assert_exact(r, 2)
    for s in r.sites:
        # transformers 5 adds one Where(keep, 0, min): read as a boolean mask (as the sdpa
        # exports' masks are); the 4.x spelling adds a float padding mask after its fill
        mask = "boolean" if kind == "transformers" else "additive"
        assert (s.heads, s.head_dim, s.mask) == (HEADS, D, mask), s.to_dict()
        assert s.scale == pytest.approx(D ** -0.5, rel=1e-6), s.to_dict()


FILL_SPELLINGS = {   # the causal fill (finfo.min) and the padding bias (finfo.min), in the orders models use
    "where_then_pad": [("Where", ["causal", "s", "min"]), ("Add", ["s", "pad"])],
    "added_where_then_pad": [("Where", ["causal", "zero", "min"], "w"), ("Add", ["s", "w"]), ("Add", ["pad", "s"])],
    "pad_then_where": [("Add", ["s", "pad"]), ("Where", ["causal", "s", "min"])],
    "drop_where_then_pad": [("Not", ["causal"], "future"), ("Where", ["future", "min", "s"]), ("Add", ["s", "pad"])],
}


@pytest.mark.parametrize("spelling", FILL_SPELLINGS)
def test_finite_fills_in_any_order(spelling):
    """Left padding leaves rows whose keys are all masked; with finite fills the original
    spreads them over min + 0 rather than min + min = -inf keys, whatever the order."""
    vi, lk = helper.make_tensor_value_info, 6
    fmin = float(np.finfo(np.float32).min)
    inits = [helper.make_tensor("c", TensorProto.FLOAT, [], [0.25]),
             helper.make_tensor("min", TensorProto.FLOAT, [], [fmin]),
             helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
             helper.make_tensor("causal", TensorProto.BOOL, [1, 1, lk, lk], np.tril(np.ones((lk, lk), bool)).ravel())]
    nodes = [helper.make_node("Transpose", ["k"], ["kT"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kT"], ["qk"]), helper.make_node("Mul", ["qk", "c"], ["s0"])]
    cur = "s0"
    for i, (op, ins, *out) in enumerate(FILL_SPELLINGS[spelling]):
        name = out[0] if out else f"s{i + 1}"
        nodes.append(helper.make_node(op, [cur if x == "s" else x for x in ins], [name]))
        cur = name if not out else cur
    nodes += [helper.make_node("Softmax", [cur], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["y"])]
    ins = [vi(x, TensorProto.FLOAT, [B, HEADS, lk, D]) for x in "qkv"] + [vi("pad", TensorProto.FLOAT, [B, 1, 1, lk])]
    g = helper.make_graph(nodes, "g", ins, [vi("y", TensorProto.FLOAT, [B, HEADS, lk, D])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    rng = np.random.default_rng(0)
    pad = np.zeros((B, 1, 1, lk), np.float32)
    pad[1, ..., :3] = fmin                               # batch 1 is left-padded by three keys
    feeds = {x: rng.standard_normal((B, HEADS, lk, D)).astype(np.float32) for x in "qkv"}
    r = attnrewrite.rewrite(m, "exact", example_inputs={**feeds, "pad": pad})
    _assert_exact(r, 1)


# ----------------------------------------------------------------------------- 3./4. contrib ops

L = 6


def contrib_model(ops: str = "both", layers: int = 2, contrib_elsewhere: bool = False, seed: int = 0):
    """(model, feeds): `layers` attention blocks whose q and k pass through contrib ops.

    x → MatMul/Add → Reshape(0, 0, H, D) → Transpose → [SimplifiedLayerNormalization]
    [→ com.microsoft RotaryEmbedding] → MatMul(q, kᵀ) · 1/√D → Softmax → MatMul(p, v) → ...
    ops: "rotary", "rmsnorm" or "both". SimplifiedLayerNormalization is onnxruntime's own
    op in the standard domain (how its transformer optimizer and Phi/Llama exports write
    it); `contrib_elsewhere` adds a com.microsoft FastGelu after each block.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def init(name, arr):
        inits.append(onnx.numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(op, ins, out, domain="", **attrs):
        nodes.append(helper.make_node(op, ins, [out], name=out + "_node", domain=domain, **attrs))
        return out

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    inv = 1.0 / (10000 ** (np.arange(0, D, 2) / D))
    angles = np.arange(32)[:, None] * inv[None]
    init("cos", np.cos(angles).astype(np.float32))
    init("sin", np.sin(angles).astype(np.float32))
    init("to_heads", np.array([0, 0, HEADS, D], np.int64))
    init("to_hidden", np.array([0, 0, HIDDEN], np.int64))
    init("scale", np.array(D ** -0.5, np.float32))
    h = "x"
    for layer in range(layers):
        p = f"l{layer}/"
        t = {}
        for r in "qkv":
            y = node("Add", [node("MatMul", [h, init(p + "W" + r, weight(HIDDEN, HIDDEN))], p + r + "_proj"),
                             init(p + "b" + r, weight(HIDDEN))], p + r + "_bias")
            y = node("Reshape", [y, "to_heads"], p + r + "_bshd")
            y = node("Transpose", [y], p + r + "_bhsd", perm=[0, 2, 1, 3])
            if r != "v" and ops in ("rmsnorm", "both"):
                y = node("SimplifiedLayerNormalization", [y, init(p + "g" + r, 1 + weight(D))], p + r + "_norm",
                         axis=-1, epsilon=1e-6)
            if r != "v" and ops in ("rotary", "both"):
                y = node("RotaryEmbedding", [y, "position_ids", "cos", "sin"], p + r + "_rot", domain="com.microsoft")
            t[r] = y
        s = node("MatMul", [t["q"], node("Transpose", [t["k"]], p + "kT", perm=[0, 1, 3, 2])], p + "scores")
        probs = node("Softmax", [node("Mul", [s, "scale"], p + "scaled")], p + "probs", axis=-1)
        o = node("Transpose", [node("MatMul", [probs, t["v"]], p + "ctx")], p + "ctx_bshd", perm=[0, 2, 1, 3])
        o = node("MatMul", [node("Reshape", [o, "to_hidden"], p + "ctx_flat"), init(p + "Wo", weight(HIDDEN, HIDDEN))],
                 p + "out")
        if contrib_elsewhere:
            o = node("FastGelu", [o], p + "gelu", domain="com.microsoft")
        h = node("Add", [h, o], p + "resid")
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
           helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])]
    outs = [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["batch", "seq", HIDDEN])]
    g = helper.make_graph(nodes, "contrib", ins, outs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    feeds = {"x": rng.standard_normal((B, L, HIDDEN)).astype(np.float32),
             "position_ids": np.tile(np.arange(L), (B, 1)).astype(np.int64)}
    return m, feeds


OPS = ["rotary", "rmsnorm", "both"]


@pytest.mark.parametrize("ops", OPS)
def test_contrib_ops_shapes_read_from_the_graph(ops):
    """onnx's own inference stops at the contrib ops: ranks and dims come from the Reshape's
    constant shape, the Transpose's perm and the shape-preserving ops (before: 'q·kᵀ of rank None')."""
    m, _ = contrib_model(ops)
    ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])   # it runs as built
    inferred = onnx.shape_inference.infer_shapes(onnx_graph.light_copy(m))
    q = "l0/q_rot" if ops != "rmsnorm" else "l0/q_norm"
    assert not any(v.name == q and v.type.tensor_type.HasField("shape") for v in inferred.graph.value_info)
    sites, unmatched, g = onnx_detect.find_sites(m, inferred)
    assert unmatched == [] and len(sites) == 2, unmatched
    assert g.shape(q) == ["batch", HEADS, "seq", D] and g.elem_type(q) == TensorProto.FLOAT
    for s in sites:
        assert (s.heads, s.kv_heads, s.head_dim, s.dtype) == (HEADS, HEADS, D, "float32"), s.to_dict()
        assert s.scale == pytest.approx(D ** -0.5)


def _no_symbolic_inference(monkeypatch):
    """onnxruntime's symbolic inference giving up, as it does on graphs it cannot complete."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    def give_up(*args, **kwargs):
        raise Exception("Incomplete symbolic shape inference")
    monkeypatch.setattr(SymbolicShapeInference, "infer_shapes", staticmethod(give_up))


@pytest.mark.parametrize("ops", OPS)
def test_contrib_ops_rewritten_exactly_without_symbolic_shapes(ops, monkeypatch):
    _no_symbolic_inference(monkeypatch)
    m, feeds = contrib_model(ops, contrib_elsewhere=True)
    r = attnrewrite.rewrite(m, "exact", example_inputs=feeds)
    _assert_exact(r, 2)
    kept = {(n.domain, n.op_type) for n in r.program.graph.node}
    assert ("com.microsoft", "FastGelu") in kept
    assert (("com.microsoft", "RotaryEmbedding") in kept) == (ops != "rmsnorm")


def test_contrib_input_through_the_cli(tmp_path, capsys):
    """A model holding com.microsoft and onnxruntime-only standard-domain ops: loaded,
    rewritten, checked and written (before: 'No Op registered for SimplifiedLayerNormalization')."""
    m, feeds = contrib_model("both", contrib_elsewhere=True)
    path, out = tmp_path / "contrib.onnx", tmp_path / "contrib.exact.onnx"
    onnx.save(m, str(path))
    np.savez(tmp_path / "feeds.npz", **feeds)
    assert main([str(path), "--variant", "exact", "-o", str(out), "--inputs", str(tmp_path / "feeds.npz")]) == 0
    assert "PASSED" in capsys.readouterr().out
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= BOUND


def test_validation_accepts_contrib_ops_but_not_unknown_ones(tmp_path):
    m, _ = contrib_model("both", layers=1, contrib_elsewhere=True)
    onnx.save(m, str(tmp_path / "ok.onnx"))
    load_model(tmp_path / "ok.onnx")
    bad = onnx.ModelProto()
    bad.CopyFrom(m)
    next(n for n in bad.graph.node if n.op_type == "Softmax").op_type = "FrobnicateOp"
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    with pytest.raises(InputError, match="No Op registered for FrobnicateOp"):
        load_model(tmp_path / "bad.onnx")


@pytest.mark.parametrize("breakage", ["type", "edge", "rank"])
def test_broken_lowering_is_still_reported(breakage):
    """Pre-existing contrib nodes are not errors; a lowering that is wrong still is."""
    import dataclasses
    from attnrewrite.variants import exact
    lower = exact.onnx_lower

    def broken(b, site, q, k, v, mask, options):
        y = lower(b, site, q, k, v, mask, options)
        if breakage == "type":
            return b.op("Add", y, b.ints(1))                 # float + int64
        if breakage == "edge":
            return b.op("Add", y, "nowhere")                 # reads a value nothing computes
        return b.op("Unsqueeze", y, b.ints(0))               # one axis too many for its readers
    m, feeds = contrib_model("both")
    with pytest.raises(RuntimeError, match="fails onnx.checker"):
        attnrewrite.rewrite(m, dataclasses.replace(exact.VARIANT, onnx_lower=broken), example_inputs=feeds)
