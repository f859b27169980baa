"""The pipeline's stages as plain functions: each does its work inside a named energy window and
returns a small, serialisable `StageResult` (paths, hashes, figures: never modules or tensors).
Prefect tasks wrap these; MLflow logging lives in `wattflow.tracking`."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from wattflow.compress.prune import prune_checkpoint
from wattflow.compress.quantize import quantize_checkpoint
from wattflow.config import PipelineConfig
from wattflow.data import Splits, load_splits
from wattflow.distributed import launch_training
from wattflow.energy import EnergyMeter, EnergyResult
from wattflow.evaluate import accuracy, load_predictor, median_latency_s, run_inferences, size_metrics
from wattflow.models import sha256_file

Stage = Literal["train", "prune", "quantize"]


class Artifact(BaseModel):
    path: str
    format: Literal["torch", "onnx"]
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

    @property
    def energy_result(self) -> EnergyResult:
        return EnergyResult.from_dict(self.energy)


def splits_for(cfg: PipelineConfig) -> Splits:
    return load_splits(cfg.data.dataset, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.seed)


def train_stage(cfg: PipelineConfig, out_dir: Path, meter: EnergyMeter,
                log: Callable[[str], None] = print) -> StageResult:
    with meter.window("train") as w:
        out = launch_training(cfg, out_dir, log)
    return StageResult(
        name="train", stage="train", chain=["train"],
        artifact=Artifact(path=out.checkpoint, format="torch", sha256=out.sha256),
        params={"model": cfg.train.model, "world_size": out.world_size, "device": out.device},
        metrics={"val_accuracy": out.metrics["val_accuracy"], "samples_seen": out.samples_seen,
                 "train_duration_s": out.metrics["train_duration_s"]},
        energy=w.result.to_dict())


def prune_stage(cfg: PipelineConfig, parent: StageResult, sparsity: float, out_dir: Path,
                meter: EnergyMeter) -> StageResult:
    name = f"prune-{sparsity:g}"
    with meter.window(name) as w:
        out = prune_checkpoint(parent.artifact.path, out_dir / f"{name}.pt", sparsity, splits_for(cfg).train,
                               cfg.prune.fine_tune_epochs, cfg.prune.lr, cfg.train.batch_size, cfg.train.seed,
                               expected_sha256=parent.artifact.sha256)
    metrics = {"sparsity": out.sparsity, **{f"sparsity.{k}": v for k, v in out.layer_sparsity.items()}}
    return StageResult(
        name=name, stage="prune", chain=[*parent.chain, name],
        artifact=Artifact(path=out.checkpoint, format="torch", sha256=out.sha256),
        params={"target_sparsity": sparsity, "method": "global-l1-unstructured",
                "fine_tune_epochs": cfg.prune.fine_tune_epochs},
        metrics=metrics, energy=w.result.to_dict())


def quantized_name(parent: StageResult, backend: str) -> str:
    return backend if parent.stage == "train" else f"{parent.name}+{backend}"


def quantize_stage(cfg: PipelineConfig, parent: StageResult, backend: str, out_dir: Path,
                   meter: EnergyMeter) -> StageResult:
    """Raises `BackendUnavailable` when the backend cannot run here (the caller skips it)."""
    name = quantized_name(parent, backend)
    calibration = splits_for(cfg).train.x[: cfg.quantize.calibration_samples]
    with meter.window(name) as w:
        out = quantize_checkpoint(parent.artifact.path, backend, out_dir / name, calibration)
    return StageResult(
        name=name, stage="quantize", chain=[*parent.chain, backend],
        artifact=Artifact(path=out.path, format=out.format, sha256=sha256_file(out.path)),
        params={"backend": backend, "calibration_samples": cfg.quantize.calibration_samples, "note": out.note},
        energy=w.result.to_dict())


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


def evaluate_variant(cfg: PipelineConfig, variant: StageResult, meter: EnergyMeter) -> dict[str, float | str]:
    """Test accuracy, latency per batch size, energy per inference and every size definition,
    measured with the runtime the variant deploys on, one thread (cfg.eval.threads)."""
    splits = splits_for(cfg)
    art = variant.artifact
    if sha256_file(art.path) != art.sha256:
        raise ValueError(f"{art.path} changed since its stage wrote it (sha256 mismatch)")
    predict = load_predictor(art.path, art.format, cfg.eval.threads)
    figures: dict[str, float | str] = {"accuracy": accuracy(predict, splits.test.x, splits.test.y)}
    for batch in cfg.eval.batch_sizes:
        figures[f"latency_b{batch}_s"] = median_latency_s(predict, splits.test.x, batch, cfg.eval.repeats,
                                                          cfg.eval.warmup)
    figures.update(inference_energy(cfg, variant.name, predict, splits.test.x, meter))
    sizes = size_metrics(art.path, art.format)
    figures.update({"param_count": sizes["param_count"], "nonzero_params": sizes["nonzero_params"],
                    "size_bytes": sizes["file_bytes"], "size_lzma_bytes": sizes["lzma_bytes"]})
    return figures
