"""Elastic training: a SIGKILL'd rank is restarted by torchrun and resumes from the last per-epoch state;
deterministic failures (NaN loss, a GPU that is not there) surface once, clearly, without retry loops."""

import json
import math

import pytest
import torch

from wattflow.config import PipelineConfig
from wattflow.data import load_splits
from wattflow.distributed import (
    DeviceUnavailableError,
    NonFiniteLossError,
    TrainingError,
    check_device,
    clear_stale_outputs,
    launch_training,
    parse_fault,
)

pytestmark = pytest.mark.integration  # starts torchrun ranks or servers: not in make test-fast

EPOCHS = 4


def tiny(**train) -> PipelineConfig:
    return PipelineConfig.model_validate({"train": {"model": "mlp", "epochs": EPOCHS, "lr": 0.1, "cpu_ranks": 2,
                                                    "timeout_s": 180, **train}})


def progress(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "progress.jsonl").read_text().splitlines()]


def test_a_killed_rank_is_restarted_and_resumes_from_the_last_epoch(tmp_path, monkeypatch):
    monkeypatch.setenv("WATTFLOW_FAULT_KILL", "rank=1,epoch=2,step=5")
    lines = []
    out = launch_training(tiny(), tmp_path, lines.append)
    assert any("SIGKILL at epoch 2 step 5" in line for line in lines)  # the fault really fired
    assert out.restarts == 1 and out.metrics["restarts"] == 1
    assert out.metrics["epochs"] == EPOCHS and out.metrics["resumed_from_epoch"] == 1
    # Epoch 2 was redone by the restarted group, not appended twice; every epoch is there once.
    assert [(p["epoch"], p["restarts"]) for p in progress(tmp_path)] == [(1, 0), (2, 1), (3, 1), (4, 1)]
    assert out.metrics["val_accuracy"] > 0.85
    # Samples of the lost half epoch are not counted: exactly EPOCHS epochs' worth on each of 2 ranks.
    assert out.samples_seen == 2 * EPOCHS * math.ceil(len(load_splits().train.y) / 2)
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # plain tensors and numbers only
    assert state["epoch"] == EPOCHS and set(state) >= {"model", "optimizer", "scheduler", "samples_seen"}


def test_without_restarts_the_failure_is_clear_and_resume_finishes_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WATTFLOW_FAULT_KILL", "rank=0,epoch=3")
    cfg = tiny(max_restarts=0, cpu_ranks=1)  # one rank: the restart path is covered above, this is about resume
    with pytest.raises(TrainingError, match=r"max_restarts=0 restart\(s\).*state\.pt: launch again with resume=True"):
        launch_training(cfg, tmp_path, lambda _: None)
    assert not (tmp_path / "model.pt").exists()
    assert torch.load(tmp_path / "state.pt", weights_only=True)["epoch"] == 2

    monkeypatch.delenv("WATTFLOW_FAULT_KILL")
    out = launch_training(cfg, tmp_path, lambda _: None, resume=True)
    assert out.restarts == 0 and out.metrics["resumed_from_epoch"] == 2
    assert [p["epoch"] for p in progress(tmp_path)] == [1, 2, 3, 4]  # progress kept appending across launches
    assert out.metrics["val_accuracy"] > 0.85


def test_a_fresh_launch_starts_clean_unless_resuming(tmp_path):
    names = ["state.pt", "progress.jsonl", "fatal.json", "metrics.json", "model.pt", "rank-0.json"]
    for name in names:
        (tmp_path / name).write_text("stale")
    clear_stale_outputs(tmp_path, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["progress.jsonl", "state.pt"]
    clear_stale_outputs(tmp_path, resume=False)
    assert list(tmp_path.iterdir()) == []


def test_a_nan_loss_stops_every_rank_once_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WATTFLOW_FAULT_NAN", "epoch=2,step=3")
    lines = []
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(NaN or inf\) at epoch 2 step 3/\d+; "
                                                 r"lower train\.lr \(now 0\.1\)"):
        launch_training(tiny(max_restarts=2), tmp_path, lines.append)
    # Not retried: epoch 1 trained once, and the one restart torchrun made ended at once on fatal.json.
    assert sum(line.startswith("epoch 1/") for line in lines) == 1
    assert sum("not retrying" in line for line in lines) == 2  # both ranks of that restart, nothing after
    assert [p["epoch"] for p in progress(tmp_path)] == [1]
    assert torch.load(tmp_path / "state.pt", weights_only=True)["epoch"] == 1  # NaN weights never saved
    assert not (tmp_path / "model.pt").exists()


def test_a_gpu_requested_where_none_exists_fails_before_launch(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the one stand-in: no GPU here

    def must_not_launch(*args, **kwargs):
        raise AssertionError("torchrun was started")

    monkeypatch.setattr("wattflow.distributed.torchrun_command", must_not_launch)
    cfg = tiny(device="cuda")
    with pytest.raises(DeviceUnavailableError, match=r"train\.device='cuda' but no CUDA GPU .*set train\.device "
                                                     r"to 'auto'.* or 'cpu'"):
        check_device(cfg)
    with pytest.raises(DeviceUnavailableError, match=r"train\.device='cuda'"):
        launch_training(cfg, tmp_path / "out", lambda _: None)
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert check_device(tiny(device="auto")) == "cpu" and check_device(tiny(device="cpu")) == "cpu"


def test_fault_switches_parse_and_name_themselves_when_malformed(tmp_path, monkeypatch):
    monkeypatch.setenv("WATTFLOW_FAULT_KILL", "rank=1,epoch=2")
    assert parse_fault("WATTFLOW_FAULT_KILL") == {"rank": 1, "epoch": 2, "step": 1}
    monkeypatch.setenv("WATTFLOW_FAULT_KILL", "rank=one")
    with pytest.raises(ValueError, match="WATTFLOW_FAULT_KILL='rank=one' is malformed"):
        parse_fault("WATTFLOW_FAULT_KILL")
    monkeypatch.setenv("WATTFLOW_FAULT_KILL", "rank=1")
    with pytest.raises(ValueError, match="lacks epoch"):
        parse_fault("WATTFLOW_FAULT_KILL")
    with pytest.raises(ValueError, match="WATTFLOW_FAULT_KILL='rank=1' lacks epoch"):  # before any launch
        launch_training(tiny(), tmp_path, lambda _: None)
    assert not (tmp_path / "job.json").exists()
    monkeypatch.delenv("WATTFLOW_FAULT_KILL")
    assert parse_fault("WATTFLOW_FAULT_KILL") is None
