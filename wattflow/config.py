"""Typed configuration: the one source of truth for defaults, bounds and documentation.

`PipelineConfig` is also the Prefect flow's parameter, so the Prefect UI renders these fields (with
their descriptions and bounds) as the run form. Recipes are YAML files of the same shape.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)

from wattflow.steps import STEPS, parse_step
from wattflow.steps.distill import DistillStep
from wattflow.steps.prune import PruneStep
from wattflow.steps.quantize import QuantBackend, QuantizeStep

__all__ = ["DistillStep", "PruneStep", "QuantBackend", "QuantizeStep", "parse_step"]  # re-exported


class _Section(BaseModel):
    # Unknown keys are typos in a recipe: refuse them instead of silently using a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class FactoryRef(_Section):
    """Your own code, by import path: a function called with `kwargs` (your directory on PYTHONPATH, or named
    as `path`). Importing it runs your code, by design; loading a checkpoint never does."""

    factory: str = Field(min_length=3, max_length=300, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
                         description="'package.module:function'.")
    kwargs: dict[str, Any] = Field({}, description="Keyword arguments of the factory (JSON values).")
    path: str | None = Field(None, min_length=1, max_length=4096,
                             description="A directory (or a .py file in it) put first on sys.path to import from.")


DATA_FORMATS = ("digits", "npz", "image-folder", "text")


class DataConfig(_Section):
    dataset: Literal["digits", "npz", "image-folder", "text"] | FactoryRef = Field(
        "digits", description="digits: scikit-learn's bundled 8x8 digits; npz: your samples in the .npz `path`; "
        "image-folder: `path`/<class>/<image> PNG or JPEG files; text: UTF-8 text for a language model (`path`, or "
        "the embedded CPython documentation corpus); or {factory: 'pkg.module:fn', kwargs: {...}} "
        "returning your torch Datasets (train, val, test) or one Dataset that wattflow splits, stratified.")
    path: str | None = Field(
        None, min_length=1, max_length=4096,
        description="With npz: a .npz file holding float `x` [N, features] or [N, C, H, W] and integer class "
        "labels `y` [N] (0..classes-1). With image-folder: the root folder of one sub-folder per class. With text: a "
        "UTF-8 file or a folder of .txt files (optional: default, the embedded corpus). Checked "
        "before training (wattflow.data.check_data).")
    image_size: int = Field(32, ge=4, le=1024, description="image-folder: images are resized to this square size.")
    block_size: int = Field(64, ge=2, le=4096, description="text: tokens per sample window (the model's context).")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes per rank (0: read in the "
                             "rank itself).")
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5, description="Share of samples held out for validation.")
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5, description="Share of samples held out for the test.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the stratified split.")
    augment_factor: int = Field(1, ge=1, le=64, description="Grow the train split to this many times its size "
                                "with deterministic shifted copies of its 8x8 images (val and test untouched).")

    @model_validator(mode="after")
    def _path_goes_with_files(self) -> DataConfig:
        # The files themselves are checked by wattflow.data.check_data: the config may be validated on a machine
        # (the Prefect UI, a scheduler) that does not hold the data.
        needs_path = self.dataset in ("npz", "image-folder")
        if needs_path and self.path is None:
            what = "the .npz file with arrays x and y" if self.dataset == "npz" else "the folder of class folders"
            raise ValueError(f"dataset {self.dataset} needs data.path: {what}")
        if not needs_path and self.path is not None and self.dataset != "text":
            raise ValueError(f"data.path is only read with dataset npz, image-folder or text (dataset is "
                             f"{self.dataset!r}): set one of those or remove path")
        return self


def _registered_model(v: str | FactoryRef) -> str | FactoryRef:
    if isinstance(v, str):
        from wattflow.zoo import MODELS  # the registry of built-ins (each registers itself)

        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; built-ins: {', '.join(MODELS.names())}, or "
                             "{factory: 'package.module:function', kwargs: {...}} for your own")
    return v


ModelRef = Annotated[str | FactoryRef, AfterValidator(_registered_model)]


class TrainConfig(_Section):
    model: ModelRef = Field(
        "cnn", description="A built-in (mlp, cnn, resnet: wattflow.zoo) or your own model: {factory: "
        "'package.module:function', kwargs: {...}} returning a torch.nn.Module that maps a batch of samples to "
        "class scores [N, classes].")
    model_kwargs: dict[str, Any] = Field({}, description="Keyword arguments of a built-in model (e.g. resnet: "
                                         "{depth: 20, width: 16}); they override mlp_hidden / cnn_*.")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd: Nesterov momentum 0.9; adamw: AdamW "
                                               "(betas 0.9, 0.999).")
    keep_layers: list[str] | None = Field(None, description="Names of layers (modules) pruning never touches; "
                                          "default: the classifier head, found by tracing the model's output.")
    mlp_hidden: list[int] = Field([128, 64], min_length=1, max_length=8,
                                  description="MLP hidden widths (LeNet-300-100 shape: [300, 100]).")
    cnn_channels: list[int] = Field([16, 32], min_length=1, max_length=4, description="CNN conv channels.")
    cnn_hidden: int = Field(64, ge=1, le=4096, description="CNN head width.")
    epochs: int = Field(20, ge=1, le=1000, description="Training epochs.")
    batch_size: int = Field(32, ge=1, le=65536, description="Samples per rank per step.")
    lr: float = Field(0.05, gt=0.0, le=10.0, description="Peak learning rate.")
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0, description="L2 weight decay.")
    warmup_epochs: float = Field(1.0, ge=0.0, le=100.0, description="Linear LR warm-up, then cosine decay.")
    cpu_ranks: int = Field(2, ge=1, le=64, description="Gloo ranks on a machine without a GPU.")
    threads_per_rank: int = Field(1, ge=1, le=256, description="torch intra-op threads per rank.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of initialisation and shuffling.")
    timeout_s: float = Field(3600.0, gt=0.0, le=7 * 86400.0, description="Kill the launch after this long.")
    nnodes: int = Field(1, ge=1, le=1024, description="Nodes: above 1, one train-node deployment run per node "
                        "on the work pool, joined by torchrun's c10d rendezvous; work_dir must be shared storage.")
    rdzv_host: str | None = Field(None, max_length=253, description="Host the nodes rendezvous on (the flow "
                                  "run's host serves the store); default: this host's name, 127.0.0.1 for 1 host.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: one rank per visible GPU, else cpu_ranks Gloo CPU ranks; cpu: Gloo CPU ranks "
        "even where GPUs exist; cuda: one rank per GPU, and an error before launch where there is none.")
    max_restarts: int = Field(2, ge=0, le=100, description="torchrun --max-restarts: times the worker group is "
                              "restarted after a rank dies; it resumes from the last training-state checkpoint.")
    checkpoint_every_epochs: int = Field(1, ge=1, le=1000, description="Write the resumable training state "
                                         "(model, optimizer, schedule, epoch) every this many epochs.")

    @field_validator("mlp_hidden", "cnn_channels")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if any(w < 1 or w > 4096 for w in v):
            raise ValueError(f"each width must be in [1, 4096]; got {v}")
        return v


class PruneConfig(_Section):
    """Defaults for every prune step of the chains."""

    fine_tune_epochs: int = Field(4, ge=0, le=1000, description="Fine-tuning epochs after the last pruning step.")
    schedule_steps: int = Field(3, ge=1, le=50, description="Gradual pruning: prune -> fine-tune this many times, "
                                "sparsity rising on a cubic schedule to the target.")
    lr: float = Field(0.01, gt=0.0, le=10.0, description="Fine-tuning learning rate (cosine decay).")
    layer_types: list[Literal["linear", "conv"]] = Field(["linear", "conv"], min_length=1,
                                                         description="Layer types that are pruned.")


class QuantizeConfig(_Section):
    calibration_samples: int = Field(256, ge=1, le=100_000,
                                     description="Training samples used to calibrate static int8.")


class DistillConfig(_Section):
    """Defaults for every distill step: teacher (the step's input) -> a smaller student."""

    student_model: ModelRef = Field("mlp", description="Student: a built-in name or {factory: ..., kwargs: ...}.")
    student_model_kwargs: dict[str, Any] = Field({}, description="Keyword arguments of a built-in student.")
    student_mlp_hidden: list[int] = Field([64, 32], min_length=1, max_length=8, description="Student MLP widths.")
    student_cnn_channels: list[int] = Field([8, 16], min_length=1, max_length=4, description="Student CNN channels.")
    student_cnn_hidden: int = Field(32, ge=1, le=4096, description="Student CNN head width.")
    epochs: int = Field(30, ge=1, le=1000, description="Student training epochs.")
    lr: float = Field(0.05, gt=0.0, le=10.0, description="Student learning rate (cosine schedule).")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="As train.optimizer, for the student.")
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="Softmax temperature T of the soft targets.")
    alpha: float = Field(0.7, ge=0.0, le=1.0, description="Weight of the soft (KL x T^2) loss; 1 - alpha on "
                         "the hard-label loss.")


