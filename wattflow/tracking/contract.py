"""wattflow's MLflow contract. One parent run per flow run (configuration as params, tag `prefect.flow_run_id`);
one child run per stage and variant (tag `wattflow.stage`; metrics `accuracy`, `size_bytes`, `energy_j`; tag
`energy.method`); evaluation figures on the run of the variant they describe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wattflow.config import EnergyConfig
from wattflow.energy import EnergyResult, co2e_g
from wattflow.tracking.tracker import Tracker, metric_key

STAGE_TAG = "wattflow.stage"
CACHE_TAG = "wattflow.cache"


def energy_fields(energy: EnergyResult, cfg: EnergyConfig) -> tuple[dict[str, float | None], dict[str, str]]:
    """Energy spent, as metrics (totals per device kind and its carbon; unknown stays None, never 0) and tags
    (method, scope, node, flags, the carbon inputs)."""
    by_kind = energy.energy_by_kind()
    carbon, carbon_tags = co2e_fields(energy.energy_j, cfg)
    metrics = {"energy_j": energy.energy_j, "energy_gpu_j": by_kind.get("gpu"), "energy_cpu_j": by_kind.get("cpu"),
               "energy_dram_j": by_kind.get("dram"), "power_avg_w": energy.avg_power_w,
               "energy_duration_s": energy.duration_s, **carbon}
    tags = {"energy.method": energy.method, "energy.scope": energy.scope, "energy.node": energy.node,
            "energy.flags": ",".join(energy.flags) or "none", **carbon_tags}
    return metrics, tags


def co2e_fields(energy_j: float | None, cfg: EnergyConfig, key: str = "co2e_g"
                ) -> tuple[dict[str, float | None], dict[str, str]]:
    """Carbon as its own explicit step: kWh x grid intensity x PUE, each input recorded beside it."""
    return ({key: co2e_g(energy_j, cfg.carbon_intensity_g_per_kwh, cfg.pue)},
            {"carbon.intensity_g_per_kwh": str(cfg.carbon_intensity_g_per_kwh),
             "carbon.intensity_source": cfg.carbon_intensity_source, "carbon.pue": str(cfg.pue)})


def log_energy(tracker: Tracker, run_id: str, energy: EnergyResult, cfg: EnergyConfig) -> None:
    """Energy and carbon of a run, and the full per-device record as a JSON artifact."""
    metrics, tags = energy_fields(energy, cfg)
    tracker.log_batch(run_id, metrics=metrics, tags=tags)
    tracker.log_dict(run_id, energy.to_dict(), f"energy/{metric_key(energy.name)}.json")


def reused_energy_fields(result, cfg: EnergyConfig) -> tuple[dict[str, float | None], dict[str, str]]:
    """A cached stage spent (almost) nothing in this flow run: its original cost is logged as *reused*, never
    as this run's `energy_j`, so summing `energy_j` over runs counts every joule once."""
    energy = result.energy_result
    carbon, carbon_tags = co2e_fields(energy.energy_j, cfg, key="co2e_reused_g")
    producer = result.params.get("produced_by_flow_run", "an earlier flow run")
    return ({"energy_reused_j": energy.energy_j, **carbon},
            {"energy.method": energy.method, "energy.flags": "cached",
             "energy.scope": f"reused: spent by flow run {producer}, not this one", **carbon_tags})


def record_result(tracker: Tracker, run_id: str, result, energy_cfg: EnergyConfig, log_model: bool = False):
    """Log a StageResult's contract on its child run in one batch (params, metrics with `size_bytes`, energy
    with its method, chain, hash and cache tags), its energy record, and the model when asked. Sets
    `result.mlflow_run_id` in place (Prefect links a task's result to the tasks it is passed to by identity)."""
    metrics: dict[str, Any] = {**result.metrics, "size_bytes": Path(result.artifact.path).stat().st_size}
    tags: dict[str, Any] = {"wattflow.chain": " -> ".join(result.chain), "artifact.sha256": result.artifact.sha256,
                            CACHE_TAG: "hit" if result.cached else "miss"}
    if result.cached:
        energy_metrics, energy_tags = reused_energy_fields(result, energy_cfg)
    else:
        energy_metrics, energy_tags = energy_fields(result.energy_result, energy_cfg)
        tracker.log_dict(run_id, result.energy, f"energy/{metric_key(result.energy_result.name)}.json")
    tracker.log_batch(run_id, metrics={**metrics, **energy_metrics}, params=result.params,
                      tags={**tags, **energy_tags})
    if log_model:
        tracker.log_model(run_id, result.artifact.path, result.artifact.format)
    result.mlflow_run_id = run_id
    return result


def record_stage(tracker: Tracker, parent_run_id: str, name: str, stage: str, work, energy_cfg: EnergyConfig,
                 log_model: bool = False):
    """Run `work()` (which returns a StageResult) inside a child run of `parent_run_id` and log the stage
    contract on it (`record_result`). The child run ends FAILED, with the error as a tag, if anything raises."""
    with tracker.run(tracker.experiment_of(parent_run_id), name, parent_run_id, tags={STAGE_TAG: stage}) as run_id:
        return record_result(tracker, run_id, work(), energy_cfg, log_model)


def record_evaluation(tracker: Tracker, run_id: str, figures) -> None:
    """Evaluation figures (a `wattflow.stages.VariantFigures`) go on the run of the variant they describe
    (logging to a finished run is allowed); unknown figures are left out, never logged as 0. The deployable
    file is kept on the run as a plain artifact (`deployable/`), whether or not the variant ships."""
    tracker.log_batch(run_id, metrics=figures.mlflow_metrics(), tags=figures.mlflow_tags())
    if figures.deployable_path is not None and Path(figures.deployable_path).is_file():
        tracker.log_artifact(run_id, figures.deployable_path, "deployable")


def record_ratios(tracker: Tracker, variants, rows: list[dict]) -> None:
    """Ratios need every variant's figures, so they are logged once all are evaluated."""
    for variant, row in zip(variants, rows, strict=True):
        tracker.log_metrics(variant.mlflow_run_id, {
            "deployable_compression_ratio": row["deployable_compression_ratio"],
            "size_ratio_vs_train_file": row["size_vs_train_file"]})
