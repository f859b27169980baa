"""Typed configuration: the one source of truth for defaults, bounds and documentation.

`PipelineConfig` is also the Prefect flow's parameter, so the Prefect UI renders these fields (with
their descriptions and bounds) as the run form. Recipes are YAML files of the same shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

QuantBackend = Literal["onnx-int8-static", "onnx-int8-dynamic", "bf16"]


class _Section(BaseModel):
    # Unknown keys are typos in a recipe: refuse them instead of silently using a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    dataset: Literal["digits"] = Field("digits", description="Dataset: scikit-learn's bundled 8x8 digits.")
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5, description="Share of samples held out for validation.")
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5, description="Share of samples held out for the test.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the stratified split.")


class TrainConfig(_Section):
    model: Literal["mlp", "cnn"] = Field("cnn", description="Architecture from the model zoo.")
    epochs: int = Field(20, ge=1, le=1000, description="Training epochs.")
    batch_size: int = Field(32, ge=1, le=65536, description="Samples per rank per step.")
    lr: float = Field(0.05, gt=0.0, le=10.0, description="Peak learning rate (SGD, Nesterov momentum 0.9).")
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0, description="L2 weight decay.")
    warmup_epochs: float = Field(1.0, ge=0.0, le=100.0, description="Linear LR warm-up, then cosine decay.")
    cpu_ranks: int = Field(2, ge=1, le=64, description="Gloo ranks on a machine without a GPU.")
    threads_per_rank: int = Field(1, ge=1, le=256, description="torch intra-op threads per rank.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of initialisation and shuffling.")
    timeout_s: float = Field(3600.0, gt=0.0, le=7 * 86400.0, description="Kill the launch after this long.")


class PruneConfig(_Section):
    enabled: bool = Field(True, description="Run the pruning stage.")
    sparsities: list[float] = Field([0.8], min_length=1, max_length=16,
                                    description="Target global weight sparsities, each in (0, 1).")
    fine_tune_epochs: int = Field(4, ge=0, le=1000, description="Epochs of fine-tuning with masks applied.")
    lr: float = Field(0.01, gt=0.0, le=10.0, description="Fine-tuning learning rate (cosine decay).")

    @field_validator("sparsities")
    @classmethod
    def _each_in_open_unit_interval(cls, v: list[float]) -> list[float]:
        for s in v:
            if not 0.0 < s < 1.0:
                raise ValueError(f"each sparsity must be in (0, 1); got {s}")
        return v


class QuantizeConfig(_Section):
    enabled: bool = Field(True, description="Run the quantization stage.")
    backends: list[QuantBackend] = Field(["onnx-int8-static", "bf16"], min_length=1,
                                         description="Backends; one that cannot run here is skipped.")
    apply_to: Literal["baseline", "all"] = Field("all", description="Quantize the trained model only, "
                                                 "or also every pruned variant.")
    calibration_samples: int = Field(256, ge=1, le=100_000,
                                     description="Training samples used to calibrate static int8.")


class EvalConfig(_Section):
    batch_sizes: list[int] = Field([1, 256], min_length=1, description="Batch sizes timed for latency.")
    repeats: int = Field(20, ge=1, le=10_000, description="Timed repeats per batch size (median kept).")
    warmup: int = Field(3, ge=0, le=1000, description="Untimed runs before timing.")
    threads: int = Field(1, ge=1, le=256, description="Inference threads.")
    energy_inferences: int = Field(20_000, ge=1, le=10**8,
                                   description="At least this many inferences inside the energy window.")
    energy_min_window_s: float = Field(
        1.0, ge=0.0, le=3600.0,
        description="Repeat batches until the energy window lasts at least this long, well above the "
        "counters' resolution and update period.")

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b < 1 or b > 65536 for b in v):
            raise ValueError(f"each batch size must be in [1, 65536]; got {v}")
        return v


class EnergyConfig(_Section):
    backend: Literal["auto", "nvml", "rapl", "cpu-time", "fake-nvml"] = Field(
        "auto", description="auto: NVML for GPUs, plus RAPL for the CPU when readable, else the CPU-time "
        "estimate. fake-nvml: a simulated GPU for tests, labelled 'simulated'.")
    cpu_watts_per_core: float = Field(
        3.5, gt=0.0, le=1000.0,
        description="Watts per fully busy core for the CPU-time estimate (default: Cloud Carbon Footprint's "
        "AWS average max watts per vCPU).")
    power_sample_period_s: float = Field(
        0.05, gt=0.0, le=10.0, description="NVML instantaneous-power sampling period (the second reading, used "
        "where the energy counter is missing or went backwards).")
    rapl_poll_period_s: float = Field(
        1.0, gt=0.0, le=60.0, description="RAPL background read period; must be shorter than one counter wrap.")
    carbon_intensity_g_per_kwh: float = Field(
        481.0, ge=0.0, le=2000.0,
        description="Grid carbon intensity, gCO2e per kWh (default: world average for 2023, Ember Global "
        "Electricity Review 2024).")
    carbon_intensity_source: str = Field(
        "Ember Global Electricity Review 2024, world average 2023", max_length=300,
        description="Where the intensity figure comes from; recorded next to every CO2e figure.")
    pue: float = Field(1.0, ge=1.0, le=3.0, description="Data-centre power usage effectiveness (1.0: none "
                       "assumed).")


class PipelineConfig(_Section):
    experiment: str = Field("wattflow", min_length=1, max_length=200, description="MLflow experiment name.")
    work_dir: str = Field(".wattflow/artifacts", min_length=1,
                          description="Where checkpoints and exported models are written.")
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    prune: PruneConfig = PruneConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    eval: EvalConfig = EvalConfig()
    energy: EnergyConfig = EnergyConfig()


class ConfigError(ValueError):
    """A recipe that does not validate; the message names every bad field and its allowed range."""


def describe_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r})")
    return "invalid configuration:\n" + "\n".join(lines)


def parse_config(data: dict | None) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(describe_errors(err)) from None


def load_config(path: str | Path | None) -> PipelineConfig:
    """Load a YAML recipe (missing keys take their defaults); None gives the defaults."""
    if path is None:
        return PipelineConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    data = yaml.safe_load(path.read_text())
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping, got {type(data).__name__}")
    return parse_config(data)
