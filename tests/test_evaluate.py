import numpy as np
import pytest
import torch
from torch import nn

from wattflow.compress.quantize import export_onnx, quantize_checkpoint
from wattflow.data import load_splits
from wattflow.evaluate import (
    accuracy,
    deployable_artifact,
    load_predictor,
    median_latency_s,
    run_inferences,
    size_metrics,
)
from wattflow.models import build_model, default_spec, prunable_modules, save_checkpoint
from wattflow.models import load_checkpoint as load_checkpoint_model
from wattflow.runtimes import RUNTIMES, Runtime
from wattflow.stages import Artifact


def zero_smallest_half(model: nn.Module) -> nn.Module:
    """Zero the smaller-magnitude half of every weight matrix (biases kept)."""
    with torch.no_grad():
        for module, name in prunable_modules(model):
            w = getattr(module, name)
            w.mul_(w.abs() > w.abs().flatten().median())
    return model


@pytest.fixture(scope="module")
def cnn(tmp_path_factory, sgd_trained):
    """Paths of one trained CNN as an fp32 checkpoint, a half-sparse checkpoint and its int8 ONNX files."""
    root = tmp_path_factory.mktemp("eval")
    model = load_checkpoint_model(sgd_trained["cnn"][0])[0]
    paths = {"dense": root / "dense.pt", "sparse": root / "sparse.pt", "onnx": root / "dense.onnx"}
    save_checkpoint(paths["dense"], model, default_spec("cnn"))
    export_onnx(model, paths["onnx"], 64)
    save_checkpoint(paths["sparse"], zero_smallest_half(model), default_spec("cnn"))
    calib = load_splits().train.x[:256]
    for src in ("dense", "sparse"):
        paths[f"{src}-int8"] = quantize_checkpoint(paths[src], "onnx-int8-static", root, calib).path
    paths["dense-dynamic"] = quantize_checkpoint(paths["dense"], "onnx-int8-dynamic", root, None).path
    paths["dense-bf16"] = quantize_checkpoint(paths["dense"], "bf16", root, None).path
    for backend in ("int8-weights", "kmeans-4bit"):  # conv weights on a grid, packed
        snapped = quantize_checkpoint(paths["sparse"], backend, root, None).path
        paths[f"sparse-{backend}"] = snapped
        paths[f"sparse-{backend}-packed"] = deployable_artifact(snapped, "torch", root)[0]
    return paths


@pytest.mark.parametrize(("key", "fmt"), [("dense", "torch"), ("onnx", "onnx"), ("dense-int8", "onnx"),
                                          ("dense-bf16", "torch"), ("sparse-int8-weights-packed", "packed"),
                                          ("sparse-kmeans-4bit-packed", "packed")])
def test_predictors_return_float32_logits_and_agree(cnn, key, fmt):
    test = load_splits().test
    predict = load_predictor(cnn[key], fmt, threads=1)
    logits = predict(test.x)
    assert logits.dtype == np.float32 and logits.shape == (len(test.x), 10)
    assert accuracy(predict, test.x, test.y) > 0.9
    reference = load_predictor(cnn["dense"], "torch")(test.x)
    assert np.mean(logits.argmax(1) == reference.argmax(1)) >= 0.97
    if key == "onnx":  # same fp32 weights, another runtime
        np.testing.assert_allclose(logits, reference, atol=1e-4)


def test_accuracy_does_not_depend_on_batch_size(cnn):
    test = load_splits().test
    predict = load_predictor(cnn["dense"], "torch")
    expected = float(np.mean(predict(test.x).argmax(1) == test.y))
    assert accuracy(predict, test.x, test.y, batch_size=7) == pytest.approx(expected)
    assert accuracy(predict, test.x, test.y) == pytest.approx(expected)


def test_median_latency_is_positive_and_tiles_large_batches(cnn):
    x = load_splits().test.x
    seen = []

    def predict(batch):
        seen.append(batch.shape)
        return np.zeros((len(batch), 10), np.float32)

    latency_s = median_latency_s(predict, x, batch_size=len(x) * 2 + 5, repeats=5, warmup=2)
    assert isinstance(latency_s, float) and latency_s > 0
    assert seen == [(len(x) * 2 + 5, 64)] * 7
    real = median_latency_s(load_predictor(cnn["dense-int8"], "onnx"), x, batch_size=1, repeats=20, warmup=3)
    assert 0 < real < 0.1


def test_run_inferences_runs_full_batches_until_enough(cnn):
    calls = []

    def predict(batch):
        calls.append(len(batch))
        return np.zeros((len(batch), 10), np.float32)

    assert run_inferences(predict, load_splits().test.x, 1000, batch_size=256) == 1024
    assert calls == [256] * 4
    assert run_inferences(load_predictor(cnn["dense-int8"], "onnx"), load_splits().test.x, 10, 4) == 12


