"""torchao quantization backends, stored without pickling: the artifact is the ordinary float32
checkpoint plus meta {"torchao": "<config class name>"}, and `runtime` re-applies that torchao config
(deterministic: the same weights always give the same int8/fp8 tensors) when the checkpoint is loaded.
So the file loads with `torch.load(weights_only=True)` like every other checkpoint, and its size figures
are the float32 sizes: only the runtime is quantized, not the file.

    backend           torchao config                              runs on
    torchao-int8-dynamic      Int8DynamicActivationInt8WeightConfig        CPU (x86 int8 via torch.compile) or CUDA
    torchao-int8-weight-only  Int8WeightOnlyConfig                         CUDA only
    torchao-fp8               Float8DynamicActivationFloat8WeightConfig    CUDA, compute capability >= 8.9

torchao quantizes nn.Linear layers only (a CNN's convolutions stay float32). Measured on a 1-thread x86
CPU (AVX512-VNNI), torch 2.13 / torchao 0.18: int8-dynamic in eager mode is slower than fp32 eager
(CNN b256 8.2 vs 6.7 ms, MLP b256 0.95 vs 0.11 ms); under torch.compile(dynamic=True) it is 6.0 ms (CNN)
and 0.28 ms (MLP), with 5-11 s of compilation per shape family. `runtime` therefore compiles by default and
falls back to eager when compilation fails. torchao is imported lazily: it is slow to import and logs
about CUDA extensions it cannot load on CPU-only machines.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: first GPUs with fp8 tensor cores


@dataclass(frozen=True)
class TorchaoBackend:
    config: str  # class name in torchao.quantization
    needs_cuda: bool
    min_capability: tuple[int, int] | None = None
    note: str = ""


TORCHAO_BACKENDS: dict[str, TorchaoBackend] = {
    "torchao-int8-dynamic": TorchaoBackend(
        "Int8DynamicActivationInt8WeightConfig", needs_cuda=False,
        note="int8 weights (per-channel) and int8 activations quantized per batch at run time"),
    "torchao-int8-weight-only": TorchaoBackend(
        "Int8WeightOnlyConfig", needs_cuda=True, note="int8 weights, bf16/fp32 activations"),
    "torchao-fp8": TorchaoBackend(
        "Float8DynamicActivationFloat8WeightConfig", needs_cuda=True, min_capability=FP8_MIN_CAPABILITY,
        note="fp8 e4m3 weights and dynamically scaled fp8 activations (Linear layers whose in and out "
             "features are multiples of 16; others stay fp32)"),
}
_BY_CONFIG = {b.config: name for name, b in TORCHAO_BACKENDS.items()}


def backend_for_config(config: str) -> str:
    if config not in _BY_CONFIG:
        raise ValueError(f"unknown torchao config {config!r}; known: {', '.join(_BY_CONFIG)}")
    return _BY_CONFIG[config]


def available(backend: str) -> tuple[bool, str]:
    """(True, note) when the torchao `backend` can run here, else (False, reason)."""
    spec = TORCHAO_BACKENDS[backend]
    if spec.needs_cuda:
        if spec.min_capability is not None:
            major, minor = spec.min_capability
            need = f"needs a CUDA GPU with compute capability >= {major}.{minor} (Ada/Hopper)"
            if not torch.cuda.is_available():
                return False, f"{need}, found none"
            found = torch.cuda.get_device_capability(0)
            if found < spec.min_capability:
                return False, f"{need}, found {found[0]}.{found[1]} ({torch.cuda.get_device_name(0)})"
        elif not torch.cuda.is_available():
            return False, "needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        import torchao
        import torchao.quantization  # noqa: F401
    except ImportError as err:
        return False, f"{backend} needs torchao: {err}"
    device = f"CUDA {torch.cuda.get_device_name(0)}" if spec.needs_cuda else "CPU"
    return True, f"torchao {torchao.__version__} on {device}"


def device_for(backend: str, device: str = "cpu") -> torch.device:
    """Where `backend` runs when asked for `device` ("cpu" or "cuda"): cuda:0 for the CUDA-only backends."""
    return torch.device("cuda", 0) if TORCHAO_BACKENDS[backend].needs_cuda or device == "cuda" else torch.device("cpu")


def quantize_model(model: nn.Module, backend: str, device: str = "cpu") -> tuple[nn.Module, int]:
    """(model moved to the backend's device, float32, with torchao's config applied in place; number of
    Linear layers quantized). The caller checks `available` first."""
    from torchao import quantization as tq

    spec = TORCHAO_BACKENDS[backend]
    model = model.float().to(device_for(backend, device)).eval()
    if spec.min_capability is not None:  # torch._scaled_mm needs both dims divisible by 16
        def keep(m: nn.Module, _fqn: str) -> bool:
            return isinstance(m, nn.Linear) and m.in_features % 16 == 0 and m.out_features % 16 == 0
    else:
        def keep(m: nn.Module, _fqn: str) -> bool:
            return isinstance(m, nn.Linear)
    count = sum(keep(m, "") for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tq.quantize_(model, getattr(tq, spec.config)(), filter_fn=keep)
    return model, count


def runtime(model: nn.Module, config: str, input_shape: int | list[int], compile: bool = True,
            device: str = "cpu", input_dtype: torch.dtype = torch.float32) -> tuple[nn.Module | object, torch.device]:
    """(callable, device): `model` (float32, from an fp32 checkpoint) with the torchao `config` re-applied,
    wrapped in torch.compile(dynamic=True) when `compile` and warmed up on batches of 1 and 2 rows of
    `input_dtype` (token ids for a language model: int64), so
    compilation is paid here and not inside a timed or metered call. Falls back to eager (with a warning)
    when compilation fails. Raises BackendUnavailable when the backend cannot run on this machine."""
    from wattflow.compress.quantize import BackendUnavailable

    backend = backend_for_config(config)
    ok, reason = available(backend)
    if not ok:
        raise BackendUnavailable(f"{backend}: {reason}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"{backend}: device 'cuda' requested but torch sees no CUDA GPU")
    model, _ = quantize_model(model, backend, device)
    device = device_for(backend, device)
    if not compile:
        return model, device
    compiled = torch.compile(model, dynamic=True)
    try:
        with torch.inference_mode():
            for rows in (1, 2):
                shape = [input_shape] if isinstance(input_shape, int) else list(input_shape)
                compiled(torch.zeros(rows, *shape, device=device, dtype=input_dtype))
    except Exception as err:  # no C++ compiler, an inductor gap for this config...: eager still works
        log.warning("torch.compile failed for %s (%s); running it eager", backend, err)
        return model, device
    return compiled, device