# A chain's link: one of the step kinds registered in wattflow.steps (prune, distill, quantize), by "kind".
Step = Annotated[Union[tuple(STEPS.get(kind) for kind in STEPS.names())],  # noqa: UP007 (a runtime tuple)
                 Field(discriminator="kind")]


class ChainConfig(_Section):
    """A variant: steps applied in order to the trained model, e.g. "distill -> prune:0.9 -> int8-weights".
    Chains sharing a prefix share its work: "prune:0.8" is computed once for all chains that start with it."""

    steps: list[Step] = Field(min_length=1, max_length=8, description="The steps, applied in order.")

    @model_validator(mode="before")
    @classmethod
    def _compact(cls, data):
        if isinstance(data, str):
            return {"steps": [parse_step(t) for t in data.split("->")]}
        return data

    @field_validator("steps")
    @classmethod
    def _order(cls, steps: list) -> list:
        for i, step in enumerate(steps):
            if step.position == "last" and i != len(steps) - 1:
                raise ValueError(f"a {step.kind} step can only be the last step of a chain")
            if step.position == "first" and i != 0:
                raise ValueError(f"a {step.kind} step can only be the first step of a chain")
        return steps

    @property
    def labels(self) -> list[str]:
        return [s.label() for s in self.steps]

    @model_serializer
    def _as_compact(self) -> str:
        """Dumped in the compact form (exact: floats as repr), which is what recipes, MLflow params and the
        Prefect form show, and which parses back to an equal chain."""
        return " -> ".join(s.compact() for s in self.steps)


