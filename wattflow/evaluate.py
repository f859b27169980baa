"""Measure a model variant the same way whatever its runtime: accuracy, latency, size, and a fixed
workload for the caller's energy window. MLflow and Prefect stay out: the caller combines the figures.

    predict = load_predictor("out/model.int8-static.onnx", "onnx", threads=1)
    accuracy(predict, x_test, y_test); median_latency_s(predict, x_test, 1, repeats=20, warmup=3)
    size_metrics("out/model.int8-static.onnx", "onnx")

Formats are the runtimes of `wattflow.runtimes`: "torch" (a checkpoint), "onnx" (ONNX Runtime, CPU) and
"packed" (a .wfp file from `wattflow.compress.pack`, run in torch eager like "torch").
"""

from __future__ import annotations

import lzma
import os
import time
from pathlib import Path

import numpy as np

from wattflow.runtimes import Predictor, runtime


def load_predictor(path, fmt: str, threads: int = 1, compile: bool = True, device: str = "cpu") -> Predictor:
    """A predictor for the model at `path` run by the runtime `fmt` (`wattflow.runtimes`) on `device` ("cpu",
    or "cuda": cuda:0; a runtime that cannot run there raises BackendUnavailable). A checkpoint (or
    .wfp) whose meta names a torchao config is quantized with it here and, when `compile`, wrapped in
    torch.compile and warmed up (seconds per model): its latency is that of the real torchao runtime, not of
    the fp32 weights it is stored as. Raises `wattflow.compress.quantize.BackendUnavailable` when that runtime
    cannot run on this machine."""
    return runtime(fmt).predictor(path, threads, compile, device)


def deployable_artifact(path, fmt: str, out_dir) -> tuple[str, str, int]:
    """(path, runtime, bytes) of what would be shipped for the variant at `path`: a torch checkpoint is packed
    to `<out_dir>/<stem>.wfp` (runtime "packed"); an ONNX file or a .wfp already is the artifact."""
    shipped = runtime(fmt).deployable(path, Path(out_dir)) or (str(path), fmt)
    return shipped[0], shipped[1], os.path.getsize(shipped[0])


def accuracy(predict: Predictor, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((predict(x[i:i + batch_size]).argmax(axis=1) == y[i:i + batch_size]).sum())
    return correct / len(x)


def _batch(x: np.ndarray, batch_size: int) -> np.ndarray:
    """The first `batch_size` rows of x, tiled when x is shorter; contiguous float32 so the timed call
    pays no conversion."""
    reps = -(-batch_size // len(x))
    return np.ascontiguousarray(np.tile(x, (reps,) + (1,) * (x.ndim - 1))[:batch_size])


def median_latency_s(predict: Predictor, x: np.ndarray, batch_size: int, repeats: int, warmup: int) -> float:
    """Median wall time of one `predict` call on a batch of `batch_size` rows (seconds)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    batch = _batch(x, batch_size)
    for _ in range(warmup):
        predict(batch)
    times_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(batch)
        times_s.append(time.perf_counter() - start)
    return float(np.median(times_s))


def run_inferences(predict: Predictor, x: np.ndarray, n_inferences: int, batch_size: int = 256) -> int:
    """Run full batches until at least `n_inferences` samples are predicted; return the samples run.
    Full batches keep the per-sample cost uniform, so energy / returned count is fair."""
    batch = _batch(x, batch_size)
    done = 0
    while done < n_inferences:
        predict(batch)
        done += batch_size
    return done


def size_metrics(path, fmt: str) -> dict[str, int]:
    """Every size definition, each under its own name (compare ratios only within one name):

    param_count     elements of the weight and bias tensors
    nonzero_params  of those, elements whose real value is nonzero
    dense_bytes     bytes those tensors occupy densely at their stored dtype (int8 weights: 1 byte each)
    file_bytes      the serialized file as written
    lzma_bytes      that file lzma-compressed (preset 9): what sparsity buys once stored compressed

    A torch checkpoint is not what gets deployed: `deployable_artifact` makes the .wfp file, whose
    file_bytes (fmt "packed") are the deployable size; a .wfp is already lzma-compressed.

    Which tensors are parameters is the runtime's `params` (`wattflow.runtimes`): torch, every tensor of the
    checkpoint's state_dict; packed, the same tensors as they load; onnx, the initializers feeding a weight or
    bias input of a compute op, so an int8 model has the same param_count as its fp32 source.
    """
    params = runtime(fmt).params(path)
    data = Path(path).read_bytes()
    sizes = {"file_bytes": len(data), "lzma_bytes": len(lzma.compress(data, preset=9))}
    sizes["param_count"] = sum(int(values.size) for values, _, _ in params)
    sizes["nonzero_params"] = sum(int(np.count_nonzero(values != zp)) for values, zp, _ in params)
    sizes["dense_bytes"] = sum(nbytes for _, _, nbytes in params)
    return sizes
