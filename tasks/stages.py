"""The pipeline's stages as Prefect tasks, one task per stage, each recorded as an MLflow child run.

Task arguments that are not another task's result go in `quote(...)`: Prefect links a task to earlier ones by
the identity of what it is passed, looking inside every argument, and strings or dicts inside a configuration
would otherwise link it to unrelated tasks (a recycled object id) in the Prefect UI's graph.

`TrackedStages` is what the flow hands to the library's stage loop (`wattflow.stage_loop.run_stages`): each
method opens the stage's MLflow child run (`wattflow.tracking.record_stage`: FAILED, with the error, if the
task fails) around one Prefect task. Training and the compression steps are cached with a persisted result,
keyed by `wattflow.provenance` (configuration slice, input sha256, code version): a re-run after a later stage
failed reuses the trained checkpoint (the task ends Cached) and spends no training energy. Evaluation is never
cached: measuring is its point.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.utilities.annotations import opaque, quote

from tasks.concurrency import measured_slot, reads_host_counters
from tasks.multinode import train_multinode
from tasks.progress import TrainingProgress, report, training_reused
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


def run_cached(stage_task, cfg: PipelineConfig, *args) -> StageResult:
    """Call `stage_task` with the configured cache; a cached result whose checkpoint is gone or changed is
    recomputed (refresh), so a cache hit never hands on a file it cannot vouch for."""
    options = {"result_storage": result_storage(cfg), "refresh_cache": cfg.cache.refresh}
    if not cfg.cache.enabled:
        options = {"cache_policy": NO_CACHE, "persist_result": False}
    state = stage_task.with_options(**options)(quote(cfg), *args, return_state=True)
    result: StageResult = state.result()
    if not state.is_completed() or state.name != "Cached":
        return result
    art = result.artifact
    if Path(art.path).is_file() and sha256_file(art.path) == art.sha256:
        result.cached = True  # in place: Prefect links this object to the tasks it is passed to
        return result
    get_run_logger().warning("cached %s points at %s, which is gone or changed: recomputing", result.name, art.path)
    return stage_task.with_options(**{**options, "refresh_cache": True})(quote(cfg), *args)


def produced_here(result: StageResult) -> StageResult:
    """Which flow run did the work (a later cache hit logs its energy as reused from that run)."""
    result.params = {**result.params, "produced_by_flow_run": str(flow_run.id)}
    return result


@task(name="train", persist_result=True, result_serializer="json", cache_key_fn=lambda _, p: train_cache_key(p["cfg"]))
def train(cfg: PipelineConfig, out_dir: str) -> StageResult:
    logger = get_run_logger()
    progress = TrainingProgress(Path(out_dir) / "progress.jsonl", cfg.train.epochs)

    def log(line: str) -> None:
        logger.info(line)
        progress.poll()

    if cfg.train.nnodes > 1:  # the node runs hold their own measured slots on their hosts
        return produced_here(train_multinode(cfg, cfg.train.nnodes, out_dir, rdzv_host=cfg.train.rdzv_host,
                                             log=logger.info))
    meter = make_meter(cfg.energy, stages.metered_gpus(cfg, "train"))
    with measured_slot(logger.info, host_wide=reads_host_counters(meter)):
        return produced_here(stages.train_stage(cfg, Path(out_dir), meter, log))


@task(name="compress", persist_result=True, result_serializer="json", task_run_name="{planned.name}",
      cache_key_fn=lambda _, p: step_cache_key(p["cfg"], p["planned"], p["source"].artifact.sha256))
def compress(cfg: PipelineConfig, planned: PlannedStep, source: StageResult, out_dir: str) -> StageResult:
    """One step of a chain, on the trained model or the previous step's output."""
    meter = make_meter(cfg.energy, stages.metered_gpus(cfg, "compress", planned.step))
    with measured_slot(get_run_logger().info, host_wide=reads_host_counters(meter)):
        return produced_here(stages.step_stage(cfg, planned, source, Path(out_dir), meter))


@task(name="evaluate", cache_policy=NO_CACHE, task_run_name="evaluate-{variant.name}")
def evaluate(cfg: PipelineConfig, run_dir: str, variant: StageResult) -> VariantFigures:
    """Accuracy, sizes and the deployable of one variant; latency and energy come from `measure`, so this
    measures nothing and holds no measured-stage slot."""
    return stages.evaluate_variant(cfg, variant, Path(run_dir) / "deploy")


@task(name="measure", cache_policy=NO_CACHE)
def measure(cfg: PipelineConfig, run_dir: str, variants: list[StageResult],
            figures: list[VariantFigures]) -> list[VariantFigures]:
    """Latency and energy of every variant, round-robin across them in eval.rounds rounds (one slot held
    throughout), then every variant's figures recorded on its run."""
    meter = make_meter(cfg.energy, stages.metered_gpus(cfg, "evaluate"))
    with measured_slot(get_run_logger().info, host_wide=reads_host_counters(meter)):
        complete = stages.measure_variants(cfg, variants, figures, meter)
    tracker = Tracker(journal_dir=run_dir)
    for variant, f in zip(variants, complete, strict=True):
        record_evaluation(tracker, variant.mlflow_run_id, f)
    return complete


class TrackedStages:
    """The stage loop's stages for the flow: Prefect tasks, each inside its MLflow child run of `parent_run_id`.
    Models are logged to MLflow here only with `tracking.log_models: all`; by default only what ships is."""

    def __init__(self, cfg: PipelineConfig, parent_run_id: str, run_dir: str):
        self.cfg, self.parent, self.run_dir = cfg, parent_run_id, run_dir
        self.tracker = Tracker(journal_dir=run_dir)
        self.log_models = cfg.tracking.log_models == "all"

    def _record(self, name: str, kind: str, work) -> StageResult:
        return record_stage(self.tracker, self.parent, name, kind, work, self.cfg.energy, log_model=self.log_models)

    def train(self) -> StageResult:
        out_dir = str(Path(self.run_dir) / "train")
        result = self._record("train", "train", lambda: run_cached(train, self.cfg, quote(out_dir)))
        if result.cached:
            training_reused(str(result.params.get("produced_by_flow_run", "unknown")))
        self.tracker.log_input(result.mlflow_run_id, workload_for(self.cfg).dataset_record("training"))
        return result

    def step(self, planned: PlannedStep, source: StageResult) -> StageResult:
        out_dir = str(Path(self.run_dir) / planned.step.kind)
        return self._record(planned.name, planned.step.kind,
                            lambda: run_cached(compress, self.cfg, quote(planned), opaque(source), quote(out_dir)))

    def skip(self, planned: PlannedStep, reason: str) -> None:
        get_run_logger().warning("skipping %s: %s", planned.name, reason)
        self.tracker.set_tag(self.parent, f"skipped.{planned.name}", reason)

    # A stage result is an input by itself (`opaque`): Prefect links a task to results by id, and would otherwise
    # walk into it and link any interned string there ("cpu") to whichever earlier result returned the same one.
    def evaluate(self, variant: StageResult) -> VariantFigures:
        return evaluate(quote(self.cfg), quote(self.run_dir), opaque(variant))

    def measure(self, variants: list[StageResult], figures: list[VariantFigures]) -> list[VariantFigures]:
        return measure(quote(self.cfg), quote(self.run_dir), [opaque(v) for v in variants],
                       [opaque(f) for f in figures])

    def progress(self, done: int, total: int, text: str) -> None:
        report("variants", done, total, text)
