"""Runtimes: how a variant's file is run, sized, deployed and logged as an MLflow model. One file each,
registered in `RUNTIMES` under the name a variant's artifact carries (`Artifact.format`: "torch", "onnx",
"packed").

Add a runtime (say TensorRT or OpenVINO): a new file here with a `Runtime` subclass decorated
`@RUNTIMES.register("name")` and its import at the bottom of this file; a quantize backend
(`wattflow/compress/backends/`) then returns artifacts of that format, and evaluation, the deployable check,
size definitions and model logging all go through it.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np

from wattflow.plugins import Registry

Predictor = Callable[[np.ndarray], np.ndarray]  # inputs [N, *input_shape] -> scores float32 [N, C]
Param = tuple[np.ndarray, np.ndarray | int, int]  # (values, zero point broadcastable to values, stored bytes)


class Runtime:
    """One way to run a model file; stateless (`runtime(name)` gives one)."""

    def predictor(self, path, threads: int = 1, compile: bool = True, device: str = "cpu") -> Predictor:
        """A function from a batch of inputs to its scores, running the model at `path` on `threads` threads on
        `device` ("cpu" or "cuda"); raises `BackendUnavailable` when this runtime cannot run there."""
        raise NotImplementedError

    def params(self, path) -> list[Param]:
        """The stored weight and bias tensors (see `wattflow.evaluate.size_metrics` for the definitions)."""
        raise NotImplementedError

    def deployable(self, path, out_dir: Path) -> tuple[str, str] | None:
        """(path, runtime) of another file written to `out_dir` that ships instead of the file at `path`, or
        None when the file itself ships (the default)."""
        return None

    def log_model(self, path) -> None:
        """Log the file as the MLflow model "model" of the active run, with a signature and an input example;
        its `predict` returns the scores as one float array."""
        raise NotImplementedError


RUNTIMES: Registry[type[Runtime]] = Registry("runtime")


def runtime(name: str) -> Runtime:
    """The runtime registered as `name`; the error names the allowed ones."""
    try:
        return RUNTIMES.get(name)()
    except KeyError as err:
        raise ValueError(err.args[0]) from None


def pip_requirements(*packages: str) -> list[str]:
    """Explicit pins: MLflow's inference takes seconds and writes a `+cpu` local version pip can't install."""
    return [f"{p}=={version(p).split('+')[0]}" for p in packages]


from wattflow.runtimes import onnx_runtime, packed, torch_eager  # noqa: E402,F401  (registration)