def test_size_metrics_of_a_half_sparse_checkpoint(cnn):
    dense, sparse = size_metrics(cnn["dense"], "torch"), size_metrics(cnn["sparse"], "torch")
    n_params = sum(p.numel() for p in build_model(default_spec("cnn")).parameters())
    n_weights = sum(getattr(m, n).numel() for m, n in prunable_modules(build_model(default_spec("cnn"))))
    assert dense["param_count"] == sparse["param_count"] == n_params
    assert dense["nonzero_params"] == n_params
    assert sparse["nonzero_params"] == pytest.approx(n_params - n_weights / 2, abs=8)
    assert dense["dense_bytes"] == 4 * n_params
    # Zeros do not shrink the file itself, only what it compresses to.
    assert sparse["file_bytes"] == pytest.approx(dense["file_bytes"], abs=64)
    assert sparse["lzma_bytes"] < 0.75 * dense["lzma_bytes"]
    assert sparse["lzma_bytes"] < sparse["file_bytes"]


def test_param_count_is_the_same_definition_for_torch_and_onnx(cnn):
    fp32 = size_metrics(cnn["dense"], "torch")
    variants = [("onnx", "onnx"), ("dense-int8", "onnx"), ("dense-dynamic", "onnx"), ("dense-bf16", "torch")]
    for key, fmt in variants:
        metrics = size_metrics(cnn[key], fmt)
        assert metrics["param_count"] == fp32["param_count"], key
        assert metrics["file_bytes"] > 0 and metrics["lzma_bytes"] > 0
    assert size_metrics(cnn["onnx"], "onnx")["dense_bytes"] == fp32["dense_bytes"]
    assert size_metrics(cnn["dense-bf16"], "torch")["dense_bytes"] == fp32["dense_bytes"] // 2
    # static int8: weights 1 byte, biases int32
    int8 = size_metrics(cnn["dense-int8"], "onnx")
    n_bias = sum(m.bias.numel() for m, _ in prunable_modules(build_model(default_spec("cnn"))))
    assert int8["dense_bytes"] == (fp32["param_count"] - n_bias) + 4 * n_bias


def test_int8_keeps_the_zeros_of_a_sparse_model(cnn):
    sparse = size_metrics(cnn["sparse"], "torch")
    int8 = size_metrics(cnn["sparse-int8"], "onnx")
    # a real zero quantizes exactly to the zero point; tiny weights may round to it as well
    assert int8["nonzero_params"] <= sparse["nonzero_params"]
    assert int8["nonzero_params"] > 0.9 * sparse["nonzero_params"]
    assert int8["lzma_bytes"] < size_metrics(cnn["dense-int8"], "onnx")["lzma_bytes"]


@pytest.mark.parametrize("backend", ["int8-weights", "kmeans-4bit"])
def test_a_packed_cnn_predicts_exactly_like_its_checkpoint_and_is_smaller(cnn, backend):
    x = load_splits().test.x
    packed, snapped = cnn[f"sparse-{backend}-packed"], cnn[f"sparse-{backend}"]
    assert np.array_equal(load_predictor(packed, "packed")(x), load_predictor(snapped, "torch")(x))
    packed_sizes, torch_sizes = size_metrics(packed, "packed"), size_metrics(snapped, "torch")
    assert {k: v for k, v in packed_sizes.items() if "bytes" not in k or k == "dense_bytes"} == \
        {k: v for k, v in torch_sizes.items() if "bytes" not in k or k == "dense_bytes"}
    # below even the lzma'd checkpoint (measured: int8 0.49x, kmeans 0.76x: lzma alone already finds the
    # 16 repeated float32 values, less well than 4-bit codes)
    assert packed_sizes["file_bytes"] < 0.9 * torch_sizes["lzma_bytes"]


def test_unknown_format_is_refused(cnn):
    with pytest.raises(ValueError, match="allowed: onnx, packed, torch"):
        load_predictor(cnn["dense"], "tflite")
    with pytest.raises(ValueError, match="allowed: onnx, packed, torch"):
        size_metrics(cnn["dense"], "tflite")
    with pytest.raises(ValueError, match="unknown runtime 'tflite'"):
        Artifact(path=str(cnn["dense"]), format="tflite", sha256="0")


def test_a_registered_runtime_is_used_by_every_measurement(cnn, tmp_path, monkeypatch):
    """Adding a runtime is one class registered in RUNTIMES: predictor, sizes, the deployable and the artifact
    check then follow it with no other change (here a torch.export program runtime, written as a user would)."""

    class ExportedProgram(Runtime):
        def predictor(self, path, threads=1, compile=True, device="cpu"):
            module = torch.export.load(str(path)).module()
            return lambda x: module(torch.from_numpy(x)).detach().numpy()

        def params(self, path):
            return [(t.detach().numpy(), 0, t.numel() * t.element_size())
                    for t in torch.export.load(str(path)).state_dict.values()]

    monkeypatch.setitem(RUNTIMES._entries, "exported", ExportedProgram)
    model = load_checkpoint_model(cnn["dense"])[0]
    path = tmp_path / "m.pt2"
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(model, (torch.zeros(2, 64),), dynamic_shapes=({0: batch},)), str(path))
    x = load_splits().test.x
    np.testing.assert_allclose(load_predictor(path, "exported")(x), load_predictor(cnn["dense"], "torch")(x),
                               rtol=1e-5, atol=1e-5)
    assert size_metrics(path, "exported")["param_count"] == size_metrics(cnn["dense"], "torch")["param_count"]
    assert deployable_artifact(path, "exported", tmp_path / "deploy")[:2] == (str(path), "exported")
    assert Artifact(path=str(path), format="exported", sha256="0").format == "exported"
