"""The pipeline's stages as plain functions: each does its work inside a named energy window and
returns a small, serialisable `StageResult` (paths, hashes, figures: never modules or tensors).
Prefect tasks wrap these; MLflow logging lives in `wattflow.tracking`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel

from wattflow.chains import PlannedStep
from wattflow.compress.distill import distill_checkpoint
from wattflow.compress.pack import deployable_artifact
from wattflow.compress.prune import prune_checkpoint
from wattflow.compress.quantize import quantize_checkpoint
from wattflow.config import PipelineConfig, PruneStep, QuantizeStep
from wattflow.data import batches, first_samples
from wattflow.distributed import launch_training
from wattflow.energy import EnergyMeter, EnergyResult
from wattflow.evaluate import load_predictor, median_latency_s, run_inferences, size_metrics
from wattflow.models import load_checkpoint, sha256_file
from wattflow.workloads import workload_for

Stage = Literal["train", "prune", "quantize", "distill"]


class Artifact(BaseModel):
    path: str
    format: Literal["torch", "onnx"]  # how the variant runs: eager torch, or ONNX Runtime
    sha256: str


class StageResult(BaseModel):
    name: str                  # unique variant name, e.g. "train", "prune-0.8", "prune-0.8+onnx-int8-static"
    stage: Stage
    chain: list[str]           # the steps from the trained model to this variant
    artifact: Artifact
    params: dict[str, str | int | float] = {}
    metrics: dict[str, float] = {}   # stage-specific figures (val accuracy, achieved sparsity, ...)
    energy: dict                     # EnergyResult.to_dict() of this stage's own work
    mlflow_run_id: str | None = None
    cached: bool = False       # reused from an earlier flow run: its energy was spent there, not here

    @property
    def energy_result(self) -> EnergyResult:
        return EnergyResult.from_dict(self.energy)


def train_stage(cfg: PipelineConfig, out_dir: Path, meter: EnergyMeter,
                log: Callable[[str], None] = print) -> StageResult:
    with meter.window("train") as w:
        out = launch_training(cfg, out_dir, log)
    return StageResult(
        name="train", stage="train", chain=["train"],
        artifact=Artifact(path=out.checkpoint, format="torch", sha256=out.sha256),
        params={"model": cfg.train.model if isinstance(cfg.train.model, str) else cfg.train.model.factory,
                "world_size": out.world_size, "device": out.device},
        metrics={"val_accuracy": out.metrics["val_accuracy"], "samples_seen": out.samples_seen,
                 # the last attempt's duration; the energy window covers every attempt
                 "train_duration_s": out.metrics["train_duration_s"], "restarts": out.restarts},
        energy=w.result.to_dict())


def step_stage(cfg: PipelineConfig, planned: PlannedStep, source: StageResult, out_dir: Path,
               meter: EnergyMeter) -> StageResult:
    """Run one step of a chain on `source` (the trained model or the previous step's output).
    Raises `BackendUnavailable` when a quantize backend cannot run here (the caller skips it)."""
    step = planned.step
    with meter.window(planned.name) as w:
        if isinstance(step, PruneStep):
            artifact, params, metrics = _prune(cfg, step, source, out_dir / f"{planned.name}.pt")
        elif isinstance(step, QuantizeStep):
            artifact, params, metrics = _quantize(cfg, step, source, out_dir / planned.name)
        else:
            artifact, params, metrics = _distill(cfg, source, out_dir / f"{planned.name}.pt")
    return StageResult(name=planned.name, stage=step.kind, chain=[*source.chain, planned.key[-1]],
                       artifact=artifact, params=params, metrics=metrics, energy=w.result.to_dict())


def _prune(cfg: PipelineConfig, step: PruneStep, source: StageResult, out_path: Path):
    workload = workload_for(cfg)
    out = prune_checkpoint(source.artifact.path, out_path, step.sparsity, workload.splits.train,
                           cfg.prune.fine_tune_epochs, cfg.prune.lr, cfg.train.batch_size, cfg.train.seed,
                           expected_sha256=source.artifact.sha256, method=step.method,
                           schedule_steps=cfg.prune.schedule_steps, layer_types=tuple(cfg.prune.layer_types),
                           keep=kept_layer_names(workload, source.artifact.path), loss_fn=workload.loss)
    params = {"target_sparsity": step.sparsity, "method": f"global-l1-{step.method}",
              "fine_tune_epochs": cfg.prune.fine_tune_epochs, "schedule_steps": cfg.prune.schedule_steps,
              "layer_types": ",".join(cfg.prune.layer_types)}
    metrics = {"sparsity": out.sparsity, "params_after": out.params_after,
               **{f"sparsity.{k}": v for k, v in out.layer_sparsity.items()},
               **{f"width.{k}": after for k, (_, after) in (out.layer_width or {}).items()}}
    return Artifact(path=out.checkpoint, format="torch", sha256=out.sha256), params, metrics


def _quantize(cfg: PipelineConfig, step: QuantizeStep, source: StageResult, out_dir: Path):
    calibration = first_samples(workload_for(cfg).splits.train, cfg.quantize.calibration_samples)
    out = quantize_checkpoint(source.artifact.path, step.backend, out_dir, calibration)
    params = {"backend": step.backend, "calibration_samples": cfg.quantize.calibration_samples, "note": out.note}
    return Artifact(path=out.path, format=out.format, sha256=sha256_file(out.path)), params, {}


def _distill(cfg: PipelineConfig, source: StageResult, out_path: Path):
    d, workload = cfg.distill, workload_for(cfg)
    splits, spec = workload.splits, workload.student_spec()
    out = distill_checkpoint(source.artifact.path, out_path, spec, splits.train, splits.val, d.epochs, d.lr,
                             d.temperature, d.alpha, cfg.train.batch_size, cfg.train.seed,
                             expected_sha256=source.artifact.sha256)
    params = {"student": json.dumps(out.student_spec), "epochs": d.epochs, "temperature": d.temperature,
              "alpha": d.alpha, "lr": d.lr}
    metrics = {"val_accuracy": out.val_accuracy, "student_params": out.student_params}
    return Artifact(path=out.checkpoint, format="torch", sha256=out.sha256), params, metrics


def kept_layer_names(workload, checkpoint: str) -> tuple[str, ...]:
    """Names of the layers the workload keeps unpruned in the model at `checkpoint`."""
    model = load_checkpoint(checkpoint)[0]
    names = {m: n for n, m in model.named_modules()}
    return tuple(names[m] for m in workload.keep_layers(model))


def inference_energy(cfg: PipelineConfig, name: str, predict, x, meter: EnergyMeter) -> dict[str, float | str]:
    """Energy per 1k inferences at batch 256 after a warm-up, repeating batches until the window holds at
    least `eval.energy_inferences` and lasts `eval.energy_min_window_s` (short windows sit at the counter's
    resolution; the meter flags `below_resolution` when they still do)."""
    run_inferences(predict, x, 256 * max(1, cfg.eval.warmup))
    n = 0
    started = time.perf_counter()
    with meter.window(f"{name}/inference") as w:
        while n < cfg.eval.energy_inferences or time.perf_counter() - started < cfg.eval.energy_min_window_s:
            n += run_inferences(predict, x, 256 * 16)
    energy = w.result
    figures: dict[str, float | str] = {
        "inferences_measured": n, "throughput_per_s": n / energy.duration_s,
        "energy_per_1k_inferences.method": energy.method,
        "energy_per_1k_inferences.flags": ",".join(energy.flags) or "none"}
    if energy.energy_j is not None:
        figures["energy_per_1k_inferences_j"] = energy.energy_j / n * 1e3
    return figures


def evaluate_variant(cfg: PipelineConfig, variant: StageResult, deploy_dir: Path,
                     meter: EnergyMeter) -> dict[str, float | str]:
    """Test accuracy, latency per batch size, energy per inference, every size definition, and the deployable
    artifact (checked to predict exactly as the variant), measured with the runtime the variant deploys on,
    one thread (cfg.eval.threads)."""
    workload = workload_for(cfg)
    test = workload.splits.test
    art = variant.artifact
    if sha256_file(art.path) != art.sha256:
        raise ValueError(f"{art.path} changed since its stage wrote it (sha256 mismatch)")
    predict = load_predictor(art.path, art.format, cfg.eval.threads)
    figures: dict[str, float | str] = dict(workload.score(predict, test))
    figures["test_samples"] = len(test)
    # Timing and energy batches: real test inputs (up to the largest batch), tiled when the split is smaller.
    timing_x = first_samples(test, max(256, *cfg.eval.batch_sizes))
    for batch in cfg.eval.batch_sizes:
        figures[f"latency_b{batch}_s"] = median_latency_s(predict, timing_x, batch, cfg.eval.repeats,
                                                          cfg.eval.warmup)
    figures.update(inference_energy(cfg, variant.name, predict, timing_x, meter))
    sizes = size_metrics(art.path, art.format)
    figures.update({"param_count": sizes["param_count"], "nonzero_params": sizes["nonzero_params"],
                    "dense_bytes": sizes["dense_bytes"], "size_bytes": sizes["file_bytes"],
                    "size_lzma_bytes": sizes["lzma_bytes"]})
    deploy_path, deploy_bytes = deployable_artifact(art.path, art.format, deploy_dir)
    figures["deployable_bytes"] = deploy_bytes
    figures["deployable.path"] = deploy_path
    if deploy_path != art.path:  # a packed file: it must give exactly the variant's outputs
        deployed = load_predictor(deploy_path, "packed", cfg.eval.threads)
        figures["deployable_identical"] = float(all(np.array_equal(deployed(xb), predict(xb))
                                                    for xb, _ in batches(test, 512)))
    return figures
