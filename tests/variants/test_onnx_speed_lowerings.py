"""The ONNX lowerings that skip work: exact without extras, sparse window and block
(select=pooled) as gathered block attention, and `onnx_attention` for exact.

* Hand-built graphs (inputs q/k/v[/m], the only computation one `onnx_lower`): each lowering
  matches its PyTorch reference in onnxruntime (rel_err ≤ 1e-5) at lengths that are not
  multiples of the window/block, causal or not, Lq ≠ Lk, with masks, soft-cap and GQA.
* Shape inference on a lowered window/block graph with static lengths finds no tensor whose
  last two dims are (L, L), nor any (L, L) initializer.
* The exact lowering of a causal dynamo export without padding has no IsNaN (and drops the
  exporter's constant (L, L) mask for the causal flag); one with a runtime padding mask keeps
  the guard and gives zeros, not NaN, on fully padded rows.
* onnx_attention=standard|contrib|decomposed each reproduce the original model (≤ 1e-5) and
  emit the op they name (standard raises opset 20 to 23).
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

from onnx import TensorProto as TP, helper  # noqa: E402
from test_onnx_variants import BOUND, CausalTwo, _rel, _run, exported  # noqa: E402

import attnrewrite  # noqa: E402
from attnrewrite.passes import onnx_graph  # noqa: E402
from attnrewrite.site import AttentionSite  # noqa: E402
from attnrewrite.variants import exact as ex  # noqa: E402
from attnrewrite.variants import sparse as sp  # noqa: E402

DIR = Path(tempfile.mkdtemp(prefix="onnxspeed_"))
atexit.register(shutil.rmtree, DIR, ignore_errors=True)


def _graph(mod, opts, lq, lk, heads=2, kv_heads=2, d=8, causal=False, mask=None, softcap=0.0, static=True):
    """A model computing only `mod.onnx_lower`; mask: None, "pad" (B, 1, 1, Lk) bool or "rows"
    (B, 1, Lq, Lk) additive. Static dims, or symbols "a"/"b" for the lengths."""
    a, bb = (lq, lk) if static else ("a", "b")
    ins = [helper.make_tensor_value_info("q", TP.FLOAT, [2, heads, a, d]),
           helper.make_tensor_value_info("k", TP.FLOAT, [2, kv_heads, bb, d]),
           helper.make_tensor_value_info("v", TP.FLOAT, [2, kv_heads, bb, d])]
    if mask == "pad":
        ins.append(helper.make_tensor_value_info("m", TP.BOOL, [2, 1, 1, bb]))
    elif mask == "rows":
        ins.append(helper.make_tensor_value_info("m", TP.FLOAT, [2, 1, a, bb]))
    model = helper.make_model(helper.make_graph([], "g", ins, []), opset_imports=[helper.make_opsetid("", 17)])
    b = onnx_graph.Builder(onnx_graph.Graph(model))
    site = AttentionSite(id=0, name="s", source="x", heads=heads, kv_heads=kv_heads, scale=0.3, softcap=softcap,
                         causal=causal, q_len=a, kv_len=bb)
    y = mod.onnx_lower(b, site, "q", "k", "v", "m" if mask else None, opts)
    model.graph.node.extend(b.nodes)
    model.graph.initializer.extend(b.inits)
    model.graph.output.append(helper.make_tensor_value_info(y, TP.FLOAT, [2, heads, a, d]))
    onnx.checker.check_model(model, full_check=True)
    return model


def _inputs(lq, lk, heads=2, kv_heads=2, d=8, mask=None, seed=0):
    g = np.random.default_rng(seed)
    feeds = {"q": g.standard_normal((2, heads, lq, d)).astype(np.float32),
             "k": g.standard_normal((2, kv_heads, lk, d)).astype(np.float32),
             "v": g.standard_normal((2, kv_heads, lk, d)).astype(np.float32)}
    if mask == "pad":                                  # batch 1: its last 5 keys padded
        feeds["m"] = (np.arange(lk) < np.array([lk, lk - 5])[:, None]).reshape(2, 1, 1, lk)
    elif mask == "rows":
        keep = g.random((2, 1, lq, lk)) > 0.3
        feeds["m"] = np.where(keep, 0.3 * g.standard_normal((2, 1, lq, lk)), -np.inf).astype(np.float32)
    return feeds


def _check(mod, opts, lq, lk, mask=None, causal=False, softcap=0.0, heads=2, kv_heads=2, static=True):
    """ORT output of the lowering vs the variant's reference; returns the rel_err."""
    model = _graph(mod, opts, lq, lk, heads, kv_heads, causal=causal, mask=mask, softcap=softcap, static=static)
    feeds = _inputs(lq, lk, heads, kv_heads, mask=mask)
    got = _run(model, feeds)
    got = next(iter(got.values()))
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    ref = mod.reference(t["q"], t["k"], t["v"], t.get("m"), 0.3, softcap, causal, 0.0,
                        *mod.op_args(None, opts))
    assert np.isfinite(got).all()
    return _rel(ref.numpy(), got)