# The Prefect form and the server's parameter check read this schema: a chain is typed as its compact string
# (an object form {"steps": [...]} is accepted too).
ChainParameter = Annotated[ChainConfig, WithJsonSchema({
    "anyOf": [{"type": "string", "title": "chain", "examples": ["prune:0.8 -> onnx-int8-static"]},
              {"type": "object", "title": "steps", "properties": {"steps": {"type": "array"}}}],
    "description": "Steps joined by ' -> ': prune:S, channels:S (structured), distill (first only), or a "
                   "quantize backend (last only).",
})]

DEFAULT_CHAINS = ["prune:0.8", "onnx-int8-static", "bf16", "prune:0.8 -> onnx-int8-static", "prune:0.8 -> bf16"]


class EvalConfig(_Section):
    batch_sizes: list[int] = Field([1, 256], min_length=1, description="Batch sizes timed for latency.")
    repeats: int = Field(20, ge=1, le=10_000, description="Timed repeats per batch size (median kept).")
    warmup: int = Field(3, ge=0, le=1000, description="Untimed runs before timing.")
    threads: int = Field(1, ge=1, le=256, description="Inference threads.")
    device: Literal["cpu", "cuda"] = Field(
        "cpu", description="Where every variant is evaluated (accuracy, latency, energy per inference), so they "
        "compare like with like. cpu: torch and ONNX variants; torchao's CUDA-only backends are skipped with the "
        "reason. cuda: torch variants (torchao ones included) on cuda:0; ONNX variants are skipped (this "
        "onnxruntime runs on the CPU only); an error before any work where no GPU is visible.")
    energy_inferences: int = Field(20_000, ge=1, le=10**8,
                                   description="At least this many inferences inside the energy window.")
    energy_min_window_s: float = Field(
        1.0, ge=0.0, le=3600.0,
        description="Repeat batches until the energy windows last at least this long in all, well above the "
        "counters' resolution and update period.")
    rounds: int = Field(5, ge=1, le=100, description="Latency and energy are measured in this many rounds (each "
                        "its share of repeats, inferences and window); each figure is the median over rounds with "
                        "its 95% interval (bootstrap), and the champion must beat the others beyond it.")

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b < 1 or b > 65536 for b in v):
            raise ValueError(f"each batch size must be in [1, 65536]; got {v}")
        return v


