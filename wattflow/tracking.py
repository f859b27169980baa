"""The MLflow adapter. Runs are addressed by explicit id through `MlflowClient` (MLflow's "active
run" is thread-local, and Prefect runs tasks in worker threads).

Contract: one parent run per flow run (configuration as params, tag `prefect.flow_run_id`); one
child run per stage and variant (tag `wattflow.stage`; metrics `accuracy`, `size_bytes`, `energy_j`;
tag `energy.method`); evaluation figures on the run of the variant they describe.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from torch import nn

from wattflow.config import EnergyConfig
from wattflow.energy import EnergyResult, co2e_g
from wattflow.models import load_checkpoint

STAGE_TAG = "wattflow.stage"


class Float32IO(nn.Module):
    """float32 in and out whatever the model's dtype, so every logged variant (bf16 too) takes the
    same input as the others."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.dtype = next(model.parameters()).dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


def pip_requirements(*packages: str) -> list[str]:
    """Explicit pins: MLflow's inference takes seconds and writes a `+cpu` local version pip can't install."""
    return [f"{p}=={version(p).split('+')[0]}" for p in packages]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def metric_key(name: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and space."""
    return re.sub(r"[^\w\-./ ]", "_", name)


class Tracker:
    def __init__(self, tracking_uri: str | None = None):
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.tracking_uri)  # for the model-logging helpers, which use fluent APIs
        self.client = MlflowClient(self.tracking_uri)

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        return self.client.create_experiment(name, artifact_location=self._local_artifact_root())

    def _local_artifact_root(self) -> str | None:
        """Beside a SQLite store, keep artifacts next to the database rather than in ./mlruns of the cwd."""
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri.removeprefix("sqlite:///"))
            return (db.parent / "mlartifacts").resolve().as_uri()
        return None

    def start_run(self, experiment_id: str, run_name: str, parent_run_id: str | None = None,
                  tags: dict[str, str] | None = None, params: dict[str, Any] | None = None) -> str:
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        for key, value in flatten(params).items():
            self.client.log_param(run_id, key, value)

    def log_metrics(self, run_id: str, metrics: dict[str, float | None]) -> None:
        """None means unknown: it is left out, never logged as 0."""
        for key, value in metrics.items():
            if value is not None:
                self.client.log_metric(run_id, metric_key(key), float(value))

    def log_energy(self, run_id: str, energy: EnergyResult) -> None:
        """The stage's energy: totals per device kind, the method and scope as tags, and the full
        per-device record as a JSON artifact. Unknown figures are left out, never written as 0."""
        by_kind = energy.energy_by_kind()
        self.log_metrics(run_id, {
            "energy_j": energy.energy_j, "energy_gpu_j": by_kind.get("gpu"), "energy_cpu_j": by_kind.get("cpu"),
            "energy_dram_j": by_kind.get("dram"), "power_avg_w": energy.avg_power_w,
            "energy_duration_s": energy.duration_s})
        self.client.set_tag(run_id, "energy.method", energy.method)
        self.client.set_tag(run_id, "energy.scope", energy.scope)
        self.client.set_tag(run_id, "energy.node", energy.node)
        self.client.set_tag(run_id, "energy.flags", ",".join(energy.flags) or "none")
        self.client.log_dict(run_id, energy.to_dict(), f"energy/{metric_key(energy.name)}.json")

    def log_co2e(self, run_id: str, energy_j: float | None, cfg: EnergyConfig) -> None:
        """Carbon as its own explicit step: kWh x grid intensity x PUE, each input recorded beside it."""
        self.log_metrics(run_id, {"co2e_g": co2e_g(energy_j, cfg.carbon_intensity_g_per_kwh, cfg.pue)})
        self.client.set_tag(run_id, "carbon.intensity_g_per_kwh", str(cfg.carbon_intensity_g_per_kwh))
        self.client.set_tag(run_id, "carbon.intensity_source", cfg.carbon_intensity_source)
        self.client.set_tag(run_id, "carbon.pue", str(cfg.pue))

    def end_run(self, run_id: str, ok: bool) -> None:
        status = RunStatus.FINISHED if ok else RunStatus.FAILED
        self.client.set_terminated(run_id, RunStatus.to_string(status))

    @contextmanager
    def run(self, experiment_id: str, run_name: str, parent_run_id: str | None = None,
            tags: dict[str, str] | None = None, params: dict[str, Any] | None = None) -> Iterator[str]:
        """A run that ends FINISHED, or FAILED (with the error as a tag) when the body raises."""
        run_id = self.start_run(experiment_id, run_name, parent_run_id, tags, params)
        try:
            yield run_id
        except BaseException as err:
            self.client.set_tag(run_id, "error", f"{type(err).__name__}: {err}"[:5000])
            self.end_run(run_id, ok=False)
            raise
        self.end_run(run_id, ok=True)

    def log_model(self, run_id: str, path: str, fmt: str) -> None:
        """Log the variant as an MLflow model (torch or ONNX flavour) on its run. MLflow's model
        logging needs the fluent active run, whose context ends the run: call this last."""
        with mlflow.start_run(run_id=run_id):
            if fmt == "torch":
                model, spec, _ = load_checkpoint(path)
                # MLflow's default 'pt2' format is a traced graph (no pickled code), traced on this example.
                example = np.zeros((2, spec["in_features"]), dtype=np.float32)
                mlflow.pytorch.log_model(Float32IO(model), name="model", input_example=example,
                                         pip_requirements=pip_requirements("torch"))
            else:
                import onnx

                mlflow.onnx.log_model(onnx.load(path), name="model", save_as_external_data=False,
                                      pip_requirements=pip_requirements("onnx", "onnxruntime"))


def record_stage(tracker: Tracker, parent_run_id: str, name: str, stage: str, work, energy_cfg: EnergyConfig,
                 log_model: bool = True):
    """Run `work()` (which returns a StageResult) inside a child run of `parent_run_id`, log the
    stage contract (params, metrics, `energy_j` + `energy.method`, `size_bytes`, the model) and
    return the result with its run id. The child run ends FAILED if anything raises."""
    experiment_id = tracker.client.get_run(parent_run_id).info.experiment_id
    with tracker.run(experiment_id, name, parent_run_id, tags={STAGE_TAG: stage}) as run_id:
        result = work()
        tracker.client.set_tag(run_id, "wattflow.chain", " -> ".join(result.chain))
        tracker.log_params(run_id, result.params)
        tracker.log_metrics(run_id, {**result.metrics, "size_bytes": Path(result.artifact.path).stat().st_size})
        tracker.log_energy(run_id, result.energy_result)
        tracker.log_co2e(run_id, result.energy_result.energy_j, energy_cfg)
        tracker.client.set_tag(run_id, "artifact.sha256", result.artifact.sha256)
        if log_model:
            tracker.log_model(run_id, result.artifact.path, result.artifact.format)
    return result.model_copy(update={"mlflow_run_id": run_id})


def record_evaluation(tracker: Tracker, run_id: str, figures: dict[str, float | str]) -> None:
    """Evaluation figures go on the run of the variant they describe (logging to a finished run is allowed)."""
    tracker.log_metrics(run_id, {k: v for k, v in figures.items() if not isinstance(v, str)})
    for key, value in figures.items():
        if isinstance(value, str):
            tracker.client.set_tag(run_id, f"eval.{key}", value)


def record_ratios(tracker: Tracker, variants, rows: list[dict]) -> None:
    """Ratios need every variant's figures, so they are logged once all are evaluated."""
    for variant, row in zip(variants, rows, strict=True):
        tracker.log_metrics(variant.mlflow_run_id, {
            "deployable_compression_ratio": row["deployable_compression_ratio"],
            "size_ratio_vs_train_file": row["size_vs_train_file"]})