WINDOW = {  # id: (options, lq, lk, extra keywords); blocked unless c + band + sinks ≥ a static Lk
    "backward-causal": ({"window": 5, "sinks": 2, "band": "backward"}, 77, 77, {"causal": True}),
    "no-sinks": ({"window": 40, "sinks": 0, "band": "backward"}, 130, 130, {"causal": True}),
    "two-sided": ({"window": 6, "sinks": 1, "band": "two-sided"}, 77, 77, {}),
    "cross-lq<lk": ({"window": 5, "sinks": 2, "band": "backward"}, 41, 95, {"causal": True}),
    "cross-lq>lk": ({"window": 5, "sinks": 0, "band": "backward"}, 95, 41, {"causal": True}),
    "pad-mask": ({"window": 7, "sinks": 2, "band": "backward"}, 77, 77, {"causal": True, "mask": "pad"}),
    "row-mask": ({"window": 7, "sinks": 2, "band": "two-sided"}, 77, 77, {"mask": "rows"}),
    "softcap-gqa": ({"window": 9, "sinks": 3, "band": "backward"}, 101, 101,
                    {"causal": True, "softcap": 2.0, "heads": 4, "kv_heads": 2}),
    "dynamic": ({"window": 5, "sinks": 2, "band": "backward"}, 37, 37, {"causal": True, "static": False}),
    "short-dense": ({"window": 5, "sinks": 2, "band": "backward"}, 37, 37, {"causal": True}),
}


@pytest.mark.parametrize("config", WINDOW)
def test_window_matches_reference(config):
    opts, lq, lk, kw = WINDOW[config]
    o = {"mode": "window", **opts}
    site = AttentionSite(id=0, name="s", source="x", q_len=lq, kv_len=lk if kw.get("static", True) else "b")
    assert sp.onnx_lowering._onnx_window_dense(site, sp._options(o), kw.get("causal", False)) == (config == "short-dense")
    assert _check(sp, o, lq, lk, **kw) <= BOUND


BLOCK = {  # id: (options, lq, lk, extra keywords)
    "causal": ({"block": 8, "density": 0.3}, 37, 37, {"causal": True}),
    "bidirectional": ({"block": 8, "density": 0.3}, 45, 45, {}),
    "cross": ({"block": 8, "density": 0.4}, 30, 45, {"causal": True}),
    "mass": ({"block": 8, "density": 1.0, "mass": 0.5}, 37, 37, {"causal": True}),
    "softcap-gqa": ({"block": 8, "density": 0.3}, 41, 41, {"causal": True, "softcap": 2.0, "heads": 4,
                                                            "kv_heads": 2}),
}


@pytest.mark.parametrize("config", BLOCK)
def test_pooled_block_matches_reference(config):
    opts, lq, lk, kw = BLOCK[config]
    kv = kw.pop("kv_heads", 2)
    heads = kw.pop("heads", 2)
    o = {"mode": "block", "select": "pooled", **opts}
    if kv != heads:                  # onnx_lower reads GQA from the site; the reference expands k/v itself
        assert _check(sp, o, lq, lk, heads=heads, kv_heads=kv, **kw) <= BOUND
    else:
        assert _check(sp, o, lq, lk, **kw) <= BOUND


def test_pooled_block_density_one_is_exact():
    """density 1 keeps every visible block: exact attention."""
    model = _graph(sp, {"mode": "block", "select": "pooled", "block": 8, "density": 1.0}, 37, 37, causal=True)
    feeds = _inputs(37, 37)
    got = next(iter(_run(model, feeds).values()))
    t = [torch.from_numpy(feeds[k]) for k in ("q", "k", "v")]
    assert _rel(ex.reference(*t, None, 0.3, 0.0, True, 0.0).numpy(), got) <= BOUND


