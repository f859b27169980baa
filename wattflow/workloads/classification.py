"""Classification: samples of any shape (flat vectors, [C, H, W] images) to one of `num_classes` classes.
Loss: cross-entropy. Metric: top-1 accuracy (logged as `accuracy`), higher is better. The classifier head is
found by tracing which layer produces the model's output, and is never pruned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wattflow.config import FactoryRef
from wattflow.data import DataError, batches
from wattflow.models import PRUNABLE, output_layer
from wattflow.workloads import WORKLOADS, Workload, WorkloadError
from wattflow.zoo import MODELS


def builtin_kwargs(name: str, cfg_kwargs: dict[str, Any], legacy: dict[str, Any]) -> dict[str, Any]:
    """A built-in's keyword arguments: the recipe's legacy fields for mlp/cnn, overridden by model_kwargs."""
    defaults = {"mlp": {"hidden": legacy["mlp_hidden"]},
                "cnn": {"channels": legacy["cnn_channels"], "hidden": legacy["cnn_hidden"]}}.get(name, {})
    return {**defaults, **cfg_kwargs}


# Scoring batch: large enough to keep the runtimes busy, small enough that activations stay a few MB (a conv net
# on 32x32 RGB images at batch 512 held ~150 MB more per rank than at 128, measured by the bench's scale row).
SCORE_BATCH = 128


@WORKLOADS.register("classification")
class Classification(Workload):
    name = "classification"
    primary_metric = "accuracy"
    higher_is_better = True

    def _spec(self, ref: str | FactoryRef, kwargs: dict[str, Any], legacy: dict[str, Any]) -> dict[str, Any]:
        s = self.splits
        if isinstance(ref, FactoryRef):
            return {"factory": ref.factory, "kwargs": dict(ref.kwargs),
                    "path": str(Path(ref.path).resolve()) if ref.path else None}
        return MODELS.get(ref).spec(list(s.input_shape), s.num_classes, **builtin_kwargs(ref, kwargs, legacy))

    def model_spec(self) -> dict[str, Any]:
        t = self.cfg.train
        return self._spec(t.model, t.model_kwargs, {"mlp_hidden": t.mlp_hidden, "cnn_channels": t.cnn_channels,
                                                      "cnn_hidden": t.cnn_hidden})

    def student_spec(self) -> dict[str, Any]:
        d = self.cfg.distill
        return self._spec(d.student_model, d.student_model_kwargs,
                          {"mlp_hidden": d.student_mlp_hidden, "cnn_channels": d.student_cnn_channels,
                           "cnn_hidden": d.student_cnn_hidden})

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def score(self, predict, dataset) -> dict[str, float]:
        """Top-1 accuracy of `predict` (numpy in, class scores out) over `dataset`, batch by batch."""
        correct = total = 0
        for xb, yb in batches(dataset, SCORE_BATCH):
            correct += int((predict(xb).argmax(axis=1) == yb).sum())
            total += len(yb)
        return {"accuracy": correct / total}

    def keep_layers(self, model: nn.Module) -> list[nn.Module]:
        names = self.cfg.train.keep_layers
        if names is not None:
            modules = dict(model.named_modules())
            missing = [n for n in names if n not in modules]
            if missing:
                raise WorkloadError(f"train.keep_layers names {missing}, which the model does not have; its layers: "
                                    f"{[n for n, m in modules.items() if isinstance(m, PRUNABLE)]}")
            return [modules[n] for n in names]
        head = output_layer(model, torch.from_numpy(self.example_inputs(2)).to(next(model.parameters()).dtype))
        return [head] if head is not None else []

    def check(self) -> None:
        s = self.splits  # DataError for a bad file or folder
        for field, _, out in self.models_on_example():
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, s.num_classes):
                got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise WorkloadError(f"{field}: the model maps a batch of 2 samples to {got}, but the data has "
                                    f"{s.num_classes} classes: it must return class scores [N, {s.num_classes}]")
        if not np.issubdtype(np.dtype(s.input_dtype), np.floating):
            raise DataError(f"classification takes float inputs; the data gives {s.input_dtype}")
