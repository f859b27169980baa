"""Quantization backends for CPU deployment, built on maintained paths only (`torch.ao.quantization` is
deprecated): ONNX Runtime int8 (static and dynamic), a plain bf16 cast, and weight-only grids
("int8-weights", "kmeans-4bit": float32 checkpoints whose weights lie on a grid recorded in meta, which
`wattflow.compress.pack` stores as codes), and torchao ("torchao-int8-dynamic" on CPU or CUDA,
"torchao-int8-weight-only" and "torchao-fp8" on CUDA only: see `wattflow.compress.torchao_backend`; stored as
the float32 checkpoint plus meta {"torchao": config}, re-applied at load time).

    art = quantize_checkpoint("model.pt", "onnx-int8-static", "out/", calibration_x=x_train[:256])
    art.path, art.format  # "out/model.int8-static.onnx", "onnx"

Static int8 probes four ONNX Runtime layouts (QOperator/QDQ x per-tensor/per-channel) and keeps the
smallest file whose top-1 predictions on the calibration set still agree with fp32 (within
AGREEMENT_TOLERANCE of the best layout). onnx/onnxruntime are imported lazily, so this module imports
(and `backend_available` answers) on a machine without them.
"""

from __future__ import annotations

import copy
import logging
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from torch import nn

from wattflow.compress import torchao_backend
from wattflow.compress.weights import snap_int8, snap_kmeans
from wattflow.config import QuantBackend
from wattflow.models import (
    TORCH_EXPORT_LOCK,
    atomic_write,
    input_signature,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
)

ONNX_INPUT = "x"
ONNX_OUTPUT = "logits"
BACKENDS: tuple[str, ...] = get_args(QuantBackend)
AGREEMENT_TOLERANCE = 0.005  # share of calibration samples a smaller layout may flip vs the best one
CALIBRATION_BATCH = 64
_SUFFIX = {"onnx-int8-static": ".int8-static.onnx", "onnx-int8-dynamic": ".int8-dynamic.onnx",
           "bf16": ".bf16.pt", "int8-weights": ".int8w.pt", "kmeans-4bit": ".kmeans4.pt",
           "torchao-int8-dynamic": ".torchao-int8dyn.pt", "torchao-int8-weight-only": ".torchao-int8wo.pt",
           "torchao-fp8": ".torchao-fp8.pt"}
# backend -> (snap the float32 model in place and return its meta, what the note says)
_WEIGHT_GRIDS = {
    "int8-weights": (snap_int8, "per-channel symmetric int8 weights; biases fp32"),
    "kmeans-4bit": (lambda m: snap_kmeans(m, bits=4),
                    "per-layer k-means weight sharing: 15 shared values + exact zero (4-bit codes), "
                    "no fine-tune; biases fp32"),
}


class BackendUnavailable(RuntimeError):
    """The backend is unknown or cannot run on this machine; the message says why."""


@dataclass(frozen=True)
class QuantizedArtifact:
    path: str
    format: str  # "onnx" | "torch"
    backend: str
    note: str = ""


def backend_available(backend: str) -> tuple[bool, str]:
    """(True, note) when `backend` can run here, else (False, reason)."""
    if backend not in BACKENDS:
        return False, f"unknown quantization backend {backend!r}; allowed: {', '.join(BACKENDS)}"
    if backend == "bf16":
        return True, ("native bf16 instructions" if _cpu_has_bf16()
                      else "no native bf16 on this CPU: emulated, slow")
    if backend in _WEIGHT_GRIDS:
        return True, "plain torch"
    if backend in torchao_backend.TORCHAO_BACKENDS:
        return torchao_backend.available(backend)
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxruntime.quantization  # noqa: F401
        import onnxscript  # noqa: F401  (the torch.onnx dynamo exporter needs it)
    except ImportError as err:
        return False, f"{backend} needs onnx, onnxscript and onnxruntime: {err}"
    if "CPUExecutionProvider" not in onnxruntime.get_available_providers():
        return False, "onnxruntime has no CPUExecutionProvider"
    return True, f"onnxruntime {onnxruntime.__version__}"


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


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
        with warnings.catch_warnings(), TORCH_EXPORT_LOCK:
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(model, example, None, input_names=[ONNX_INPUT],
                                        output_names=[ONNX_OUTPUT], dynamic_shapes=({0: batch},),
                                        dynamo=True, verbose=False)
    finally:
        reg_log.setLevel(level)
    proto = _tidy(program.model_proto)
    atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))


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


