"""The pipeline's stages as plain functions: each does its work inside a named energy window and
returns a small, serialisable `StageResult` (paths, hashes, figures: never modules or tensors).
Prefect tasks wrap these; MLflow logging lives in `wattflow.tracking`."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator

from wattflow.chains import PlannedStep
from wattflow.config import PipelineConfig
from wattflow.data import batches, first_samples
from wattflow.distributed import launch_training
from wattflow.energy import EnergyMeter, EnergyResult
from wattflow.evaluate import deployable_artifact, load_predictor, median_latency_s, run_inferences, size_metrics
from wattflow.intervals import bounds, median_interval, wilson
from wattflow.models import load_checkpoint, sha256_file
from wattflow.runtimes import RUNTIMES
from wattflow.workloads import workload_for

Stage = Literal["train", "prune", "sparsify", "quantize", "distill"]


class Artifact(BaseModel):
    path: str
    format: str  # the runtime the variant runs on: a name in wattflow.runtimes.RUNTIMES ("torch", "onnx")
    sha256: str

    @field_validator("format")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in RUNTIMES:
            raise ValueError(f"unknown runtime {value!r}; allowed: {', '.join(RUNTIMES.names())}")
        return value


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


class VariantFigures(BaseModel):
    """What evaluation measured of one variant; None is unknown (never 0). Formatted only at the edges: the
    summary rows and table (`wattflow.report`), MLflow metrics and tags (`mlflow_metrics`, `mlflow_tags`)."""

    model_config = ConfigDict(frozen=True)

    scores: dict[str, float] = {}                 # the workload's metrics ("accuracy" for classification)
    test_samples: int | None = None
    latency_s: dict[int, float] = {}              # batch size -> median seconds per call
    energy_per_1k_inferences_j: float | None = None   # median over eval.rounds rounds
    energy_per_1k_inferences_interval_j: tuple[float, float] | None = None  # its 95% interval (None: 1 round)
    latency_interval_s: dict[int, tuple[float, float]] = {}  # batch size -> 95% interval of the median latency
    rounds: int | None = None
    energy_method: str = "unavailable"
    energy_flags: tuple[str, ...] = ()
    inferences_measured: int | None = None
    throughput_per_s: float | None = None
    param_count: int | None = None
    nonzero_params: int | None = None
    dense_bytes: int | None = None
    size_bytes: int | None = None                 # the serialized file as written
    size_lzma_bytes: int | None = None
    deployable_bytes: int | None = None
    deployable_path: str | None = None
    deployable_runtime: str | None = None         # the runtime (wattflow.runtimes) that file runs on
    deployable_identical: bool | None = None      # None: the deployable is the file itself (nothing to check)
    deployable_check: str | None = None           # how the deployable was compared: "exact", or the tolerance
    eval_device: str | None = None                # where it was evaluated (eval.device): compare like with like
    tokens_per_sample: int | None = None          # language models: one inference scores a window of tokens

    @property
    def accuracy(self) -> float | None:
        return self.scores.get("accuracy")

    @property
    def accuracy_interval(self) -> tuple[float, float] | None:
        """95% Wilson interval of the test accuracy over independent samples (classification); None for a
        language model, whose per-token hits within a window are not independent."""
        if self.accuracy is None or not self.test_samples or self.tokens_per_sample is not None:
            return None
        return wilson(round(self.accuracy * self.test_samples), self.test_samples)

    @property
    def energy_per_1k_tokens_j(self) -> float | None:
        if self.tokens_per_sample is None or self.energy_per_1k_inferences_j is None:
            return None
        return self.energy_per_1k_inferences_j / self.tokens_per_sample

    @property
    def tokens_per_s(self) -> float | None:
        if self.tokens_per_sample is None or self.throughput_per_s is None:
            return None
        return self.throughput_per_s * self.tokens_per_sample

    def mlflow_metrics(self) -> dict[str, float]:
        numbers = {**self.scores, "test_samples": self.test_samples,
                   **{f"latency_b{b}_s": v for b, v in self.latency_s.items()},
                   "energy_per_1k_inferences_j": self.energy_per_1k_inferences_j,
                   "inferences_measured": self.inferences_measured, "throughput_per_s": self.throughput_per_s,
                   "param_count": self.param_count, "nonzero_params": self.nonzero_params,
                   "dense_bytes": self.dense_bytes, "size_bytes": self.size_bytes,
                   "size_lzma_bytes": self.size_lzma_bytes, "deployable_bytes": self.deployable_bytes,
                   "deployable_identical": None if self.deployable_identical is None
                   else float(self.deployable_identical),
                   "energy_per_1k_tokens_j": self.energy_per_1k_tokens_j, "tokens_per_s": self.tokens_per_s,
                   "eval_rounds": self.rounds,
                   **bounds("energy_per_1k_inferences_j", self.energy_per_1k_inferences_interval_j),
                   **{k: v for b, pair in self.latency_interval_s.items() for k, v in bounds(f"latency_b{b}_s",
                                                                                               pair).items()},
                   **(dict(zip(("accuracy_lo", "accuracy_hi"), self.accuracy_interval, strict=True))
                      if self.accuracy_interval else {})}
        return {k: float(v) for k, v in numbers.items() if v is not None}

    def mlflow_tags(self) -> dict[str, str]:
        tags = {"eval.energy_per_1k_inferences.method": self.energy_method,
                "eval.energy_per_1k_inferences.flags": ",".join(self.energy_flags) or "none"}
        if self.eval_device is not None:
            tags["eval.device"] = self.eval_device
        if self.deployable_path is not None:
            tags["eval.deployable.path"] = self.deployable_path
            tags["eval.deployable.runtime"] = str(self.deployable_runtime)
        if self.deployable_check is not None:
            tags["eval.deployable.check"] = self.deployable_check
        return tags


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
    """Run one step of a chain on `source` (the trained model or the previous step's output): the step kind's
    own `run` (wattflow.steps). Raises `BackendUnavailable` when a quantize backend cannot run here (the caller
    skips it)."""
    step = planned.step
    with meter.window(planned.name) as w:
        artifact, params, metrics = step.run(cfg, source, out_dir, planned.name)
    return StageResult(name=planned.name, stage=step.kind, chain=[*source.chain, planned.key[-1]],
                       artifact=artifact, params=params, metrics=metrics, energy=w.result.to_dict())


def kept_layer_names(workload, checkpoint: str) -> tuple[str, ...]:
    """Names of the layers the workload keeps unpruned in the model at `checkpoint`."""
    model = load_checkpoint(checkpoint)[0]
    names = {m: n for n, m in model.named_modules()}
    return tuple(names[m] for m in workload.keep_layers(model))


def measure_round_robin(cfg: PipelineConfig, predictors: dict[str, Callable], x, meter: EnergyMeter
                        ) -> dict[str, dict]:
    """Latency per batch size and energy per 1k inferences (batch 256) of every predictor, in `eval.rounds`
    rounds **round-robin across the predictors** (each round starts one predictor later), so that drift and
    neighbours on a shared machine hit all of them alike. In a round each predictor times every batch size (its
    share of `eval.repeats`, median kept) and then opens one energy window that repeats batches until it holds
    its share of `eval.energy_inferences` and of `eval.energy_min_window_s` (the meter flags `below_resolution`
    when a window is still too short). Each figure is the median over rounds, with its 95% interval.
    Returns name -> the VariantFigures fields measured."""
    e, rounds, names = cfg.eval, cfg.eval.rounds, list(predictors)
    for predict in predictors.values():
        run_inferences(predict, x, 256 * max(1, e.warmup))
    acc = {n: {"latency": {b: [] for b in e.batch_sizes}, "per_1k": [], "n": 0, "duration_s": 0.0,
               "flags": set(), "method": "unavailable"} for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            predict, a = predictors[name], acc[name]
            for b in e.batch_sizes:
                a["latency"][b].append(median_latency_s(predict, x, b, max(1, e.repeats // rounds),
                                                        e.warmup if r == 0 else 0))
            n, want_n, want_s = 0, -(-e.energy_inferences // rounds), e.energy_min_window_s / rounds
            started = time.perf_counter()
            with meter.window(f"{name}/inference-{r + 1}") as w:
                # One batch of 256 at a time: a language model's batch holds 256 x block_size tokens (about a
                # second on a CPU core), so larger steps would overshoot the window many times over.
                while n < want_n or time.perf_counter() - started < want_s:
                    n += run_inferences(predict, x, 256)
            energy = w.result
            a["per_1k"].append(None if energy.energy_j is None else energy.energy_j / n * 1e3)
            a["n"] += n
            a["duration_s"] += energy.duration_s or 0.0
            a["method"] = energy.method
            a["flags"] |= set(energy.flags)
    return {name: _summary(a, rounds) for name, a in acc.items()}


def _summary(a: dict, rounds: int) -> dict:
    lat = {b: median_interval(v) for b, v in a["latency"].items()}
    known_energy = [v for v in a["per_1k"] if v is not None]
    energy_median, energy_interval = median_interval(known_energy) if len(known_energy) == rounds else (None, None)
    return {"inferences_measured": a["n"], "throughput_per_s": a["n"] / a["duration_s"] if a["duration_s"] else None,
            "energy_method": a["method"], "energy_flags": tuple(sorted(a["flags"])), "rounds": rounds,
            "energy_per_1k_inferences_j": energy_median, "energy_per_1k_inferences_interval_j": energy_interval,
            "latency_s": {b: m for b, (m, _) in lat.items()},
            "latency_interval_s": {b: i for b, (_, i) in lat.items() if i is not None}}


def timing_inputs(cfg: PipelineConfig):
    """Timing and energy batches: real test inputs (up to the largest batch), tiled when the split is smaller."""
    return first_samples(workload_for(cfg).splits.test, max(256, *cfg.eval.batch_sizes))


def measure_variants(cfg: PipelineConfig, variants: list[StageResult], figures: list[VariantFigures],
                     meter: EnergyMeter) -> list[VariantFigures]:
    """`figures` (from `evaluate_variant` without a meter) completed with latency and energy measured
    round-robin across all the variants, each with the runtime it deploys on."""
    predictors = {v.name: load_predictor(v.artifact.path, v.artifact.format, cfg.eval.threads,
                                         device=cfg.eval.device) for v in variants}
    measured = measure_round_robin(cfg, predictors, timing_inputs(cfg), meter)
    return [f.model_copy(update=measured[v.name]) for v, f in zip(variants, figures, strict=True)]


def metered_gpus(cfg: PipelineConfig, stage: str, step=None) -> list[int] | None:
    """The CUDA ordinals a stage computes on, for its energy meter (None: every visible GPU): "train" (one rank
    per visible GPU, or CPU ranks), "compress" (`step`: cuda:0 if it computes there), "evaluate" (eval.device).
    A meter over GPUs a stage leaves idle would charge their idle draw to CPU-only work."""
    if stage == "train":
        from wattflow.distributed import check_device
        return None if check_device(cfg) == "cuda" else []
    if stage == "compress":
        return [0] if step is not None and step.uses_cuda() else []
    if stage == "evaluate":
        return [0] if cfg.eval.device == "cuda" else []
    raise ValueError(f"unknown stage {stage!r}; allowed: 'train', 'compress', 'evaluate'")


# torchao on CUDA: each load re-quantizes and torch.compile may choose other kernels (split-K, autotuned tile
# sizes) with another summation order, so two loads agree to float rounding, not bit for bit.
TORCHAO_CUDA_TOLERANCE = (1e-3, 1e-4)   # (rtol, atol) on the scores


def deployable_tolerance(variant: StageResult, device: str) -> tuple[float, float] | None:
    """None where the deployable must predict bit for bit as the variant; (rtol, atol) for torchao on CUDA."""
    backend = str(variant.params.get("backend", ""))
    if not backend.startswith("torchao-"):
        return None
    from wattflow.compress.torchao_backend import device_for
    return TORCHAO_CUDA_TOLERANCE if device_for(backend, device).type == "cuda" else None


def evaluate_variant(cfg: PipelineConfig, variant: StageResult, deploy_dir: Path,
                     meter: EnergyMeter | None = None) -> VariantFigures:
    """Test accuracy, every size definition and the deployable artifact (checked to predict as the variant),
    with the runtime the variant deploys on, one thread (cfg.eval.threads); with a `meter`, also latency per
    batch size and energy per inference. Without one they are left out, for `measure_variants` to measure
    round-robin across every variant."""
    workload = workload_for(cfg)
    test = workload.splits.test
    art = variant.artifact
    if sha256_file(art.path) != art.sha256:
        raise ValueError(f"{art.path} changed since its stage wrote it (sha256 mismatch)")
    predict = load_predictor(art.path, art.format, cfg.eval.threads, device=cfg.eval.device)
    scores = workload.score(predict, test)
    measured = measure_round_robin(cfg, {variant.name: predict}, timing_inputs(cfg), meter)[variant.name] \
        if meter is not None else {}
    sizes = size_metrics(art.path, art.format)
    deploy_path, deploy_format, deploy_bytes = deployable_artifact(art.path, art.format, deploy_dir)
    identical = check = None
    if deploy_path != art.path:  # another file ships (a .wfp): it must give the variant's outputs
        deployed = load_predictor(deploy_path, deploy_format, cfg.eval.threads, device=cfg.eval.device)
        tolerance = deployable_tolerance(variant, cfg.eval.device)
        check = "exact" if tolerance is None else f"allclose rtol={tolerance[0]:g} atol={tolerance[1]:g}"
        identical = all(np.array_equal(deployed(xb), predict(xb)) if tolerance is None
                        else np.allclose(deployed(xb), predict(xb), rtol=tolerance[0], atol=tolerance[1])
                        for xb, _ in batches(test, 512))
    return VariantFigures(scores=scores, test_samples=len(test), **measured,
                          param_count=sizes["param_count"], nonzero_params=sizes["nonzero_params"],
                          dense_bytes=sizes["dense_bytes"], size_bytes=sizes["file_bytes"],
                          size_lzma_bytes=sizes["lzma_bytes"], deployable_bytes=deploy_bytes,
                          deployable_path=deploy_path, deployable_runtime=deploy_format,
                          deployable_identical=identical, deployable_check=check, eval_device=cfg.eval.device,
                          tokens_per_sample=workload.meta().get("tokens_per_sample"))
