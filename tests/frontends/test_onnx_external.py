"""ONNX models whose weights are external data: the weights stay on disk while the model is
detected, checked and rewritten, and are copied (in chunks) into the output's data file."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from attnrewrite.cli import main
from attnrewrite.frontends import onnx as onnx_fe
from _models import TinyAttention


@pytest.fixture(scope="module")
def external_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("external")
    torch.manual_seed(0)
    m, x = TinyAttention().eval(), torch.randn(2, 6, 16)
    torch.onnx.export(m, (x,), str(d / "plain.onnx"), input_names=["x"], dynamo=False, opset_version=17)
    onnx.save(onnx.load(d / "plain.onnx"), d / "model.onnx", save_as_external_data=True,
              location="weights.bin", size_threshold=0)      # every weight external, even scalars
    (d / "plain.onnx").unlink()
    return d, x.numpy()


def test_loading_keeps_large_weights_on_disk_and_reads_small_ones(external_model, monkeypatch):
    d, _ = external_model
    monkeypatch.setattr(onnx_fe, "INLINE_MAX_BYTES", 1024)   # the tiny model's weights are a few KiB
    monkeypatch.setattr(onnx_fe, "KEEP_ON_DISK_BYTES", 0)    # as if the external data were huge
    m = onnx_fe.load_model(d / "model.onnx")
    external = onnx_fe.external_tensors(m)
    assert external, "the big weights should stay references"
    assert all(not t.raw_data and onnx_fe._nbytes(t) > onnx_fe.INLINE_MAX_BYTES for t in external)
    inline = [t for t in m.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert inline and all(t.raw_data for t in inline), "small weights are read in"


def test_external_weights_rewrite_and_copy_through(external_model, monkeypatch, capsys):
    d, x = external_model
    before = (d / "weights.bin").read_bytes()
    monkeypatch.setattr(onnx_fe, "COPY_CHUNK", 1000)        # many chunks per weight
    monkeypatch.setattr(onnx_fe, "INLINE_MAX_BYTES", 16)     # the small Linear weights stay external too
    monkeypatch.setattr(onnx_fe, "KEEP_ON_DISK_BYTES", 0)
    code = main([str(d / "model.onnx"), "--variant", "exact", "-o", str(d / "out" / "model.exact.onnx")])
    assert code == 0, capsys.readouterr().err
    out = d / "out" / "model.exact.onnx"
    assert (d / "out" / "model.exact.onnx.data").exists()
    assert (d / "weights.bin").read_bytes() == before
    ref = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    want, got = ref.run(None, {"x": x})[0], new.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    written = onnx.load(out, load_external_data=False)
    assert onnx_fe.external_tensors(written), "weights went to the data file, not into the model"


def test_small_external_data_is_read_in_whole(external_model):
    """Below KEEP_ON_DISK_BYTES the loaded model is self-contained, as if it had no external data."""
    d, _ = external_model
    m = onnx_fe.load_model(d / "model.onnx")
    assert not onnx_fe.external_tensors(m)


def test_saving_a_program_with_references_needs_their_folder(external_model, tmp_path, monkeypatch):
    d, _ = external_model
    monkeypatch.setattr(onnx_fe, "KEEP_ON_DISK_BYTES", 0)
    monkeypatch.setattr(onnx_fe, "INLINE_MAX_BYTES", 16)
    m = onnx_fe.load_model(d / "model.onnx")
    with pytest.raises(onnx_fe.InputError, match="pass base_dir"):
        onnx_fe.save_model(m, tmp_path / "copy.onnx")          # the cwd is not the model's folder
    assert not list(tmp_path.iterdir())


def test_the_output_data_file_matches_the_source_bytes(external_model, tmp_path, monkeypatch):
    d, _ = external_model
    monkeypatch.setattr(onnx_fe, "KEEP_ON_DISK_BYTES", 0)
    monkeypatch.setattr(onnx_fe, "INLINE_MAX_BYTES", 16)
    m = onnx_fe.load_model(d / "model.onnx")
    assert onnx_fe.external_tensors(m)
    onnx_fe.save_model(m, tmp_path / "copy.onnx", base_dir=d)
    a = onnx.load(d / "model.onnx")                         # both with their weights read in
    b = onnx.load(tmp_path / "copy.onnx")
    wa = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name])


@pytest.fixture(scope="module")
def external_constants(tmp_path_factory):
    """The legacy export of TinyAttention with every tensor external, Constant nodes' values
    included (as the exporter writes a model over 2 GB): its qkv weight (3 KiB) moved into a
    Constant node, beside the small shape Constants. plain.onnx: the same model, self-contained."""
    d = tmp_path_factory.mktemp("external_constants")
    torch.manual_seed(0)
    m, x = TinyAttention().eval(), torch.randn(2, 6, 16)
    torch.onnx.export(m, (x,), str(d / "plain.onnx"), input_names=["x"], dynamo=False, opset_version=17)
    model = onnx.load(d / "plain.onnx")
    w = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    model.graph.initializer.remove(w)
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], [w.name], value=w))
    onnx.save(model, d / "plain.onnx")
    onnx.save(model, d / "model.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0,
              convert_attribute=True)
    kept = onnx.load(d / "model.onnx", load_external_data=False)
    assert sum(a.t.data_location == onnx.TensorProto.EXTERNAL for n in kept.graph.node for a in n.attribute
               if n.op_type == "Constant") > 1, "the fixture should hold external Constant values"
    return d, x.numpy()


@pytest.mark.parametrize("on_disk", [False, True], ids=["read-in", "kept-on-disk"])
def test_external_constant_values_load_check_and_rewrite(external_constants, monkeypatch, capsys, on_disk):
    """Constant values stored externally are checked and read in — or, above the limit, the large
    one stays on disk and is copied into the output's data file — and the rewritten model computes
    what the original does."""
    d, x = external_constants
    if on_disk:
        monkeypatch.setattr(onnx_fe, "INLINE_MAX_BYTES", 1024)     # shapes read in, the 3 KiB weight kept
        monkeypatch.setattr(onnx_fe, "KEEP_ON_DISK_BYTES", 0)
    loaded = onnx_fe.load_model(d / "model.onnx")
    assert any(n.op_type == "Constant" and n.attribute[0].t.data_location == onnx.TensorProto.EXTERNAL
               for n in loaded.graph.node) == on_disk
    out = d / f"out-{on_disk}" / "model.exact.onnx"
    code = main([str(d / "model.onnx"), "--variant", "exact", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    ref = ort.InferenceSession(str(d / "plain.onnx"), providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(new.run(None, {"x": x})[0], ref.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_a_missing_external_constant_value_is_named(external_constants, tmp_path, capsys):
    d, _ = external_constants
    model = onnx.load(d / "model.onnx", load_external_data=False)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute[0].t.data_location == onnx.TensorProto.EXTERNAL:
            n.attribute[0].t.external_data[0].value = "gone.bin"         # the location entry
    onnx.save(model, d / "missing.onnx")
    assert main([str(d / "missing.onnx"), "--variant", "exact", "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "gone.bin" in err and "missing" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()
