"""From the recipe's chains to the steps to run: each unique prefix once, parents before children.

    chains "prune:0.8", "prune:0.8 -> onnx-int8-static", "prune:0.8 -> bf16"
    -> prune-0.8 (from train), prune-0.8+onnx-int8-static (from prune-0.8), prune-0.8+bf16 (from prune-0.8)
"""

from __future__ import annotations

from dataclasses import dataclass

from wattflow.config import ChainConfig
from wattflow.steps import Step


@dataclass(frozen=True)
class PlannedStep:
    key: tuple[str, ...]  # step labels from the trained model to this variant
    step: Step

    @property
    def name(self) -> str:
        return "+".join(self.key)

    @property
    def parent(self) -> tuple[str, ...]:
        """The key of this step's input; () is the trained model."""
        return self.key[:-1]


def plan(chains: list[ChainConfig]) -> list[PlannedStep]:
    planned: dict[tuple[str, ...], PlannedStep] = {}
    for chain in chains:
        key: tuple[str, ...] = ()
        for step in chain.steps:
            key = (*key, step.label())
            existing = planned.get(key)
            if existing is not None and existing.step != step:
                raise ValueError(f"two different steps share the label {'+'.join(key)!r}")
            planned.setdefault(key, PlannedStep(key, step))
    return list(planned.values())  # insertion order already puts every parent before its children
