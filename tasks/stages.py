"""Prefect tasks around the library's stages.

Each measured stage is two tasks: an outer one that owns the MLflow child run (so a failure leaves it
FAILED) and an inner one that does the work and is cached with a persisted result, keyed by
`wattflow.provenance` (configuration slice, input sha256, code version). A re-run after a later stage
failed therefore reuses the trained checkpoint (the inner task ends Cached) and spends no training energy.
Evaluation is never cached: measuring is its point.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from tasks.concurrency import measured_slot
from tasks.multinode import train_multinode
from tasks.progress import TrainingProgress, training_reused
from wattflow import stages
from wattflow.chains import PlannedStep
from wattflow.config import PipelineConfig
from wattflow.energy import make_meter
from wattflow.models import sha256_file
from wattflow.provenance import step_cache_key, train_cache_key
from wattflow.stages import StageResult, VariantFigures
from wattflow.tracking import Tracker, record_evaluation, record_stage
from wattflow.workloads import workload_for


def result_storage(cfg: PipelineConfig) -> str | Path:
    """A Prefect block slug ('block:s3-bucket/x' -> 's3-bucket/x') or a local directory."""
    where = cfg.cache.result_storage or str(Path(cfg.work_dir) / "cache")
    if where.startswith("block:"):
        return where.removeprefix("block:")
    return Path(where).resolve()


def run_cached(inner, cfg: PipelineConfig, *args) -> StageResult:
    """Call `inner` with the configured cache; a cached result whose checkpoint is gone or changed is
    recomputed (refresh), so a cache hit never hands on a file it cannot vouch for."""
    options = {"result_storage": result_storage(cfg), "refresh_cache": cfg.cache.refresh}
    if not cfg.cache.enabled:
        options = {"cache_policy": NO_CACHE, "persist_result": False}
    state = inner.with_options(**options)(cfg, *args, return_state=True)
    result: StageResult = state.result()
    if not state.is_completed() or state.name != "Cached":
        return result
    art = result.artifact
    if Path(art.path).is_file() and sha256_file(art.path) == art.sha256:
        return result.model_copy(update={"cached": True})
    get_run_logger().warning("cached %s points at %s, which is gone or changed: recomputing", result.name, art.path)
    return inner.with_options(**{**options, "refresh_cache": True})(cfg, *args)


def tag_cache(result: StageResult, run_dir: str) -> StageResult:
    """A cached stage's energy figures are what producing it cost in the flow run that did the work."""
    Tracker(journal_dir=run_dir).set_tag(result.mlflow_run_id, "wattflow.cache", "hit" if result.cached else "miss")
    return result


@task(name="train-model", tags=["measured"], persist_result=True, result_serializer="json",
      cache_key_fn=lambda _, p: train_cache_key(p["cfg"]))
def train_model(cfg: PipelineConfig, out_dir: str) -> StageResult:
    logger = get_run_logger()
    progress = TrainingProgress(Path(out_dir) / "progress.jsonl", cfg.train.epochs)

    def log(line: str) -> None:
        logger.info(line)
        progress.poll()

    if cfg.train.nnodes > 1:  # the node runs hold their own measured slots on their hosts
        result = train_multinode(cfg, cfg.train.nnodes, out_dir, rdzv_host=cfg.train.rdzv_host, log=logger.info)
    else:
        with measured_slot(logger.info):
            result = stages.train_stage(cfg, Path(out_dir), make_meter(cfg.energy), log)
    return result.model_copy(update={"params": {**result.params, "produced_by_flow_run": str(flow_run.id)}})


@task(name="build-variant", tags=["measured"], persist_result=True, result_serializer="json",
      cache_key_fn=lambda _, p: step_cache_key(p["cfg"], p["planned"], p["source"].artifact.sha256),
      task_run_name="build-{planned.name}")
def build_variant(cfg: PipelineConfig, planned: PlannedStep, source: StageResult, out_dir: str) -> StageResult:
    with measured_slot(get_run_logger().info):
        result = stages.step_stage(cfg, planned, source, Path(out_dir), make_meter(cfg.energy))
    return result.model_copy(update={"params": {**result.params, "produced_by_flow_run": str(flow_run.id)}})


@task(name="train", cache_policy=NO_CACHE)
def train(cfg: PipelineConfig, parent_run_id: str, run_dir: str) -> StageResult:
    out_dir = str(Path(run_dir) / "train")
    result = tag_cache(record_stage(Tracker(journal_dir=run_dir), parent_run_id, "train", "train",
                                    lambda: run_cached(train_model, cfg, out_dir), cfg.energy), run_dir)
    if result.cached:
        training_reused(str(result.params.get("produced_by_flow_run", "unknown")))
    Tracker(journal_dir=run_dir).log_input(result.mlflow_run_id, workload_for(cfg).dataset_record("training"))
    return result


@task(name="compress", cache_policy=NO_CACHE, task_run_name="{planned.name}")
def compress(cfg: PipelineConfig, parent_run_id: str, run_dir: str, source: StageResult | None,
             planned: PlannedStep) -> StageResult | None:
    """One step of a chain. Returns None, with the reason logged and tagged on the parent run, when its
    input was skipped or its quantize backend cannot run here."""
    if source is None:
        return None
    step = planned.step
    ok, reason = step.available()
    if not ok:
        get_run_logger().warning("skipping %s: %s", planned.name, reason)
        Tracker(journal_dir=run_dir).set_tag(parent_run_id, f"skipped.{planned.name}", reason)
        return None
    out_dir = str(Path(run_dir) / step.kind)
    return tag_cache(record_stage(Tracker(journal_dir=run_dir), parent_run_id, planned.name, step.kind,
                                  lambda: run_cached(build_variant, cfg, planned, source, out_dir), cfg.energy),
                     run_dir)


@task(name="evaluate", cache_policy=NO_CACHE, tags=["measured"], task_run_name="evaluate-{variant.name}")
def evaluate(cfg: PipelineConfig, run_dir: str, variant: StageResult) -> VariantFigures:
    """Accuracy, sizes and the deployable of one variant; latency and energy come from `measure`."""
    with measured_slot(get_run_logger().info):
        return stages.evaluate_variant(cfg, variant, Path(run_dir) / "deploy", make_meter(cfg.energy),
                                       measure=False)


@task(name="measure", cache_policy=NO_CACHE, tags=["measured"])
def measure(cfg: PipelineConfig, run_dir: str, variants: list[StageResult],
            figures: list[VariantFigures]) -> list[VariantFigures]:
    """Latency and energy of every variant, round-robin across them in eval.rounds rounds (one slot held
    throughout), then every variant's figures recorded on its run."""
    with measured_slot(get_run_logger().info):
        complete = stages.measure_variants(cfg, variants, figures, make_meter(cfg.energy))
    tracker = Tracker(journal_dir=run_dir)
    for variant, f in zip(variants, complete, strict=True):
        record_evaluation(tracker, variant.mlflow_run_id, f)
    return complete
