"""distill: train the recipe's smaller student on the step's input as teacher (`wattflow.compress.distill`);
first step of a chain only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from wattflow.steps import STEPS, Step


@STEPS.register("distill")
class DistillStep(Step):
    kind: Literal["distill"] = "distill"
    position = "first"

    @classmethod
    def claims(cls, name: str) -> bool:
        return name == "distill"

    @classmethod
    def from_token(cls, name: str, arg: str) -> dict[str, Any]:
        return {}

    def label(self) -> str:
        return "distill"

    def compact(self) -> str:
        return "distill"

    def settings(self, cfg) -> dict[str, Any]:
        return {"distill": cfg.distill.model_dump(mode="json"), "batch_size": cfg.train.batch_size,
                "seed": cfg.train.seed}

    def run(self, cfg, source, out_dir: Path, name: str):
        from wattflow.compress.distill import distill_checkpoint
        from wattflow.stages import Artifact
        from wattflow.workloads import workload_for

        d, workload = cfg.distill, workload_for(cfg)
        out = distill_checkpoint(source.artifact.path, out_dir / f"{name}.pt", workload.student_spec(),
                                 workload.splits.train, workload.splits.val, d.epochs, d.lr, d.temperature, d.alpha,
                                 cfg.train.batch_size, cfg.train.seed, expected_sha256=source.artifact.sha256,
                                 optimizer=d.optimizer)
        params = {"student": json.dumps(out.student_spec), "epochs": d.epochs, "temperature": d.temperature,
                  "alpha": d.alpha, "lr": d.lr,
                  "optimizer": d.optimizer}
        metrics = {"val_accuracy": out.val_accuracy, "student_params": out.student_params}
        return Artifact(path=out.checkpoint, format="torch", sha256=out.sha256), params, metrics
