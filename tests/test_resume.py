"""Resume without retraining: a flow that failed after training is re-run with the same configuration and
reuses the trained checkpoint (its Prefect task ends Cached, no training is launched, no training energy
is spent); a changed training field, or a checkpoint that is gone, invalidates the cache."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

import wattflow.stages
from flows.pipeline import pipeline
from wattflow.chains import plan
from wattflow.config import PipelineConfig
from wattflow.models import sha256_file
from wattflow.provenance import step_cache_key, train_cache_key

pytestmark = pytest.mark.integration


def quick_config(tmp_path, epochs: int = 2) -> PipelineConfig:
    """One torchrun rank: these tests are about a flow run's files, caching and resumption; 2-rank DDP has its
    own (test_train_prune, test_elastic, test_multinode, and the contract in test_pipeline_integration)."""
    return PipelineConfig.model_validate({
        "work_dir": str(tmp_path / "artifacts"),
        "train": {"model": "mlp", "epochs": epochs, "lr": 0.1, "cpu_ranks": 1},
        "chains": ["prune:0.5"],
        "prune": {"fine_tune_epochs": 1, "schedule_steps": 1},
        "eval": {"batch_sizes": [256], "repeats": 1, "warmup": 1, "energy_inferences": 256,
                 "energy_min_window_s": 0.0},
    })


async def task_states(flow_run_id: str) -> dict[str, str]:
    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)])))
    return {r.name: r.state.name for r in runs}


async def artifacts_of(flow_run_id: str) -> dict:
    async with get_client() as client:
        return {a.key: a for a in await client.read_artifacts() if a.flow_run_id == uuid.UUID(flow_run_id)}


@pytest.fixture
def launches(monkeypatch):
    """Counts real torchrun launches."""
    calls = []
    real = wattflow.stages.launch_training
    monkeypatch.setattr(wattflow.stages, "launch_training", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def flow_run_id(uri: str, result: dict) -> str:
    return MlflowClient(uri).get_run(result["mlflow_run_id"]).data.tags["prefect.flow_run_id"]


def cached_names(flow_run: str) -> list[str]:
    states = asyncio.run(task_states(flow_run))
    # train runs get Prefect's generated suffix; step runs are named after their variant
    return sorted("train" if name.startswith("train-") else name
                  for name, state in states.items() if state == "Cached")


def test_a_rerun_after_a_failed_later_stage_reuses_the_trained_checkpoint(
        prefect_server, mlflow_uri, tmp_path, monkeypatch, launches):
    cfg = quick_config(tmp_path)
    real_step = wattflow.stages.step_stage

    def broken_step(*args, **kwargs):
        raise RuntimeError("injected fault in the prune step")

    monkeypatch.setattr(wattflow.stages, "step_stage", broken_step)
    with pytest.raises(RuntimeError, match="injected fault"):
        pipeline(cfg)
    assert len(launches) == 1
    # The failed stage and the flow's parent run end FAILED (never left RUNNING), with the error; training's run
    # and checkpoint are kept for the re-run.
    client = MlflowClient(mlflow_uri)
    first = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name(cfg.experiment).experiment_id])}
    parent = next(r for name, r in first.items() if name.startswith("pipeline-"))
    assert set(first) == {parent.info.run_name, "train", "prune-0.5"}
    assert first["prune-0.5"].info.status == parent.info.status == "FAILED"
    assert first["prune-0.5"].data.tags["error"] == "RuntimeError: injected fault in the prune step"
    assert first["train"].info.status == "FINISHED"
    assert any(sha256_file(p) == first["train"].data.tags["artifact.sha256"]
               for p in (tmp_path / "artifacts").rglob("model.pt"))

    # Fixed, same configuration: the trained checkpoint is reused, no second training launch.
    monkeypatch.setattr(wattflow.stages, "step_stage", real_step)
    result = pipeline(cfg)
    assert len(launches) == 1, "the second run trained again"
    assert cached_names(flow_run_id(mlflow_uri, result)) == ["train"]
    client = MlflowClient(mlflow_uri)
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_run(result["mlflow_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'")}
    assert runs["train"].data.tags["wattflow.cache"] == "hit"
    assert runs["prune-0.5"].data.tags["wattflow.cache"] == "miss"
    assert runs["train"].info.status == runs["prune-0.5"].info.status == "FINISHED"
    # The training energy is reported where it was spent: the first flow run produced the checkpoint.
    assert runs["train"].data.params["produced_by_flow_run"] != flow_run_id(mlflow_uri, result)
    train_metrics = runs["train"].data.metrics
    assert "energy_j" not in train_metrics and train_metrics["energy_reused_j"] > 0  # never counted twice
    assert runs["train"].data.tags["energy.flags"] == "cached"
    assert next(r for r in result["rows"] if r["variant"] == "train")["stage_energy_flags"] == "cached"
    progress = asyncio.run(artifacts_of(flow_run_id(mlflow_uri, result)))["wattflow-training-progress"]
    assert progress.data == 100.0 and "cached" in progress.description

    # Same configuration again: every stage before evaluation is reused.
    again = pipeline(cfg)
    assert len(launches) == 1
    assert cached_names(flow_run_id(mlflow_uri, again)) == ["prune-0.5", "train"]

    # A cached checkpoint that is gone can't be vouched for: it is trained again.
    for checkpoint in (tmp_path / "artifacts").rglob("train/model.pt"):
        checkpoint.unlink()
    pipeline(cfg)
    assert len(launches) == 2


def test_the_cache_key_changes_with_what_changes_the_output():
    cfg = quick_config(Path("/tmp"))
    key = train_cache_key(cfg)
    assert train_cache_key(cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 3})})) != key
    assert train_cache_key(cfg.model_copy(update={"data": cfg.data.model_copy(update={"seed": 1})})) != key
    for harmless in ({"timeout_s": 5.0}, {"max_restarts": 0}, {"checkpoint_every_epochs": 2}):
        assert train_cache_key(cfg.model_copy(update={"train": cfg.train.model_copy(update=harmless)})) == key
    planned = plan(cfg.chains)[0]
    assert step_cache_key(cfg, planned, "a" * 64) != step_cache_key(cfg, planned, "b" * 64)
    assert step_cache_key(cfg, planned, "a" * 64) != step_cache_key(
        cfg.model_copy(update={"prune": cfg.prune.model_copy(update={"lr": 0.02})}), planned, "a" * 64)


def test_new_data_at_the_same_path_is_new_data(tmp_path):
    import numpy as np

    path = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.random((60, 64), dtype=np.float32), y=np.repeat(np.arange(3), 20))
    cfg = PipelineConfig.model_validate({"data": {"dataset": "npz", "path": str(path)}})
    before = train_cache_key(cfg)
    np.savez(path, x=rng.random((60, 64), dtype=np.float32), y=np.repeat(np.arange(3), 20))
    assert train_cache_key(cfg) != before