class EnergyConfig(_Section):
    backend: Literal["auto", "nvml", "amdsmi", "soc", "rapl", "cpu-time", "fake-nvml"] = Field(
        "auto", description="auto: NVIDIA (nvml) or AMD (amdsmi) GPUs through Zeus, plus RAPL for the CPU when "
        "readable, else the CPU-time estimate; on Apple Silicon or Jetson the whole chip (soc, through Zeus). "
        "fake-nvml: a simulated GPU for tests, labelled 'simulated'.")
    cpu_watts_per_core: float = Field(
        3.5, gt=0.0, le=1000.0,
        description="Watts per fully busy core for the CPU-time estimate (default: Cloud Carbon Footprint's "
        "AWS average max watts per vCPU).")
    power_sample_period_s: float = Field(
        0.05, gt=0.0, le=10.0, description="GPU instantaneous-power sampling period (the second reading, used "
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


class CacheConfig(_Section):
    """Resume without retraining: stage outputs are cached on (configuration slice, input sha256, code version)."""

    enabled: bool = Field(True, description="Reuse a trained checkpoint or compressed variant whose inputs are "
                          "unchanged (its Prefect task ends Cached), instead of spending the energy again.")
    refresh: bool = Field(False, description="Recompute every stage even when a cached result exists.")
    result_storage: str | None = Field(
        None, min_length=1, max_length=500,
        description="Where cached stage results persist: a directory every worker can read, or a Prefect "
        "storage block as 'block:<type>/<name>' (e.g. block:s3-bucket/wattflow-results). Default: "
        "<work_dir>/cache.")


class TrackingConfig(_Section):
    """What goes to MLflow beyond the contract's params, metrics, tags and energy records."""

    log_models: Literal["shipped", "all"] = Field(
        "shipped", description="Which variants are logged as MLflow models (each a pyfunc, ~1 s or more): "
        "shipped = the registered champion and baseline; all = every variant. Every variant keeps its deployable "
        "file as a plain artifact on its run either way.")


# What the champion minimises among the variants within the accuracy budget.
Objective = Literal["energy_per_1k_inferences_j", "deployable_bytes", "latency_b1_ms", "latency_b256_ms"]


class SelectConfig(_Section):
    """How the champion is chosen and where it is registered."""

    model_name: str | None = Field(None, min_length=1, max_length=200,
                                   description="MLflow Model Registry name for the champion and baseline versions; "
                                   "default: <experiment>-<dataset name> (wattflow-digits for the bundled "
                                   "digits). A run whose model takes other inputs than the registered champion "
                                   "never moves its aliases.")
    accuracy_budget_points: float = Field(
        0.5, ge=0.0, le=100.0, description="Largest accuracy loss allowed vs the trained model, in absolute "
        "percentage points (0.5 = 0.005 in accuracy fraction: 97.2% -> at least 96.7%).")
    perplexity_budget_percent: float = Field(
        5.0, ge=0.0, le=1000.0, description="Language models: largest perplexity increase allowed vs the trained "
        "model, in percent (5 = perplexity at most 1.05x); used instead of accuracy_budget_points.")
    promote: Literal["always", "if-better"] = Field(
        "if-better", description="if-better: the new champion takes the 'champion' alias only if it is not worse "
        "beyond noise than the current champion version (re-evaluated in the same run) at equal or better "
        "accuracy; always: it always does.")
    objective: Objective = Field("energy_per_1k_inferences_j",
                                 description="What the champion minimises among the variants within budget.")


def _registered_workload(v: str) -> str:
    from wattflow.workloads import WORKLOADS  # the registry (each workload registers itself)

    if v not in WORKLOADS:
        raise ValueError(f"unknown workload {v!r}; allowed: {', '.join(WORKLOADS.names())}")
    return v


class PipelineConfig(_Section):
    workload: Annotated[str, AfterValidator(_registered_workload)] = Field(
        "classification", min_length=1, max_length=100,
        description="What kind of task the model solves (wattflow.workloads): classification, or "
        "language-model (next-token prediction on data.dataset: text).")
    experiment: str = Field("wattflow", min_length=1, max_length=200, description="MLflow experiment name.")
    work_dir: str = Field(".wattflow/artifacts", min_length=1,
                          description="Where checkpoints and exported models are written.")
    data: DataConfig = Field(DataConfig(), description="The dataset and its split.")
    train: TrainConfig = Field(TrainConfig(), description="Distributed training (torchrun DDP).")
    chains: list[ChainParameter] = Field(
        [ChainConfig.model_validate(c) for c in DEFAULT_CHAINS], max_length=64,
        description="Variants to build from the trained model, each a chain of steps; compact form "
        "'distill -> prune:0.9 -> int8-weights' or a list of step objects.")
    prune: PruneConfig = Field(PruneConfig(), description="Settings of every prune step.")
    quantize: QuantizeConfig = Field(QuantizeConfig(), description="Settings of every quantize step.")
    distill: DistillConfig = Field(DistillConfig(), description="Settings of every distill step.")
    eval: EvalConfig = Field(EvalConfig(), description="How every variant is evaluated.")
    energy: EnergyConfig = Field(EnergyConfig(), description="How energy is measured and turned into CO2e.")
    cache: CacheConfig = Field(CacheConfig(), description="Reuse of unchanged stages across flow runs.")
    select: SelectConfig = Field(SelectConfig(), description="How the champion is chosen and registered.")
    tracking: TrackingConfig = Field(TrackingConfig(), description="What is logged to MLflow beyond the contract.")


class ConfigError(ValueError):
    """A recipe that does not validate; the message names every bad field and its allowed range."""


def _section_keys(loc: tuple) -> list[str] | None:
    """The keys allowed where `loc` points (a section of PipelineConfig), or None when not a plain section."""
    model: type[BaseModel] = PipelineConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return list(model.model_fields)


def describe_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        # A key that is empty or holds other than word characters is quoted, so the path still names it.
        field = ".".join(str(p) if re.fullmatch(r"[\w-]+", str(p)) else repr(str(p)) for p in e["loc"]) or "(root)"
        got = repr(e.get("input"))
        got = got if len(got) <= 200 else got[:200] + "..."  # a whole section as input would drown the cause
        hint = ""
        if e["type"] == "extra_forbidden":  # a typo: name what is allowed there
            allowed = _section_keys(tuple(e["loc"][:-1]))
            hint = f"; unknown key, check its spelling (allowed: {', '.join(allowed)})" if allowed else ""
        lines.append(f"  {field}: {e['msg']} (got {got}){hint}")
    return "invalid configuration:\n" + "\n".join(lines)


def parse_config(data: dict | None) -> PipelineConfig:
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"a configuration must be a mapping of sections (data, train, ...), "
                          f"got {type(data).__name__}")
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
        raise ConfigError(f"recipe {path} does not exist or is not a file: pass the path of a YAML recipe "
                          "(see deployments/recipes/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"recipe {path} is not readable YAML ({type(err).__name__}: {err}); "
                          "fix the file (UTF-8 text, a mapping of sections such as train:, chains:)") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping, got {type(data).__name__}")
    return parse_config(data)
