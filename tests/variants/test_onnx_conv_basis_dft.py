"""conv-basis's DFT lowering (`conv_basis.onnx_dft`): float32 overlap-save through the ONNX `DFT` op.

* Hand-built graphs (inputs q/k/v[/m], the only computation `onnx_lower`), the DFT path forced at
  small n (`ONNX_DFT_MIN_N` patched): onnxruntime matches the PyTorch reference op with
  precision=float32 (≤ 1e-5; 5e-5 for the long, large-score case; every row within 1/RELIABLE_F32)
  at lengths that are no multiple of the block, causal and bidirectional, with key padding
  (boolean and additive), a causal pattern inside a mask with query rows (the run-time causal
  test), soft-cap + GQA, fixed starts, eps, opset 20, the exact-row fallback (per head at
  n ≤ 512, per row block above), and k ≥ n, where it is exact attention.
  Each approximate case also differs from exact attention (> 1e-3), so the match means something.
* A dynamic length holds both lowerings in an `If`: below the threshold the dense float64 one
  (matches precision=auto), from it the DFT one (matches precision=float32).
* Shape inference on a static lowered graph finds no (…, n, n) value or initializer (the dense
  lowering does: the check can fail); the dynamo export's constant causal mask is swept too.
* Dispatch: the DFT op appears exactly when the static length reaches the threshold, and never for
  precision=float64 or below opset 17.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto as TP, helper  # noqa: E402
from test_onnx_speed_lowerings import _dynamo_causal, _square_shapes  # noqa: E402
from test_onnx_variants import BOUND, _rel, _run  # noqa: E402

import attnrewrite  # noqa: E402
from attnrewrite.passes import onnx_graph  # noqa: E402
from attnrewrite.site import AttentionSite  # noqa: E402
from attnrewrite.variants import conv_basis as cb  # noqa: E402
from attnrewrite.variants import exact as ex  # noqa: E402

SCALE = 0.35
LONG_BOUND = 5e-5   # n > DENSE_MAX_N, large scores: rows kept with a normaliser just above RELIABLE_F32 ×
                    # its error estimate carry up to ~1e-3 of float32 FFT round-off (ORT's DFT vs torch.fft)


def _graph(n, heads=2, kv_heads=2, d=8, mask=None, causal=False, softcap=0.0, opts=None, opset=17):
    """A model computing only conv_basis.onnx_lower; n an int (static) or a symbol; mask None,
    "bool"/"add" (B, 1, 1, n) key masks or "rows" (B, 1, n, n) boolean."""
    ins = [helper.make_tensor_value_info("q", TP.FLOAT, [2, heads, n, d]),
           helper.make_tensor_value_info("k", TP.FLOAT, [2, kv_heads, n, d]),
           helper.make_tensor_value_info("v", TP.FLOAT, [2, kv_heads, n, d])]
    if mask:
        ins.append(helper.make_tensor_value_info("m", TP.FLOAT if mask == "add" else TP.BOOL,
                                                 [2, 1, n if mask == "rows" else 1, n]))
    model = helper.make_model(helper.make_graph([], "g", ins, []), opset_imports=[helper.make_opsetid("", opset)])
    b = onnx_graph.Builder(onnx_graph.Graph(model))
    site = AttentionSite(id=0, name="s", source="x", heads=heads, kv_heads=kv_heads, scale=SCALE, softcap=softcap,
                         causal=causal, q_len=n, kv_len=n)
    y = cb.onnx_lower(b, site, "q", "k", "v", "m" if mask else None, {"k": 3, **(opts or {})})
    model.graph.node.extend(b.nodes)
    model.graph.initializer.extend(b.inits)
    model.graph.output.append(helper.make_tensor_value_info(y, TP.FLOAT, [2, heads, n, d]))
    onnx.checker.check_model(model, full_check=True)
    return model


def _inputs(n, heads=2, kv_heads=2, d=8, mask=None, qmul=1.0, seed=0):
    g = np.random.default_rng(seed + n)
    feeds = {"q": (g.standard_normal((2, heads, n, d)) * qmul).astype(np.float32),
             "k": g.standard_normal((2, kv_heads, n, d)).astype(np.float32),
             "v": g.standard_normal((2, kv_heads, n, d)).astype(np.float32)}
    keep = np.arange(n)[None, :] < np.array([n, n - 5])[:, None]          # batch 1: its last 5 keys padded
    if mask == "bool":
        feeds["m"] = keep.reshape(2, 1, 1, n)
    elif mask == "add":
        feeds["m"] = np.where(keep, 0.5 * g.standard_normal((2, n)), -1e9).astype(np.float32).reshape(2, 1, 1, n)
    elif mask == "rows":
        feeds["m"] = keep[:, None, None, :] & np.tril(np.ones((n, n), bool))
    return feeds


def _compare(model, feeds, causal, softcap, opts, precision="float32"):
    """(ORT output, reference op, exact attention) on the same inputs."""
    got = next(iter(_run(model, feeds).values()))
    t = {key: torch.from_numpy(x) for key, x in feeds.items()}
    args = (t["q"], t["k"], t["v"], t.get("m"), SCALE, softcap, causal, 0.0)
    o = {"k": 3, **opts, "precision": precision}
    ref = cb.reference(*args, *cb.op_args(None, o)).numpy()
    return got, ref, ex.reference(*args).numpy()


CASES = {  # id: (n, graph/input keywords)
    "causal": (37, {"causal": True}),
    "bidirectional": (45, {}),
    "causal-pad": (37, {"causal": True, "mask": "bool"}),
    "bidir-additive-pad": (45, {"mask": "add"}),
    "causal-in-mask-rows": (29, {"mask": "rows"}),
    "softcap-gqa": (33, {"causal": True, "softcap": 2.0, "heads": 4, "kv_heads": 2, "opts": {"k": 5}}),
    "fixed-starts": (41, {"mask": "bool", "opts": {"starts": [3, 7, 50]}}),
    "eps": (40, {"causal": True, "opts": {"k": 8, "eps": 0.5}}),
    "opset20": (45, {"mask": "bool", "opset": 20}),
    "fallback-rows": (37, {"causal": True, "qmul": 12.0}),
    "fallback-rows-bidir": (37, {"mask": "bool", "qmul": 12.0}),
    "k-ge-n": (37, {"mask": "bool", "opts": {"k": 40}}),
    "k-ge-n-causal": (30, {"causal": True, "opts": {"k": 30}}),
    "per-block-estimate": (600, {"causal": True, "qmul": 6.0, "d": 4, "opts": {"k": 5}}),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, monkeypatch):
    monkeypatch.setattr(cb.onnx_lowering, "ONNX_DFT_MIN_N", 1)
    n, kw = CASES[case]
    kw = dict(kw)
    qmul, opts = kw.pop("qmul", 1.0), kw.get("opts") or {}
    model = _graph(n, **kw)
    assert "DFT" in [x.op_type for x in model.graph.node]
    feeds = _inputs(n, kw.get("heads", 2), kw.get("kv_heads", 2), kw.get("d", 8), kw.get("mask"), qmul)
    got, ref, exact = _compare(model, feeds, kw.get("causal", False), kw.get("softcap", 0.0), opts)
    assert np.isfinite(got).all()
    rows = np.linalg.norm(got - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-30)
    assert rows.max() <= 1 / cb.RELIABLE_F32, rows.max()   # each kept row within the reliability test's margin
    assert _rel(got, ref) <= (LONG_BOUND if n > cb.DENSE_MAX_N else BOUND), _rel(got, ref)
    if case.startswith("k-ge-n"):
        assert _rel(got, exact) <= BOUND                  # every column a start: exact attention
    else:
        assert _rel(ref, exact) > 1e-3                    # a real approximation
    if case.startswith("fallback") or case == "per-block-estimate":
        t = {key: torch.from_numpy(x) for key, x in feeds.items()}
        d = cb.diagnostics(t["q"], t["k"], t["v"], t.get("m"), SCALE, 0.0, kw.get("causal", False),
                           {"k": 3, **opts, "precision": "float32"})
        assert 0 < d["fallback_rows"] < d["rows"], d      # the exact-row recompute really runs


def test_fully_padded_batch_gives_zeros(monkeypatch):
    monkeypatch.setattr(cb.onnx_lowering, "ONNX_DFT_MIN_N", 1)
    model = _graph(23, mask="bool")
    feeds = _inputs(23, mask="bool")
    feeds["m"][1] = False
    got, ref, _ = _compare(model, feeds, False, 0.0, {})
    assert np.isfinite(got).all() and not got[1].any() and got[0].any()
    assert _rel(got, ref) <= BOUND


def test_dynamic_length_takes_either_path(monkeypatch):
    """One model, symbolic n: the `If` runs the dense lowering below the threshold, the DFT one from it."""
    monkeypatch.setattr(cb.onnx_lowering, "ONNX_DFT_MIN_N", 40)
    model = _graph("n", mask="bool")
    assert [x.op_type for x in model.graph.node].count("If") == 1
    for n, precision in ((31, "auto"), (47, "float32"), (601, "float32")):   # 601: the per-row-block estimate
        got, ref, exact = _compare(model, _inputs(n, mask="bool"), False, 0.0, {}, precision)
        assert _rel(got, ref) <= BOUND and _rel(ref, exact) > 1e-3, (n, _rel(got, ref))


def test_no_square_tensor(monkeypatch):
    """Shape inference on static graphs: no (…, n, n) value or initializer (k < n)."""
    monkeypatch.setattr(cb.onnx_lowering, "ONNX_DFT_MIN_N", 1)
    n = 100
    for kw in ({"causal": True, "mask": "bool"}, {"mask": "add"}, {}):
        model = _graph(n, opts={"k": 6}, **kw)
        inferred = onnx.shape_inference.infer_shapes(model)
        assert sum(bool(vi.type.tensor_type.shape.dim) for vi in inferred.graph.value_info) > 50
        assert _square_shapes(model, n) == [], kw
    monkeypatch.setattr(cb.onnx_lowering, "ONNX_DFT_MIN_N", n + 1)
    assert _square_shapes(_graph(n, causal=True), n)      # the dense lowering has them: the check can fail


def test_dispatch(monkeypatch):
    monkeypatch.setattr(cb.onnx_lowering, "ONNX_DFT_MIN_N", 50)
    ops = lambda m: {x.op_type for x in m.graph.node}     # noqa: E731
    assert "DFT" in ops(_graph(50, causal=True))
    assert "DFT" not in ops(_graph(49, causal=True))
    assert "DFT" not in ops(_graph(60, causal=True, opts={"precision": "float64"}))
    assert "DFT" not in ops(_graph(60, causal=True, opset=16))


def test_dynamo_causal_export_has_no_square_tensor(monkeypatch):
    """The export's constant causal mask becomes the flag; every site lowered through DFT."""
    monkeypatch.setattr(cb.onnx_lowering, "ONNX_DFT_MIN_N", 1)
    n = 80
    x = {"x": np.random.default_rng(0).standard_normal((1, n, 32)).astype(np.float32)}
    r = attnrewrite.rewrite(_dynamo_causal(n), "conv_basis", example_inputs=x, check=False, k=4)
    assert r.sites and all(s.status == "rewritten" for s in r.sites), [s.to_dict() for s in r.sites]
    assert [x.op_type for x in r.program.graph.node].count("DFT") >= 3 * len(r.sites)
    assert _square_shapes(r.program, n) == []
    out = next(iter(_run(r.program, x).values()))
    assert np.isfinite(out).all()
