import json

import pytest

from wattflow.gpu_check import main


@pytest.mark.integration  # starts torchrun ranks: not in make test-fast
def test_gpu_check_runs_end_to_end_on_a_simulated_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--fake", "--seconds", "0.3"]) == 0
    assert "simulated:nvml" in capsys.readouterr().out
    result = json.loads((tmp_path / "bench/results/gpu_check.json").read_text())
    assert result["method"] == "simulated:nvml"
    assert [r["window"] for r in result["rows"]] == ["train", "evaluate", "matmul-bf16", "lm-train",
                                                     "lm-generate-kv-cache"]
    # the CUDA-only LM runtimes and wattflow's torchao CUDA backends say why they did not run
    assert [line.split(":")[0] for line in result["not_run"]] == [
        "lm-score-torchao-int8-weight-only", "lm-score-torchao-int4-weight-only", "lm-score-sparse-2",
        "torchao-int8-weight-only", "torchao-fp8"]
    assert all("CUDA only" in line for line in result["not_run"][:3])
    assert all("needs a CUDA GPU" in line for line in result["not_run"][3:])
    assert result["torchao_cuda_smoke"] == []
    for row in result["rows"]:  # FakeNvml's counter and power agree, so the two readings must too
        assert row["counter_j"] > 0 and abs(row["relative_difference"]) < 0.05


def test_without_cuda_in_torch_a_real_gpu_check_refuses_instead_of_timing_idle_gpus(monkeypatch, capsys):
    import wattflow.gpu_check as gpu_check
    from wattflow.energy import FakeNvml, NvmlBackend

    monkeypatch.setattr(gpu_check, "NvmlBackend", lambda: NvmlBackend(FakeNvml(power_w=60.0)))  # NVML sees a GPU
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert main([]) == 2
    assert "has no CUDA here" in capsys.readouterr().out