def _square_shapes(model, n: int) -> list:
    """Values (and initializers) whose last two dims are (n, n) after shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    found = []
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if len(dims) >= 2 and dims[-2:] == [n, n]:
            found.append(vi.name)
    found += [t.name for t in model.graph.initializer if len(t.dims) >= 2 and list(t.dims[-2:]) == [n, n]]
    return found


@pytest.mark.parametrize("opts", [{"mode": "window", "window": 16, "sinks": 4, "band": "backward"},
                                  {"mode": "block", "select": "pooled", "block": 16, "density": 0.25}],
                         ids=["window", "block"])
def test_no_square_tensor(opts):
    n = 100
    model = _graph(sp, opts, n, n, causal=True)
    inferred = onnx.shape_inference.infer_shapes(model)
    known = sum(bool(vi.type.tensor_type.shape.dim) for vi in inferred.graph.value_info)
    assert known > 10                                   # inference did see the graph's shapes
    assert _square_shapes(model, n) == []
    dense = _graph(sp, {"mode": "topk", "k": 4}, n, n, causal=True)   # the check can fail: topk is dense
    assert _square_shapes(dense, n)


@functools.cache
def _dynamo_causal(n: int) -> str:
    """test_onnx_variants' two-layer causal model, exported by dynamo at a static length n."""
    path = DIR / f"causal-dynamo-{n}.onnx"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(CausalTwo().eval(), (torch.randn(1, n, 32),), str(path), input_names=["x"], dynamo=True,
                          verbose=False)
    return str(path)


def test_dynamo_causal_export_window_block_have_no_square_tensor():
    """The dynamo export's constant causal mask becomes the flag: no (L, L) value or initializer left."""
    n = 80
    path = _dynamo_causal(n)
    assert _square_shapes(onnx.load(path), n)          # the original has its (L, L) mask and scores
    x = {"x": np.random.default_rng(0).standard_normal((1, n, 32)).astype(np.float32)}
    for opts in ({"mode": "window", "window": 8, "sinks": 2},
                 {"mode": "block", "select": "pooled", "block": 16, "density": 0.3}):
        r = attnrewrite.rewrite(path, "sparse", example_inputs=x, **opts)
        assert all(s.status == "rewritten" for s in r.sites), [s.to_dict() for s in r.sites]
        assert _square_shapes(r.program, n) == [], opts
        assert r.report["check"]["rel_err"] < 0.5       # an approximation of the same model


def _x(n=12, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((2, n, 32)).astype(np.float32)}


def test_exact_causal_without_padding_has_no_isnan():
    path = exported("causal", "dynamo")
    src = onnx.load(str(path))
    r = attnrewrite.rewrite(str(path), "exact", example_inputs=_x())
    ops = [n.op_type for n in r.program.graph.node]
    assert "IsNaN" not in ops and ops.count("Softmax") == 2
    assert not any(n.op_type == "Mul" and "attnrewrite" in n.name and "MatMul" in "".join(n.input)
                   for n in r.program.graph.node)                 # the scale is on q, not on the scores
    feeds = _x(seed=3)
    a, b = _run(src, feeds), _run(r.program, feeds)
    assert max(_rel(a[k], b[k]) for k in a) <= BOUND


def test_exact_padding_keeps_guard_and_zeros():
    path = exported("padded", "legacy")
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 12, 32)).astype(np.float32),
             "keep": np.ones((2, 12), bool)}
    r = attnrewrite.rewrite(str(path), "exact", example_inputs=feeds)
    assert "IsNaN" in [n.op_type for n in r.program.graph.node]
    feeds["keep"][1] = False
    out = next(iter(_run(r.program, feeds).values()))
    assert np.isfinite(out).all() and not out[1].any() and out[0].any()


@pytest.mark.parametrize("how,op,domain,opset", [("standard", "Attention", "", 23),
                                                 ("contrib", "GroupQueryAttention", "com.microsoft", 20),
                                                 ("decomposed", "Softmax", "", 20)])
