"""Quantization, the front of the backends registry (`wattflow.compress.backends`): ONNX Runtime int8 (static
and dynamic), a plain bf16 cast, weight-only grids ("int8-weights", "kmeans-4bit", stored as codes by
`wattflow.compress.pack`), and torchao ("torchao-int8-dynamic" on CPU or CUDA, "torchao-int8-weight-only" and
"torchao-fp8" on CUDA only). All on maintained paths: `torch.ao.quantization` is deprecated.

    art = quantize_checkpoint("model.pt", "onnx-int8-static", "out/", calibration_x=x_train[:256])
    art.path, art.format  # "out/model.int8-static.onnx", "onnx"
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wattflow.compress.backends import QUANT_BACKENDS, BackendUnavailable, QuantizedArtifact
from wattflow.compress.backends.onnx_int8 import ONNX_INPUT, ONNX_OUTPUT, export_onnx

BACKENDS: tuple[str, ...] = tuple(QUANT_BACKENDS.names())
__all__ = ["BACKENDS", "ONNX_INPUT", "ONNX_OUTPUT", "BackendUnavailable", "QuantizedArtifact", "backend_available",
           "export_onnx", "quantize_checkpoint"]


def backend_available(backend: str) -> tuple[bool, str]:
    """(True, note) when `backend` can run here, else (False, reason)."""
    if backend not in QUANT_BACKENDS:
        return False, f"unknown quantization backend {backend!r}; allowed: {', '.join(BACKENDS)}"
    return QUANT_BACKENDS.get(backend).available()


def quantize_checkpoint(ckpt_path, backend: str, out_dir, calibration_x: np.ndarray | None) -> QuantizedArtifact:
    """Quantize the checkpoint at `ckpt_path` into `out_dir` (file named `<stem><backend suffix>`).

    `calibration_x` (float32 [N, *input_shape]) is required by "onnx-int8-static"; for the other backends it is
    optional and only measures agreement with the source model for the note."""
    ok, reason = backend_available(backend)
    if not ok:
        raise BackendUnavailable(reason)
    entry = QUANT_BACKENDS.get(backend)
    out_path = Path(out_dir) / (Path(ckpt_path).stem + entry.suffix)
    return entry.quantize(Path(ckpt_path), out_path, calibration_x, reason)
