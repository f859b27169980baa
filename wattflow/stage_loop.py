"""The pipeline's stage loop, written once: train, every step of every chain (each unique prefix once, parents
first), every variant's evaluation, then latency and energy measured round-robin across the variants.

    variants, figures, total = run_stages(cfg, BareStages(cfg, run_dir))      # plain calls, nothing tracked

The Prefect flow (`flows.pipeline`) runs the same loop with `tasks.stages.TrackedStages`, whose methods are
Prefect tasks that record each stage in MLflow; `bench.orchestration` times this loop bare against the flow.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from wattflow import stages
from wattflow.chains import PlannedStep, plan
from wattflow.config import PipelineConfig
from wattflow.energy import EnergyMeter, EnergyResult, make_meter
from wattflow.stages import StageResult, VariantFigures


class Stages(Protocol):
    """What the loop calls; each method does one stage's work (and, in the flow, tracks it)."""

    def train(self) -> StageResult: ...
    def step(self, planned: PlannedStep, source: StageResult) -> StageResult: ...
    def skip(self, planned: PlannedStep, reason: str) -> None: ...
    def evaluate(self, variant: StageResult) -> VariantFigures: ...
    def measure(self, variants: list[StageResult], figures: list[VariantFigures]) -> list[VariantFigures]: ...
    def progress(self, done: int, total: int, text: str) -> None: ...


def run_stages(cfg: PipelineConfig, runner: Stages) -> tuple[list[StageResult], list[VariantFigures], EnergyResult]:
    """Every stage of the recipe through `runner`. Returns the variants (the trained model first; a skipped
    step and the steps after it are left out), their complete figures, and the whole loop's energy."""
    steps = plan(cfg.chains)
    with make_meter(cfg.energy).window("pipeline") as total:
        trained = runner.train()
        outputs: dict[tuple[str, ...], StageResult | None] = {(): trained}
        for done, planned in enumerate(steps, start=1):
            source = outputs[planned.parent]
            ok, reason = planned.step.available(cfg) if source is not None else (False, "its input was skipped")
            if not ok:
                runner.skip(planned, reason)
            outputs[planned.key] = runner.step(planned, source) if ok else None
            runner.progress(done, 2 * len(steps) + 1, f"variants: built {planned.name}" if ok
                            else f"variants: skipped {planned.name}")
        variants = [trained, *(v for v in list(outputs.values())[1:] if v is not None)]
        figures = []
        for variant in variants:
            figures.append(runner.evaluate(variant))
            runner.progress(len(steps) + len(figures), len(steps) + len(variants),
                            f"variants: evaluated {variant.name}")
        # Latency and energy round-robin across the variants, so that drift hits all of them alike.
        figures = runner.measure(variants, figures)
    return variants, figures, total.result


class BareStages:
    """The stages as plain library calls: no Prefect, no MLflow, no cache (what a bare script does)."""

    def __init__(self, cfg: PipelineConfig, run_dir: Path, log: Callable[[str], None] = lambda _: None):
        self.cfg, self.run_dir, self.log = cfg, Path(run_dir), log

    def _meter(self, stage: str, step=None) -> EnergyMeter:
        return make_meter(self.cfg.energy, stages.metered_gpus(self.cfg, stage, step))

    def train(self) -> StageResult:
        return stages.train_stage(self.cfg, self.run_dir / "train", self._meter("train"), self.log)

    def step(self, planned: PlannedStep, source: StageResult) -> StageResult:
        return stages.step_stage(self.cfg, planned, source, self.run_dir / planned.step.kind,
                                 self._meter("compress", planned.step))

    def skip(self, planned: PlannedStep, reason: str) -> None:
        self.log(f"skipping {planned.name}: {reason}")

    def evaluate(self, variant: StageResult) -> VariantFigures:
        return stages.evaluate_variant(self.cfg, variant, self.run_dir / "deploy")

    def measure(self, variants: list[StageResult], figures: list[VariantFigures]) -> list[VariantFigures]:
        return stages.measure_variants(self.cfg, variants, figures, self._meter("evaluate"))

    def progress(self, done: int, total: int, text: str) -> None:
        pass
