"""Each stage's meter covers the devices the stage computes on: CPU-only work (pruning, ONNX evaluation) is not
charged the idle draw of the GPUs beside it, which on 8 GPUs would dominate energy per inference."""

from __future__ import annotations

import pytest

import wattflow.energy as energy
from wattflow.chains import plan
from wattflow.config import EnergyConfig, PipelineConfig
from wattflow.energy import FakeNvml, NvmlBackend, make_meter
from wattflow.stages import metered_gpus


@pytest.fixture(autouse=True)
def _all_gpus_visible(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_a_backend_meters_only_the_gpus_named_by_cuda_ordinal(monkeypatch):
    fake = FakeNvml(device_count=3)
    assert [g.index for g in NvmlBackend(fake, simulated=True, cuda_ordinals=[1]).devices] == [1]
    assert [g.index for g in NvmlBackend(fake, simulated=True, cuda_ordinals=[]).devices] == []
    assert NvmlBackend(fake, simulated=True, cuda_ordinals=[]).visible_count == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")   # CUDA numbers the visible GPUs in this order
    assert [g.index for g in NvmlBackend(fake, simulated=True, cuda_ordinals=[0]).devices] == [2]


def eight_gpu_host(monkeypatch) -> None:
    """The stand-in for a GPU host: `auto` finds eight (simulated) NVIDIA GPUs."""
    fake = FakeNvml(device_count=8)
    monkeypatch.setattr(energy, "NvmlBackend", lambda **kw: NvmlBackend(fake, simulated=True, **kw))


def test_a_cpu_only_stage_is_not_charged_the_idle_gpus(monkeypatch):
    eight_gpu_host(monkeypatch)
    cpu_stage = make_meter(EnergyConfig(backend="auto"), gpus=[])
    assert [b.name for b in cpu_stage.backends] in (["rapl"], ["cpu-time"])
    assert any("8 GPU(s) not metered: this stage does not run on them" in n for n in cpu_stage.notes)
    with cpu_stage.window("prune") as w:
        pass
    assert "excludes GPU" in w.result.scope
    gpu_stage = make_meter(EnergyConfig(backend="auto"), gpus=[0])
    assert [len(getattr(b, "devices", ())) for b in gpu_stage.backends][0] == 1
    assert len(make_meter(EnergyConfig(backend="auto")).backends[0].devices) == 8   # the whole pipeline's window


def test_each_stage_names_the_gpus_it_computes_on():
    cpu_ranks = PipelineConfig.model_validate({"train": {"device": "cpu"}, "chains": [
        "prune:0.5 -> onnx-int8-static", "torchao-int8-weight-only"]})
    prune, onnx, torchao = (p.step for p in plan(cpu_ranks.chains))
    assert metered_gpus(cpu_ranks, "train") == []
    assert metered_gpus(cpu_ranks, "compress", prune) == metered_gpus(cpu_ranks, "compress", onnx) == []
    assert metered_gpus(cpu_ranks, "compress", torchao) == [0]   # quantized, and checked, on cuda:0
    assert metered_gpus(cpu_ranks, "evaluate") == []
    assert metered_gpus(PipelineConfig.model_validate({"eval": {"device": "cuda"}}), "evaluate") == [0]
