import contextlib
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from wattflow.compress.backends import onnx_int8
from wattflow.compress.quantize import (
    BACKENDS,
    ONNX_INPUT,
    ONNX_OUTPUT,
    BackendUnavailable,
    backend_available,
    export_onnx,
    quantize_checkpoint,
)
from wattflow.data import load_splits
from wattflow.evaluate import accuracy, load_predictor
from wattflow.models import build_model, default_spec, load_checkpoint


def _compare(ref_path, ref_fmt, path, fmt):
    """(top-1 agreement, accuracy of ref, accuracy of candidate) on the test split."""
    test = load_splits().test
    ref, cand = load_predictor(ref_path, ref_fmt), load_predictor(path, fmt)
    agree = float(np.mean(ref(test.x).argmax(1) == cand(test.x).argmax(1)))
    return agree, accuracy(ref, test.x, test.y), accuracy(cand, test.x, test.y)


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
@pytest.mark.parametrize("backend", ["onnx-int8-static", "onnx-int8-dynamic"])
def test_int8_onnx_is_small_and_agrees_with_fp32(checkpoints, tmp_path, kind, backend):
    ckpt = checkpoints[kind]
    art = quantize_checkpoint(ckpt, backend, tmp_path, load_splits().train.x[:256])
    assert art.format == "onnx" and art.backend == backend and art.path.endswith(".onnx")
    assert os.listdir(tmp_path) == [os.path.basename(art.path)]  # one self-contained file, no temporaries
    agree, acc_fp32, acc_int8 = _compare(ckpt, "torch", art.path, "onnx")
    assert acc_fp32 > 0.9
    assert agree >= 0.97
    assert abs(acc_int8 - acc_fp32) <= 0.02
    ratio = os.path.getsize(art.path) / os.path.getsize(ckpt)
    # int8 weights: ~1/4 of fp32, plus graph overhead (measured: cnn 0.27-0.28, mlp 0.28-0.30)
    assert ratio <= (0.30 if kind == "cnn" or backend == "onnx-int8-static" else 0.32)
    graph = onnx.load(art.path).graph
    assert {i.data_type for i in graph.initializer} >= {onnx.TensorProto.INT8}
    if backend == "onnx-int8-static":  # activations are int8 too: the graph starts by quantizing x
        assert "QuantizeLinear" in [n.op_type for n in graph.node] and "agreement" in art.note


def test_static_int8_is_deterministic(checkpoints, tmp_path):
    x = load_splits().train.x[:128]
    a = quantize_checkpoint(checkpoints["mlp"], "onnx-int8-static", tmp_path / "a", x)
    b = quantize_checkpoint(checkpoints["mlp"], "onnx-int8-static", tmp_path / "b", x)
    assert open(a.path, "rb").read() == open(b.path, "rb").read()
    assert a.note == b.note


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_bf16_halves_the_checkpoint_and_agrees(checkpoints, tmp_path, kind):
    ckpt = checkpoints[kind]
    art = quantize_checkpoint(ckpt, "bf16", tmp_path, None)
    assert art.format == "torch" and art.path.endswith(".bf16.pt")
    model, spec, meta = load_checkpoint(art.path)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert spec == default_spec(kind) and meta["quantized"] == "bf16"
    assert 0.45 <= os.path.getsize(art.path) / os.path.getsize(ckpt) <= 0.6
    agree, acc_fp32, acc_bf16 = _compare(ckpt, "torch", art.path, "torch")
    assert agree >= 0.97 and abs(acc_bf16 - acc_fp32) <= 0.02


def test_export_onnx_is_one_quiet_deterministic_file_with_dynamic_batch(tmp_path, capfd, monkeypatch):
    from torch.onnx._internal.exporter._registration import ONNXRegistry

    model = build_model(default_spec("cnn")).eval()
    monkeypatch.setattr(onnx_int8, "_torchlib_registry_built_once", contextlib.nullcontext)
    export_onnx(model, tmp_path / "a.onnx", 64)  # torch's own path: an operator registry built per export
    out, _ = capfd.readouterr()
    assert out == ""  # the exporter's progress lines are off
    monkeypatch.undo()
    builds = []
    build = ONNXRegistry.__dict__["from_torchlib"].__func__
    counting = classmethod(lambda cls, *a, **kw: builds.append(1) or build(cls, *a, **kw))
    monkeypatch.setattr(ONNXRegistry, "from_torchlib", counting)
    onnx_int8._torchlib_registry.cache_clear()
    for name in ("b.onnx", "c.onnx"):
        export_onnx(model, tmp_path / name, 64)
    assert len(builds) == 1  # wattflow's exports share one registry
    assert ONNXRegistry.__dict__["from_torchlib"] is counting  # put back after each export
    assert sorted(os.listdir(tmp_path)) == ["a.onnx", "b.onnx", "c.onnx"]  # no external-data side files
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes() == \
        (tmp_path / "c.onnx").read_bytes()
    assert b"site-packages" not in (tmp_path / "a.onnx").read_bytes()  # no exporter stack traces
    session = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [ONNX_INPUT]
    assert [o.name for o in session.get_outputs()] == [ONNX_OUTPUT]
    for n in (1, 7, 300):
        x = np.random.default_rng(n).random((n, 64), dtype=np.float32)
        with torch.inference_mode():
            expected = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(session.run(None, {ONNX_INPUT: x})[0], expected, atol=1e-5)


def test_export_leaves_the_callers_model_alone(tmp_path):
    model = build_model(default_spec("mlp")).to(torch.bfloat16).train()
    export_onnx(model, tmp_path / "m.onnx", 64)
    assert model.training and next(model.parameters()).dtype == torch.bfloat16
    assert onnx.load(str(tmp_path / "m.onnx")).graph.initializer[0].data_type == onnx.TensorProto.FLOAT


def test_unknown_backend_raises_with_the_allowed_ones(checkpoints, tmp_path):
    ok, reason = backend_available("fp4-magic")
    assert not ok and "fp4-magic" in reason
    with pytest.raises(BackendUnavailable) as err:
        quantize_checkpoint(checkpoints["mlp"], "fp4-magic", tmp_path, None)
    assert all(b in str(err.value) for b in BACKENDS)
    cpu_backends = {"onnx-int8-static", "onnx-int8-dynamic", "bf16", "int8-weights", "kmeans-4bit",
                    "torchao-int8-dynamic"}
    assert cpu_backends <= set(BACKENDS)
    assert all(backend_available(b)[0] for b in cpu_backends)  # this venv has onnxruntime and torchao


def test_static_int8_needs_calibration_data(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="calibration_x"):
        quantize_checkpoint(checkpoints["mlp"], "onnx-int8-static", tmp_path, None)
    with pytest.raises(ValueError, match="calibration_x"):
        quantize_checkpoint(checkpoints["mlp"], "onnx-int8-static", tmp_path, np.zeros((4, 10), np.float32))
