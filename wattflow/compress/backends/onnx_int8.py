"""ONNX Runtime int8 on CPU: the model is exported once to a self-contained fp32 ONNX file (dynamic batch), then
    onnx-int8-static   quantize_static with calibration batches; probes four layouts (QOperator/QDQ x
                       per-tensor/per-channel) and keeps the smallest file whose top-1 predictions on the
                       calibration set still agree with fp32 (within AGREEMENT_TOLERANCE of the best layout)
    onnx-int8-dynamic  quantize_dynamic: int8 weights, activations quantized per batch at run time
onnx/onnxruntime are imported lazily, so this module imports (and `available` answers) without them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import tempfile
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wattflow.compress.backends import Backend, QuantizedArtifact, register
from wattflow.models import TORCH_EXPORT_LOCK, atomic_write, input_signature, load_checkpoint

ONNX_INPUT = "x"
ONNX_OUTPUT = "logits"
AGREEMENT_TOLERANCE = 0.005  # share of calibration samples a smaller layout may flip vs the best one
CALIBRATION_BATCH = 64


def available() -> tuple[bool, str]:
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxruntime.quantization  # noqa: F401
        import onnxscript  # noqa: F401  (the torch.onnx dynamo exporter needs it)
    except ImportError as err:
        return False, f"ONNX Runtime int8 needs onnx, onnxscript and onnxruntime: {err}"
    if "CPUExecutionProvider" not in onnxruntime.get_available_providers():
        return False, "onnxruntime has no CPUExecutionProvider"
    return True, f"onnxruntime {onnxruntime.__version__}"


def export_onnx(model: nn.Module, path, input_shape: int | list[int], input_dtype: torch.dtype = torch.float32
                ) -> None:
    """Write `model` as one self-contained fp32 ONNX file: input "x" [batch, *input_shape] -> "logits"
    (an int is a flat [in_features] sample)."""
    import onnx

    model = copy.deepcopy(model).float().eval()  # never change the caller's model dtype or mode
    shape = [input_shape] if isinstance(input_shape, int) else list(input_shape)
    example = (torch.zeros(2, *shape, dtype=input_dtype),)  # batch 2: a batch of 1 would be specialised as a constant
    batch = torch.export.Dim("batch")
    # The dynamo exporter logs torchvision notices and torch-internal FutureWarnings nobody can act on.
    reg_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = reg_log.level
    reg_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), TORCH_EXPORT_LOCK, _torchlib_registry_built_once():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(model, example, None, input_names=[ONNX_INPUT],
                                        output_names=[ONNX_OUTPUT], dynamic_shapes=({0: batch},),
                                        dynamo=True, verbose=False)
    finally:
        reg_log.setLevel(level)
    proto = _tidy(program.model_proto)
    atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))


@functools.cache
def _torchlib_registry(build, *args, **kwargs):
    return build(*args, **kwargs)


@contextlib.contextmanager
def _torchlib_registry_built_once():
    """torch.onnx.export rebuilds its operator registry from torchlib on every call (1.2 of the 1.9 s an export of
    the digits MLP takes here: it parses ~500 functions' source); within this block it is built once per process
    and opset. An export only reads the registry (torch adds to it only for a custom_translation_table, which
    wattflow never passes). Used under TORCH_EXPORT_LOCK; a torch without this private hook exports as before."""
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
        original = ONNXRegistry.__dict__["from_torchlib"]
    except (ImportError, KeyError):
        yield
        return
    build = original.__get__(None, ONNXRegistry)
    ONNXRegistry.from_torchlib = classmethod(lambda cls, *args, **kwargs: _torchlib_registry(build, *args, **kwargs))
    try:
        yield
    finally:
        ONNXRegistry.from_torchlib = original


def _tidy(proto):
    """Drop what ONNX Runtime does not need: the exporter's per-node metadata (stack traces with local paths:
    non-deterministic, ~7% of the file), doc strings and the value_info shape cache."""
    del proto.metadata_props[:]
    proto.doc_string = ""
    graph = proto.graph
    graph.doc_string = ""
    del graph.value_info[:]
    for item in (*graph.node, *graph.input, *graph.output, *graph.initializer):
        del item.metadata_props[:]
        item.doc_string = ""
    return proto


def quantize(backend: str, ckpt_path: Path, out_path: Path, calibration_x: np.ndarray | None, _note: str
             ) -> QuantizedArtifact:
    """`calibration_x` ([N, *input_shape] at the model's input dtype) is required by static int8; for dynamic
    int8 it only measures agreement with fp32 for the note."""
    model, spec, meta = load_checkpoint(ckpt_path)
    shape, dtype = input_signature(spec, meta)
    if calibration_x is not None:
        calibration_x = np.ascontiguousarray(calibration_x, dtype=np.float32 if dtype.is_floating_point else np.int64)
        if list(calibration_x.shape[1:]) != shape or len(calibration_x) == 0:
            raise ValueError(f"calibration_x must be [N>0, {', '.join(map(str, shape))}], got {calibration_x.shape}")
    elif backend == "onnx-int8-static":
        raise ValueError(f"onnx-int8-static needs calibration_x (float32 [N, {', '.join(map(str, shape))}])")

    with tempfile.TemporaryDirectory(prefix="wattflow-quant-") as tmp:
        fp32 = Path(tmp, "fp32.onnx")
        export_onnx(model, fp32, shape, dtype)
        pre = Path(tmp, "pre.onnx")
        _pre_process(fp32, pre)
        if backend == "onnx-int8-static":
            best, note = _static_int8(pre, Path(tmp), calibration_x)
        else:
            best, note = _dynamic_int8(pre, Path(tmp), calibration_x)
        atomic_write(out_path, lambda t: _save_tidy(best, t))
    return QuantizedArtifact(str(out_path), "onnx", backend, note)


def _pre_process(src: Path, dst: Path) -> None:
    # ORT's recommended step (shape inference + graph optimisation); it also stamps the model so that
    # quantize_* does not log "please consider pre-processing" on the root logger.
    from onnxruntime.quantization import quant_pre_process

    quant_pre_process(str(src), str(dst))


def _save_tidy(src: Path, dst) -> None:
    import onnx

    onnx.save_model(_tidy(onnx.load(str(src))), dst)


def _static_int8(pre: Path, tmp: Path, calibration_x: np.ndarray) -> tuple[Path, str]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    reference = _top1(pre, calibration_x)
    trials = []  # (file_bytes, -agreement, label, path)
    for fmt in (QuantFormat.QOperator, QuantFormat.QDQ):
        # QOperator needs uint8 activations: with int8 ones ORT CPU falls back to a ~10x slower kernel
        # (measured). QDQ keeps the int8 default; ORT fuses it into the same fast u8s8 kernels.
        act = QuantType.QUInt8 if fmt == QuantFormat.QOperator else QuantType.QInt8
        for per_channel in (False, True):
            label = f"{fmt.name} {'per-channel' if per_channel else 'per-tensor'} {act.name[1:].lower()} act"
            path = tmp / f"{fmt.name}-{per_channel}.onnx"
            quantize_static(str(pre), str(path), _CalibrationReader(calibration_x), quant_format=fmt,
                            per_channel=per_channel, activation_type=act, weight_type=QuantType.QInt8)
            agreement = float(np.mean(_top1(path, calibration_x) == reference))
            trials.append((path.stat().st_size, -agreement, label, path))
    best_agreement = -min(t[1] for t in trials)
    size, neg_agreement, label, path = min(t for t in trials if -t[1] >= best_agreement - AGREEMENT_TOLERANCE)
    note = (f"{label} int8 weights; top-1 agreement with fp32 {-neg_agreement:.4f} on "
            f"{len(calibration_x)} calibration samples (best layout {best_agreement:.4f})")
    return path, note


def _dynamic_int8(pre: Path, tmp: Path, calibration_x: np.ndarray | None) -> tuple[Path, str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = tmp / "dynamic.onnx"
    quantize_dynamic(str(pre), str(path), weight_type=QuantType.QInt8)
    note = "int8 weights, activations quantized per batch at run time"
    if calibration_x is not None:
        agreement = float(np.mean(_top1(path, calibration_x) == _top1(pre, calibration_x)))
        note += f"; top-1 agreement with fp32 {agreement:.4f} on {len(calibration_x)} samples"
    return path, note


def _top1(path: Path, x: np.ndarray) -> np.ndarray:
    """Top-1 classes (of the last axis: per sample, or per token) from ONNX Runtime's CPU provider; also proves the
    file runs there."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0].argmax(axis=-1)


class _CalibrationReader:
    """Feeds calibration batches to quantize_static (duck-types onnxruntime's CalibrationDataReader)."""

    def __init__(self, x: np.ndarray):
        starts = range(0, len(x), CALIBRATION_BATCH)
        self._batches = iter([{ONNX_INPUT: x[i:i + CALIBRATION_BATCH]} for i in starts])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


# This onnxruntime has the CPU execution provider only.
register(Backend("onnx-int8-static", ".int8-static.onnx", available, partial(quantize, "onnx-int8-static"),
                 devices=("cpu",)))
register(Backend("onnx-int8-dynamic", ".int8-dynamic.onnx", available, partial(quantize, "onnx-int8-dynamic"),
                 devices=("cpu",)))
