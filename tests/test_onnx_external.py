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