def test_onnx_attention_option(how, op, domain, opset):
    path = exported("causal", "dynamo")
    src = onnx.load(str(path))
    r = attnrewrite.rewrite(str(path), "exact", example_inputs=_x(), onnx_attention=how)
    new = r.program
    assert all(s.status == "rewritten" for s in r.sites)
    assert [n.op_type for n in new.graph.node if n.domain == domain].count(op) == 2
    assert next(o.version for o in new.opset_import if o.domain == "") == opset
    feeds = _x(seed=5)
    a, b = _run(src, feeds), _run(new, feeds)
    assert max(_rel(a[k], b[k]) for k in a) <= BOUND


@pytest.mark.parametrize("case", ["padded", "cross"])
def test_contrib_multi_head_attention(case):
    """Masks and Lq ≠ Lk go to com.microsoft MultiHeadAttention; fully padded rows give zeros."""
    path = exported(case, "legacy")
    g = np.random.default_rng(2)
    feeds = {"x": g.standard_normal((2, 12, 32)).astype(np.float32)}
    feeds.update({"keep": np.arange(12)[None] < np.array([[12], [7]])} if case == "padded"
                 else {"mem": g.standard_normal((2, 16, 32)).astype(np.float32)})
    r = attnrewrite.rewrite(str(path), "exact", example_inputs=feeds, onnx_attention="contrib")
    assert "MultiHeadAttention" in [n.op_type for n in r.program.graph.node]
    src = onnx.load(str(path))
    a, b = _run(src, feeds), _run(r.program, feeds)
    assert max(_rel(a[k], b[k]) for k in a) <= BOUND
    if case == "padded":
        feeds["keep"][1] = False
        out = next(iter(_run(r.program, feeds).values()))
        assert np.isfinite(out).all() and not out[1].any()


def test_standard_moves_lowest_fill_up():
    """onnxruntime's Attention reads finfo.min as "removed": a row of it must still average V."""
    lq = lk = 6
    ins = [helper.make_tensor_value_info(n, TP.FLOAT, [1, 1, 6, 4]) for n in "qkv"]
    ins.append(helper.make_tensor_value_info("m", TP.FLOAT, [1, 1, lq, lk]))
    model = helper.make_model(helper.make_graph([], "g", ins, []), opset_imports=[helper.make_opsetid("", 23)])
    b = onnx_graph.Builder(onnx_graph.Graph(model))
    site = AttentionSite(id=0, name="s", source="x", heads=1, kv_heads=1, scale=0.5, q_len=lq, kv_len=lk)
    y = ex.onnx_lower(b, site, "q", "k", "v", "m", {"onnx_attention": "standard"})
    model.graph.node.extend(b.nodes)
    model.graph.initializer.extend(b.inits)
    model.graph.output.append(helper.make_tensor_value_info(y, TP.FLOAT, [1, 1, lq, 4]))
    feeds = {n: np.random.default_rng(i).standard_normal((1, 1, 6, 4)).astype(np.float32) for i, n in enumerate("qkv")}
    m = np.zeros((1, 1, lq, lk), np.float32)
    m[..., 2, :] = np.finfo(np.float32).min
    m[..., 4, 3:] = -np.inf
    feeds["m"] = m
    got = next(iter(_run(model, feeds).values()))
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    ref = ex.reference(t["q"], t["k"], t["v"], t["m"], 0.5, 0.0, False, 0.0).numpy()
    assert np.abs(got[..., 2, :]).max() > 0 and _rel(ref, got) <= BOUND


@pytest.mark.parametrize("lq,lk", [(301, 301), (257, 300)])
def test_exact_causal_blocks(lq, lk):
    """A long causal site without another mask: query row blocks, each scoring only the keys up
    to its diagonal; the same numbers as exact attention, and no (Lq, Lk) tensor."""
    model = _graph(ex, {}, lq, lk, causal=True)
    assert [n.op_type for n in model.graph.node].count("Softmax") == ex.CAUSAL_BLOCKS
    if lq == lk:
        assert _square_shapes(model, lq) == []
    feeds = _inputs(lq, lk)
    got = next(iter(_run(model, feeds).values()))
    t = [torch.from_numpy(feeds[k]) for k in ("q", "k", "v")]
    assert _rel(ex.reference(*t, None, 0.3, 0.0, True, 0.0).numpy(), got) <= BOUND
