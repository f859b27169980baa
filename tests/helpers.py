"""Shared test helpers: a model trained just enough to make accuracies meaningful, trained once per test run."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from per_run import made_once_per_run
from torch import nn

from wattflow.data import load_splits
from wattflow.models import atomic_write, build_model, default_spec


def fit(model: nn.Module, steps: int = 400, lr: float = 3e-3, seed: int | None = 0) -> nn.Module:
    """Adam on the digits train split, batch 64 (torch pruning masks, if any, stay applied).
    seed=None continues the current random stream."""
    if seed is not None:
        torch.manual_seed(seed)
    train = load_splits().train
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def model_accuracy(model: nn.Module, split) -> float:
    """Top-1 accuracy of a torch model on an in-memory split, in one batch."""
    with torch.inference_mode():
        return float((model.eval()(torch.from_numpy(split.x)).argmax(1).numpy() == split.y).mean())


_TRAINED: dict[str, dict] = {}  # this worker's copies of the run's trainings


def train_briefly(kind_or_spec: str | dict, steps: int = 400, seed: int = 0) -> nn.Module:
    """A freshly initialised model (seeded) after a few hundred steps: > 0.9 test accuracy on digits. Trained
    once per test run for each (spec, steps, seed); every call returns its own copy."""
    spec = default_spec(kind_or_spec) if isinstance(kind_or_spec, str) else kind_or_spec
    key = json.dumps([spec, steps, seed], sort_keys=True)
    if key not in _TRAINED:
        def train(path: Path) -> None:
            torch.manual_seed(seed)  # one stream for the initial weights and then the batches
            state = fit(build_model(spec), steps, seed=None).state_dict()
            atomic_write(path, lambda tmp: torch.save(state, tmp))

        name = f"briefly-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
        _TRAINED[key] = torch.load(made_once_per_run(name, train), weights_only=True)
    model = build_model(spec)
    model.load_state_dict(copy.deepcopy(_TRAINED[key]))
    return model.eval()
