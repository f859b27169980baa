"""Quantize backends: one file per family, each entry registered by name in `QUANT_BACKENDS`. A chain's last
step names one (`"prune:0.8 -> onnx-int8-static"`); `wattflow.compress.quantize.quantize_checkpoint` runs it.

Add a backend: a new file here with a `Backend` registered as `QUANT_BACKENDS.register("name")(Backend(...))`,
and its import below. `available()` says whether it can run on this machine (and why not: the stage is then
skipped with that reason); `quantize(ckpt_path, out_path, calibration_x, note)` writes the artifact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wattflow.plugins import Registry


class BackendUnavailable(RuntimeError):
    """The backend is unknown or cannot run on this machine; the message says why."""


@dataclass(frozen=True)
class QuantizedArtifact:
    path: str
    format: str  # "onnx" | "torch": the runtime the variant is evaluated and deployed with
    backend: str
    note: str = ""


Quantize = Callable[[Path, Path, "np.ndarray | None", str], QuantizedArtifact]


@dataclass(frozen=True)
class Backend:
    name: str
    suffix: str                                 # appended to the source checkpoint's stem
    available: Callable[[], tuple[bool, str]]   # (True, note) or (False, why not)
    quantize: Quantize                          # (source checkpoint, out path, calibration inputs, note)
    devices: tuple[str, ...] = ("cpu", "cuda")  # where its artifacts run: the eval.device values it can meet


QUANT_BACKENDS: Registry[Backend] = Registry("quantization backend")


def register(backend: Backend) -> Backend:
    return QUANT_BACKENDS.register(backend.name)(backend)


from wattflow.compress.backends import bf16, onnx_int8, torchao, weight_grids  # noqa: E402,F401  (register)
