"""eval.device: every variant is evaluated on one device, so latency and energy compare compression, not CPU
with GPU. A variant whose runtime cannot run there is skipped with the reason; the device is recorded on every
evaluation; asking for CUDA where there is none fails before any work."""

from __future__ import annotations

import pytest
import torch

from wattflow.config import PipelineConfig
from wattflow.distributed import DeviceUnavailableError, check_device
from wattflow.evaluate import load_predictor
from wattflow.stages import TORCHAO_CUDA_TOLERANCE, Artifact, StageResult, VariantFigures, deployable_tolerance
from wattflow.steps.quantize import QuantizeStep


def config(device: str) -> PipelineConfig:
    return PipelineConfig.model_validate({"eval": {"device": device}})


def gpu_host(monkeypatch):
    """The one stand-in: every backend reports that it can run on this machine (no GPU here)."""
    monkeypatch.setattr("wattflow.compress.quantize.backend_available", lambda backend: (True, "a GPU host"))


def test_a_cuda_only_variant_is_skipped_when_variants_are_evaluated_on_the_cpu(monkeypatch):
    gpu_host(monkeypatch)
    ok, reason = QuantizeStep(backend="torchao-int8-weight-only").available(config("cpu"))
    assert not ok and "runs on cuda only" in reason and "eval.device='cpu'" in reason
    assert QuantizeStep(backend="torchao-int8-weight-only").available(config("cuda"))[0]
    assert QuantizeStep(backend="torchao-int8-dynamic").available(config("cuda"))[0]   # runs on either


def test_an_onnx_variant_is_skipped_when_variants_are_evaluated_on_cuda():
    ok, reason = QuantizeStep(backend="onnx-int8-static").available(config("cuda"))
    assert not ok and "runs on cpu only" in reason and "eval.device='cuda'" in reason
    assert QuantizeStep(backend="onnx-int8-static").available(config("cpu"))[0]


def test_eval_device_cuda_without_a_gpu_fails_before_any_work(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match=r"eval\.device='cuda' but no CUDA GPU .*set eval\.device to "
                                                     r"'cpu'"):
        check_device(config("cuda"))
    assert check_device(config("cpu")) == "cpu"


def test_a_runtime_refuses_a_device_it_cannot_run_on(tmp_path):
    from wattflow.compress.quantize import BackendUnavailable
    with pytest.raises(BackendUnavailable, match="CPU only"):
        load_predictor(tmp_path / "model.onnx", "onnx", device="cuda")


def test_the_device_is_recorded_on_every_evaluation():
    tags = VariantFigures(eval_device="cpu", deployable_path="x.wfp", deployable_runtime="packed",
                          deployable_check="exact").mlflow_tags()
    assert tags["eval.device"] == "cpu" and tags["eval.deployable.check"] == "exact"


def variant(backend: str) -> StageResult:
    return StageResult(name=f"v+{backend}", stage="quantize", chain=[backend], params={"backend": backend},
                       artifact=Artifact(path="v.pt", format="torch", sha256="0" * 64), energy={})


def test_a_torchao_deployable_on_cuda_is_compared_within_a_stated_tolerance_everything_else_exactly():
    # Each load re-quantizes and recompiles: on CUDA the kernels (and summation order) may differ between loads.
    assert deployable_tolerance(variant("torchao-int8-weight-only"), "cuda") == TORCHAO_CUDA_TOLERANCE
    assert deployable_tolerance(variant("torchao-int8-weight-only"), "cpu") == TORCHAO_CUDA_TOLERANCE  # CUDA only
    assert deployable_tolerance(variant("torchao-int8-dynamic"), "cuda") == TORCHAO_CUDA_TOLERANCE
    assert deployable_tolerance(variant("torchao-int8-dynamic"), "cpu") is None
    assert deployable_tolerance(variant("int8-weights"), "cuda") is None
