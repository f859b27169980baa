import json
import math
import sys

import pytest
import torch

from wattflow.compress.prune import prune_checkpoint, weight_sparsity
from wattflow.config import PipelineConfig
from wattflow.data import load_splits
from wattflow.distributed import TrainingError, launch_training
from wattflow.models import load_checkpoint
from wattflow.train import lr_factor

pytestmark = pytest.mark.integration  # starts torchrun ranks or servers: not in make test-fast


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two real Gloo ranks under torchrun, MLP, a few epochs."""
    cfg = PipelineConfig.model_validate({"train": {"model": "mlp", "epochs": 6, "lr": 0.1, "cpu_ranks": 2}})
    out_dir = tmp_path_factory.mktemp("train")
    lines = []
    return cfg, launch_training(cfg, out_dir, lines.append), out_dir, lines


def test_two_gloo_ranks_train_in_sync(trained):
    cfg, out, out_dir, lines = trained
    assert out.device == "cpu" and out.world_size == 2
    ranks = [json.loads((out_dir / f"rank-{r}.json").read_text()) for r in range(2)]
    # DistributedSampler gives each rank ceil(N / 2) samples per epoch
    per_rank = math.ceil(len(load_splits().train.y) / 2) * cfg.train.epochs
    assert [r["samples_seen"] for r in ranks] == [per_rank, per_rank]
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-9)
    assert out.metrics["val_accuracy"] > 0.9
    progress = [json.loads(line) for line in (out_dir / "progress.jsonl").read_text().splitlines()]
    assert [p["epoch"] for p in progress] == list(range(1, cfg.train.epochs + 1))
    assert any("epoch 6/6" in line for line in lines)  # rank 0's output reached the caller's logger


def test_failed_launch_raises_with_the_ranks_output(tmp_path, monkeypatch):
    # The rank entry started without torchrun has no RANK variable: a real non-zero exit.
    monkeypatch.setattr("wattflow.distributed.torchrun_command",
                        lambda job, nproc, **_: [sys.executable, "-m", "wattflow.train", "--job", str(job)])
    cfg = PipelineConfig.model_validate({"train": {"epochs": 1, "cpu_ranks": 1}})
    with pytest.raises(TrainingError, match="KeyError: 'RANK'"):
        launch_training(cfg, tmp_path, lambda _: None)


def test_pruning_reaches_target_sparsity_and_saves_plain_weights(trained, tmp_path):
    _, out, _, _ = trained
    splits = load_splits()
    pruned = prune_checkpoint(out.checkpoint, tmp_path / "p.pt", 0.8, splits.train, fine_tune_epochs=2,
                              lr=0.01, expected_sha256=out.sha256)
    assert pruned.sparsity == pytest.approx(0.8, abs=0.005)
    state = torch.load(pruned.checkpoint, weights_only=True)["state_dict"]
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    model, _, meta = load_checkpoint(pruned.checkpoint)
    assert weight_sparsity(model, kept=[model.net[-1]])[0] == pytest.approx(pruned.sparsity)  # head kept
    with torch.no_grad():
        acc = (model(torch.from_numpy(splits.test.x)).argmax(1).numpy() == splits.test.y).mean()
    assert acc > 0.9 and meta["pruned_sparsity"] == pytest.approx(pruned.sparsity)


def test_training_past_its_timeout_is_stopped_with_a_clear_error(tmp_path):
    cfg = PipelineConfig.model_validate({"train": {"epochs": 1000, "cpu_ranks": 1, "timeout_s": 2}})
    with pytest.raises(TrainingError, match="exceeded train.timeout_s=2.0"):
        launch_training(cfg, tmp_path, lambda _: None)
    assert not (tmp_path / "model.pt").exists()


def test_ranks_number_gpus_in_the_order_nvml_does(tmp_path, monkeypatch):
    """The meter and the slots name GPUs by NVML (PCI) index; CUDA's default order is fastest first."""
    import wattflow.distributed as distributed

    seen: dict[str, str] = {}

    def capture(cmd, env, *args):
        seen.update(env)
        raise RuntimeError("launch captured")

    monkeypatch.setattr(distributed, "run_torchrun", capture)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    with pytest.raises(RuntimeError, match="launch captured"):
        launch_training(PipelineConfig(work_dir=str(tmp_path)), tmp_path / "train", lambda _: None)
    assert seen["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
