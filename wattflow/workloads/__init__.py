"""Workloads: everything that is specific to a model and its data, behind one interface that every stage uses
(training, pruning, distillation, quantization, evaluation, registration).

    workload = workload_for(cfg)        # the entry of WORKLOADS named by cfg.workload, for this recipe
    workload.splits                     # train / val / test Datasets, sample shape and dtype, classes
    workload.model_spec()               # the trained model's spec (a built-in or the user's factory)
    workload.loss(output, target)       # what training and fine-tuning minimise
    workload.score(predict, dataset)    # the metrics, primary first ("accuracy" for classification)
    workload.keep_layers(model)         # modules pruning never touches (the classifier head by default)

Add a workload: a new file here with a `Workload` subclass decorated `@WORKLOADS.register("name")`, and its
import at the bottom of this file.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from wattflow.config import PipelineConfig
from wattflow.data import Splits, first_samples, splits_for
from wattflow.models import build_model
from wattflow.plugins import ImportPathError, Registry

WORKLOADS: Registry = Registry("workload")


class WorkloadError(ValueError):
    """A model or dataset that does not fit the workload; the message names the field and the fix."""


class Workload:
    """The base of every workload: data from `cfg.data`, models from `cfg.train` / `cfg.distill`."""

    name = "base"
    primary_metric = "accuracy"
    higher_is_better = True
    budget_metric = "accuracy"  # what select's budget limits: "accuracy" (points) or "perplexity" (percent)

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg

    @property
    def splits(self) -> Splits:
        return splits_for(self.cfg.data)  # cached there, per configuration and file stamp: new data is seen

    # What every stage records with a model, so that deployment feeds it what it was trained on.
    def meta(self) -> dict[str, Any]:
        s = self.splits
        return {"workload": self.name, "input_shape": list(s.input_shape), "input_dtype": s.input_dtype,
                "num_classes": s.num_classes, "preprocessing": s.preprocessing}

    def example_inputs(self, n: int = 2) -> np.ndarray:
        """n real test inputs [n, *input_shape] (tracing, ONNX export, signatures, latency batches)."""
        return first_samples(self.splits.test, n)

    def dataset_record(self, context: str) -> dict[str, Any]:
        """What MLflow's dataset tracking records of the data (`Tracker.log_input`)."""
        s = self.splits
        return {**s.identity, "shape": list(s.input_shape), "dtype": s.input_dtype, "context": context}

    @property
    def registered_model_name(self) -> str:
        """One registered model per experiment and dataset (`<experiment>-<dataset name>`: wattflow-digits by
        default), so that two workloads never move each other's aliases."""
        return self.cfg.select.model_name or f"{self.cfg.experiment}-{self.splits.identity.get('name', 'model')}"

    def model_spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def student_spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, output, target):
        raise NotImplementedError

    def score(self, predict, dataset) -> dict[str, float]:
        raise NotImplementedError

    def keep_layers(self, model: nn.Module) -> list[nn.Module]:
        return []

    def check(self) -> None:
        """Everything that can fail about the data and the model, now, before any expensive work."""

    def models_on_example(self) -> list[tuple[str, torch.Tensor, Any]]:
        """(config field, example batch, output) of each model the recipe builds (the trained one; the student
        when a chain distills), run on 2 real samples. WorkloadError naming the field when one cannot be built
        or fails on the data: the workload's `check` then judges the outputs."""
        fields = [("train.model", self.model_spec)]
        if any(st.kind == "distill" for c in self.cfg.chains for st in c.steps):
            fields.append(("distill.student_model", self.student_spec))
        ran = []
        for field, spec_of in fields:
            try:
                model = build_model(spec_of())
            except ImportPathError as err:
                raise WorkloadError(str(err)) from None
            except (TypeError, ValueError) as err:
                raise WorkloadError(f"{field}: the model cannot be built ({type(err).__name__}: {err})") from None
            x = torch.from_numpy(self.example_inputs(2))
            try:
                with torch.inference_mode():
                    out = model.eval()(x)
            except Exception as err:  # the user's forward: any error is a mismatch with the data
                raise WorkloadError(f"{field}: the model fails on a batch of the data (shape {list(x.shape)}, "
                                    f"{x.dtype}): {type(err).__name__}: {err}") from None
            ran.append((field, x, out))
        return ran

    def sample(self, checkpoint: str) -> str | None:
        """A short example of what the model at `checkpoint` produces, for the report (None: nothing to show)."""
        return None


@lru_cache(maxsize=8)
def _workload(cfg_json: str) -> Workload:
    cfg = PipelineConfig.model_validate_json(cfg_json)
    return WORKLOADS.get(cfg.workload)(cfg)


def workload_for(cfg: PipelineConfig) -> Workload:
    return _workload(cfg.model_dump_json())


def check_workload(cfg: PipelineConfig) -> Workload:
    """Load the data and build the model now: a bad file, factory or output shape fails in seconds."""
    workload = workload_for(cfg)
    workload.check()
    model = build_model(workload.model_spec())
    kept = workload.keep_layers(model)
    for chain in cfg.chains:
        for step in chain.steps:
            try:
                step.check(model, kept)
            except ValueError as err:
                raise WorkloadError(str(err)) from None
    return workload


from wattflow.workloads import classification, language_model  # noqa: E402,F401  (each registers itself)
