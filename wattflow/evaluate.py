"""Measure a model variant the same way whatever its runtime: accuracy, latency, size, and a fixed
workload for the caller's energy window. MLflow and Prefect stay out: the caller combines the figures.

    predict = load_predictor("out/model.int8-static.onnx", "onnx", threads=1)
    accuracy(predict, x_test, y_test); median_latency_s(predict, x_test, 1, repeats=20, warmup=3)
    size_metrics("out/model.int8-static.onnx", "onnx")

Formats: "torch" (a checkpoint), "onnx" (ONNX Runtime, CPU) and "packed" (a .wfp file from
`wattflow.compress.pack`, run in torch eager like "torch"). A checkpoint with meta {"torchao": config} runs
with that torchao quantization re-applied (compiled), on CUDA for the CUDA-only torchao backends.
"""

from __future__ import annotations

import lzma
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from wattflow.compress.pack import load_packed, read_packed
from wattflow.models import input_signature, load_checkpoint

Predictor = Callable[[np.ndarray], np.ndarray]  # inputs [N, *input_shape] -> scores float32 [N, C]
FORMATS = ("torch", "onnx", "packed")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown model format {fmt!r}; allowed: {', '.join(FORMATS)}")


def load_predictor(path, fmt: str, threads: int = 1, compile: bool = True) -> Predictor:
    """A predictor for the model at `path`. A checkpoint (or .wfp) whose meta names a torchao config is
    quantized with it here and, when `compile`, wrapped in torch.compile and warmed up (seconds per model):
    its latency is that of the real torchao runtime, not of the fp32 weights it is stored as. Raises
    `wattflow.compress.quantize.BackendUnavailable` when that runtime cannot run on this machine."""
    _check_format(fmt)
    if fmt in ("torch", "packed"):
        torch.set_num_threads(threads)  # process-wide: torch has no per-model thread pool
        model, spec, meta = load_checkpoint(path) if fmt == "torch" else load_packed(path)
        dtype = next(model.parameters()).dtype
        device = torch.device("cpu")
        if meta.get("torchao"):
            from wattflow.compress.torchao_backend import runtime

            model, device = runtime(model, str(meta["torchao"]), input_signature(spec, meta)[0], compile=compile)
            dtype = torch.float32

        def predict_torch(x: np.ndarray) -> np.ndarray:
            xb = torch.from_numpy(np.ascontiguousarray(x))
            with torch.inference_mode():
                logits = model(xb.to(device, dtype) if xb.is_floating_point() else xb.to(device))
            return logits.float().cpu().numpy()

        return predict_torch

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name

    def predict_onnx(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32 if np.issubdtype(x.dtype, np.floating) else np.int64)
        out = session.run([output_name], {input_name: x})[0]
        return out.astype(np.float32, copy=False)

    return predict_onnx


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

    A torch checkpoint is not what gets deployed: `wattflow.compress.pack.deployable_artifact` makes the
    .wfp file, whose file_bytes (fmt "packed") are the deployable size; a .wfp is already lzma-compressed.

    torch: every tensor of the checkpoint's state_dict. packed: the same tensors as they load (at the
    source dtype: a grid-coded float32 weight counts 4 bytes dense). onnx: the initializers that feed a weight or
    bias input of a compute op (Conv, Gemm, MatMul, Add and their QLinear/QGemm/Integer forms), directly
    or through a DequantizeLinear/Reshape/Transpose/Cast. Scales, zero points and shape constants are
    not parameters, so an int8 model has the same param_count as its fp32 source. A quantized weight
    is zero where it equals its zero point.
    """
    _check_format(fmt)
    data = Path(path).read_bytes()
    sizes = {"file_bytes": len(data), "lzma_bytes": len(lzma.compress(data, preset=9))}
    params = {"torch": _torch_params, "packed": _packed_params, "onnx": _onnx_params}[fmt](path)
    sizes["param_count"] = sum(int(values.size) for values, _, _ in params)
    sizes["nonzero_params"] = sum(int(np.count_nonzero(values != zp)) for values, zp, _ in params)
    sizes["dense_bytes"] = sum(nbytes for _, _, nbytes in params)
    return sizes


# Each parameter as (values, zero point broadcastable to values, stored bytes).
Param = tuple[np.ndarray, np.ndarray | int, int]


def _torch_params(path) -> list[Param]:
    return _state_params(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])


def _packed_params(path) -> list[Param]:
    return _state_params(read_packed(path)[2])


def _state_params(state: dict[str, torch.Tensor]) -> list[Param]:
    # float() is exact for bf16/fp16 (numpy has no bf16) and keeps -0.0 counted as zero.
    return [(t.float().numpy() if t.is_floating_point() else t.numpy(), 0, t.numel() * t.element_size())
            for t in state.values()]


# op type -> (input slot of a weight or bias, input slot of its zero point or None, channel axis of that zp)
_PARAM_SLOTS = {
    "Conv": ((1, None, 0), (2, None, 0)), "Gemm": ((1, None, 0), (2, None, 0)),
    "MatMul": ((0, None, 0), (1, None, 0)),
    "Add": ((0, None, 0), (1, None, 0)),  # the bias after MatMulInteger/ConvInteger
    "QLinearConv": ((3, 5, 0), (8, None, 0)), "QGemm": ((3, 5, 0), (6, None, 0)),
    "QLinearMatMul": ((3, 5, 1),), "ConvInteger": ((1, 3, 0),), "MatMulInteger": ((1, 3, 1),),
}
_PASS_THROUGH = ("Reshape", "Transpose", "Cast", "Identity", "Squeeze", "Unsqueeze")


def _onnx_params(path) -> list[Param]:
    import onnx
    from onnx import helper, numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    found: dict[str, tuple[str, int]] = {}  # initializer -> (its zero point initializer or "", channel axis)

    def trace(name: str, zp_name: str, axis: int) -> None:
        while name not in inits and name in producer:
            node = producer[name]
            if node.op_type == "DequantizeLinear":
                zp_name = node.input[2] if len(node.input) > 2 else ""
                axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
            elif node.op_type not in _PASS_THROUGH:
                return  # computed from activations: not a stored parameter
            name = node.input[0]
        if name in inits:
            found.setdefault(name, (zp_name, axis))

    for node in graph.node:
        for slot, zp_slot, axis in _PARAM_SLOTS.get(node.op_type, ()):
            if slot < len(node.input) and node.input[slot]:
                zp = node.input[zp_slot] if zp_slot is not None and zp_slot < len(node.input) else ""
                trace(node.input[slot], zp, axis)
    params: list[Param] = []
    for name, (zp_name, axis) in found.items():
        values = numpy_helper.to_array(inits[name])
        zp = numpy_helper.to_array(inits[zp_name]) if zp_name in inits else np.zeros(())
        if zp.size > 1:  # per-channel: line the zero points up with their channel axis
            shape = [1] * values.ndim
            shape[axis] = zp.size
            zp = zp.reshape(shape)
        params.append((values, zp.astype(values.dtype), int(values.nbytes)))
    return params
