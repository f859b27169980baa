"""Resume without retraining: a flow that failed after training is re-run with the same configuration and
reuses the trained checkpoint (its Prefect task ends Cached, no training is launched, no training energy
is spent); a changed training field invalidates the cache."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from test_pipeline_integration import mlflow_uri, prefect_server  # noqa: F401 (fixtures)

import wattflow.stages
from flows.pipeline import pipeline
from wattflow.config import PipelineConfig

pytestmark = pytest.mark.integration


def quick_config(tmp_path, epochs: int = 2) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "work_dir": str(tmp_path / "artifacts"),
        "train": {"model": "mlp", "epochs": epochs, "lr": 0.1, "cpu_ranks": 2},
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


@pytest.fixture
def launches(monkeypatch):
    """Counts real torchrun launches."""
    calls = []
    real = wattflow.stages.launch_training
    monkeypatch.setattr(wattflow.stages, "launch_training", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def flow_run_id(uri: str, result: dict) -> str:
    return MlflowClient(uri).get_run(result["mlflow_run_id"]).data.tags["prefect.flow_run_id"]


def test_a_rerun_after_a_failed_later_stage_reuses_the_trained_checkpoint(
        prefect_server, mlflow_uri, tmp_path, monkeypatch, launches):  # noqa: F811
    cfg = quick_config(tmp_path)
    real_step = wattflow.stages.step_stage

    def broken_step(*args, **kwargs):
        raise RuntimeError("injected fault in the prune step")

    monkeypatch.setattr(wattflow.stages, "step_stage", broken_step)
    with pytest.raises(RuntimeError, match="injected fault"):
        pipeline(cfg)
    assert len(launches) == 1

    monkeypatch.setattr(wattflow.stages, "step_stage", real_step)
    result = pipeline(cfg)
    assert len(launches) == 1, "the second run trained again"
    states = asyncio.run(task_states(flow_run_id(mlflow_uri, result)))
    assert states["train-model-0"] == "Cached" if "train-model-0" in states else any(
        name.startswith("train-model") and state == "Cached" for name, state in states.items())
    client = MlflowClient(mlflow_uri)
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_run(result["mlflow_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'")}
    assert runs["train"].data.tags["wattflow.cache"] == "hit"
    assert runs["prune-0.5"].data.tags["wattflow.cache"] == "miss"
    assert runs["train"].info.status == runs["prune-0.5"].info.status == "FINISHED"
    # The training energy is reported where it was spent: the first flow run produced the checkpoint.
    assert runs["train"].data.params["produced_by_flow_run"] != flow_run_id(mlflow_uri, result)

    # Same configuration again: everything before evaluation is reused.
    again = pipeline(cfg)
    states = asyncio.run(task_states(flow_run_id(mlflow_uri, again)))
    assert len(launches) == 1
    assert sorted(s for n, s in states.items() if n.startswith(("train-model", "build-"))) == ["Cached", "Cached"]

    # A changed training field invalidates the cache.
    pipeline(quick_config(tmp_path, epochs=3))
    assert len(launches) == 2


def test_a_cached_checkpoint_that_was_deleted_is_recomputed(prefect_server, mlflow_uri, tmp_path,  # noqa: F811
                                                           launches):
    cfg = quick_config(tmp_path)
    first = pipeline(cfg)
    train_row = next(r for r in first["rows"] if r["variant"] == "train")
    assert train_row
    for checkpoint in (tmp_path / "artifacts").rglob("train/model.pt"):
        checkpoint.unlink()
    pipeline(cfg)
    assert len(launches) == 2
