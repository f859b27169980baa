"""prune:S (gradual global magnitude pruning to sparsity S) and channels:S (structured: remove a share S of
neurons/channels with torch-pruning), both followed by fine-tuning (`wattflow.compress.prune`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from wattflow.steps import STEPS, Step

_TOKENS = {"prune": "unstructured", "channels": "structured"}


@STEPS.register("prune")
class PruneStep(Step):
    kind: Literal["prune"] = "prune"
    method: Literal["unstructured", "structured"] = Field(
        "unstructured", description="unstructured: zero the smallest weights (global L1); structured: remove "
        "whole neurons/channels (torch-pruning), so the dense model shrinks.")
    sparsity: float = Field(gt=0.0, lt=1.0, description="Share of weights zeroed (unstructured) or of "
                            "channels removed (structured).")

    @classmethod
    def claims(cls, name: str) -> bool:
        return name in _TOKENS

    @classmethod
    def from_token(cls, name: str, arg: str) -> dict[str, Any]:
        return {"method": _TOKENS[name], "sparsity": arg or None}

    def _name(self) -> str:
        return "prune" if self.method == "unstructured" else "channels"

    def label(self) -> str:
        return f"{self._name()}-{self.sparsity:g}"

    def compact(self) -> str:
        return f"{self._name()}:{self.sparsity!r}"

    def settings(self, cfg) -> dict[str, Any]:
        return {"prune": cfg.prune.model_dump(), "batch_size": cfg.train.batch_size, "seed": cfg.train.seed,
                "keep_layers": cfg.train.keep_layers}

    def run(self, cfg, source, out_dir: Path, name: str):
        from wattflow.compress.prune import prune_checkpoint
        from wattflow.stages import Artifact, kept_layer_names
        from wattflow.workloads import workload_for

        workload = workload_for(cfg)
        out = prune_checkpoint(source.artifact.path, out_dir / f"{name}.pt", self.sparsity, workload.splits.train,
                               cfg.prune.fine_tune_epochs, cfg.prune.lr, cfg.train.batch_size, cfg.train.seed,
                               expected_sha256=source.artifact.sha256, method=self.method,
                               schedule_steps=cfg.prune.schedule_steps, layer_types=tuple(cfg.prune.layer_types),
                               keep=kept_layer_names(workload, source.artifact.path), loss_fn=workload.loss)
        params = {"target_sparsity": self.sparsity, "method": f"global-l1-{self.method}",
                  "fine_tune_epochs": cfg.prune.fine_tune_epochs, "schedule_steps": cfg.prune.schedule_steps,
                  "layer_types": ",".join(cfg.prune.layer_types)}
        metrics = {"sparsity": out.sparsity, "params_after": out.params_after,
                   **{f"sparsity.{k}": v for k, v in out.layer_sparsity.items()},
                   **{f"width.{k}": after for k, (_, after) in (out.layer_width or {}).items()}}
        return Artifact(path=out.checkpoint, format="torch", sha256=out.sha256), params, metrics
