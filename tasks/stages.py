"""Thin Prefect tasks around the library's stages: logging, MLflow child runs, skip reasons.

`NO_CACHE`: a measured stage must really run, its energy is part of the result.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from wattflow import stages
from wattflow.compress.quantize import backend_available
from wattflow.config import PipelineConfig
from wattflow.energy import make_meter
from wattflow.stages import StageResult
from wattflow.tracking import Tracker, record_evaluation, record_stage


@task(name="train", cache_policy=NO_CACHE, tags=["measured"])
def train(cfg: PipelineConfig, parent_run_id: str, run_dir: str) -> StageResult:
    logger = get_run_logger()
    return record_stage(
        Tracker(), parent_run_id, "train", "train",
        lambda: stages.train_stage(cfg, Path(run_dir) / "train", make_meter(cfg.energy), logger.info),
        cfg.energy)


@task(name="prune", cache_policy=NO_CACHE, tags=["measured"], task_run_name="prune-{sparsity}")
def prune(cfg: PipelineConfig, parent_run_id: str, run_dir: str, trained: StageResult,
          sparsity: float) -> StageResult:
    return record_stage(
        Tracker(), parent_run_id, f"prune-{sparsity:g}", "prune",
        lambda: stages.prune_stage(cfg, trained, sparsity, Path(run_dir) / "prune", make_meter(cfg.energy)),
        cfg.energy)


@task(name="quantize", cache_policy=NO_CACHE, tags=["measured"], task_run_name="quantize-{backend}")
def quantize(cfg: PipelineConfig, parent_run_id: str, run_dir: str, source: StageResult,
             backend: str) -> StageResult | None:
    """Returns None, with the reason logged and tagged on the parent run, when the backend can't run here."""
    ok, reason = backend_available(backend)
    if not ok:
        get_run_logger().warning("skipping %s for %s: %s", backend, source.name, reason)
        Tracker().client.set_tag(parent_run_id, f"skipped.{backend}", reason)
        return None
    return record_stage(
        Tracker(), parent_run_id, stages.quantized_name(source, backend), "quantize",
        lambda: stages.quantize_stage(cfg, source, backend, Path(run_dir) / "quantize", make_meter(cfg.energy)),
        cfg.energy)


@task(name="evaluate", cache_policy=NO_CACHE, tags=["measured"], task_run_name="evaluate-{variant.name}")
def evaluate(cfg: PipelineConfig, variant: StageResult) -> dict[str, float | str]:
    figures = stages.evaluate_variant(cfg, variant, make_meter(cfg.energy))
    record_evaluation(Tracker(), variant.mlflow_run_id, figures)
    return figures