def quantize_checkpoint(ckpt_path, backend: str, out_dir,
                        calibration_x: np.ndarray | None) -> QuantizedArtifact:
    """Quantize the checkpoint at `ckpt_path` into `out_dir` (file named `<stem><backend suffix>`).

    `calibration_x` (float32 [N, *input_shape]) is required by "onnx-int8-static"; for
    "onnx-int8-dynamic", "int8-weights" and "kmeans-4bit" it is optional and only measures agreement
    with the source model for the note."""
    ok, reason = backend_available(backend)
    if not ok:
        raise BackendUnavailable(reason)
    out_path = Path(out_dir) / (Path(ckpt_path).stem + _SUFFIX[backend])
    model, spec, meta = load_checkpoint(ckpt_path)
    if backend == "bf16":
        meta = {**meta, "quantized": "bf16", "source_sha256": sha256_file(ckpt_path)}
        save_checkpoint(out_path, model.to(torch.bfloat16), spec, meta)
        return QuantizedArtifact(str(out_path), "torch", backend, reason)
    if backend in _WEIGHT_GRIDS:
        return _snap_weights(ckpt_path, backend, out_path, calibration_x)
    if backend in torchao_backend.TORCHAO_BACKENDS:
        return _torchao(ckpt_path, backend, out_path, calibration_x, reason)

    shape, dtype = input_signature(spec, meta)
    if calibration_x is not None:
        calibration_x = np.ascontiguousarray(calibration_x, dtype=np.float32)
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


def _snap_weights(ckpt_path, backend: str, out_path: Path, calibration_x: np.ndarray | None
                  ) -> QuantizedArtifact:
    source, spec, meta = load_checkpoint(ckpt_path)
    model = copy.deepcopy(source).float()  # the grids are float32 values, whatever the source dtype
    snap, note = _WEIGHT_GRIDS[backend]
    meta = {**meta, **snap(model), "quantized": backend, "source_sha256": sha256_file(ckpt_path)}
    save_checkpoint(out_path, model, spec, meta)
    if calibration_x is not None:
        x = torch.from_numpy(np.ascontiguousarray(calibration_x, dtype=np.float32))
        with torch.inference_mode():
            agree = (source(x.to(next(source.parameters()).dtype)).argmax(1) == model(x).argmax(1))
        note += f"; top-1 agreement with the source {float(agree.float().mean()):.4f} on {len(x)} samples"
    return QuantizedArtifact(str(out_path), "torch", backend, note)


def _torchao(ckpt_path, backend: str, out_path: Path, calibration_x: np.ndarray | None, where: str
             ) -> QuantizedArtifact:
    """The float32 checkpoint plus meta {"torchao": config}: a quantized torchao module holds tensor
    subclasses that only a pickle of code could restore, so the config is re-applied at load time
    (`wattflow.evaluate.load_predictor`). Quantizing here checks that it applies and measures agreement."""
    source, spec, meta = load_checkpoint(ckpt_path)
    source = source.float()
    entry = torchao_backend.TORCHAO_BACKENDS[backend]
    meta = {**meta, "quantized": backend, "torchao": entry.config, "source_sha256": sha256_file(ckpt_path)}
    save_checkpoint(out_path, source, spec, meta)
    quantized, layers = torchao_backend.quantize_model(copy.deepcopy(source), backend)
    note = (f"{entry.note}; {layers} Linear layer(s) quantized by torchao {entry.config} at load time "
            f"({where}); the file holds the fp32 weights, so its size figures are fp32 sizes")
    if calibration_x is not None:
        x = torch.from_numpy(np.ascontiguousarray(calibration_x, dtype=np.float32))
        device = torchao_backend.device_for(backend)
        with torch.inference_mode():
            agree = source(x).argmax(1) == quantized(x.to(device)).argmax(1).cpu()
        note += f"; top-1 agreement with the source {float(agree.float().mean()):.4f} on {len(x)} samples (eager)"
    return QuantizedArtifact(str(out_path), "torch", backend, note)


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
    """Top-1 classes from ONNX Runtime's CPU provider; also proves the file runs there."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0].argmax(axis=1)


class _CalibrationReader:
    """Feeds calibration batches to quantize_static (duck-types onnxruntime's CalibrationDataReader)."""

    def __init__(self, x: np.ndarray):
        starts = range(0, len(x), CALIBRATION_BATCH)
        self._batches = iter([{ONNX_INPUT: x[i:i + CALIBRATION_BATCH]} for i in starts])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)
