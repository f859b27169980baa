"""Thin Prefect tasks around the library's stages: logging, MLflow child runs, skip reasons.

`NO_CACHE`: a measured stage must really run, its energy is part of the result.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from wattflow import stages
from wattflow.chains import PlannedStep
from wattflow.compress.quantize import backend_available
from wattflow.config import PipelineConfig, QuantizeStep
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


@task(name="compress", cache_policy=NO_CACHE, tags=["measured"], task_run_name="{planned.name}")
def compress(cfg: PipelineConfig, parent_run_id: str, run_dir: str, source: StageResult | None,
             planned: PlannedStep) -> StageResult | None:
    """One step of a chain. Returns None, with the reason logged and tagged on the parent run, when its
    input was skipped or its quantize backend cannot run here."""
    if source is None:
        return None
    step = planned.step
    if isinstance(step, QuantizeStep):
        ok, reason = backend_available(step.backend)
        if not ok:
            get_run_logger().warning("skipping %s: %s", planned.name, reason)
            Tracker().client.set_tag(parent_run_id, f"skipped.{planned.name}", reason)
            return None
    return record_stage(
        Tracker(), parent_run_id, planned.name, step.kind,
        lambda: stages.step_stage(cfg, planned, source, Path(run_dir) / step.kind, make_meter(cfg.energy)),
        cfg.energy)


@task(name="evaluate", cache_policy=NO_CACHE, tags=["measured"], task_run_name="evaluate-{variant.name}")
def evaluate(cfg: PipelineConfig, run_dir: str, variant: StageResult) -> dict[str, float | str]:
    figures = stages.evaluate_variant(cfg, variant, Path(run_dir) / "deploy", make_meter(cfg.energy))
    record_evaluation(Tracker(), variant.mlflow_run_id, figures)
    return figures
