"""Measured energy, honest about how: every figure carries a method label; unknown is None, never 0.

    meter = make_meter(cfg.energy)
    with meter.window("train") as w:
        run_training()
    w.result.to_dict()   # per-device joules, duration, average watts, method
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wattflow.energy import rapl
from wattflow.energy.carbon import carbon_g
from wattflow.energy.cputime import CpuTimeBackend
from wattflow.energy.fake_nvml import FakeNvml
from wattflow.energy.meter import (
    Backend,
    DeviceEnergy,
    EnergyMeter,
    EnergyResult,
    EnergyUnavailableError,
    Window,
)
from wattflow.energy.nvml import NvmlBackend
from wattflow.energy.rapl import RaplBackend

if TYPE_CHECKING:
    from wattflow.config import EnergyConfig

__all__ = [
    "Backend", "CpuTimeBackend", "DeviceEnergy", "EnergyMeter", "EnergyResult", "EnergyUnavailableError",
    "FakeNvml", "NvmlBackend", "RaplBackend", "Window", "carbon_g", "make_meter",
]


def _cpu_backend(cfg: EnergyConfig, notes: list[str]) -> Backend:
    ok, reason = RaplBackend.available(rapl.DEFAULT_ROOT)
    if ok:
        return RaplBackend(rapl.DEFAULT_ROOT)
    notes.append(f"{reason}; CPU energy is estimated from CPU time")
    return CpuTimeBackend(cfg.cpu_watts_per_core)


def _no_gpu(backend: NvmlBackend) -> str:
    return f"NVML: no GPU visible (CUDA_VISIBLE_DEVICES={backend.visible_env!r})"


def _gpus_or_note(backend: NvmlBackend, notes: list[str]) -> list[Backend]:
    if backend.devices:
        return [backend]
    notes.append(_no_gpu(backend))
    return []


def make_meter(cfg: EnergyConfig) -> EnergyMeter:
    """The meter for `cfg.backend`. Explicit backends raise `EnergyUnavailableError` when they cannot
    measure; "auto" falls back and records why in `meter.notes`."""
    notes: list[str] = []
    if cfg.backend == "cpu-time":
        return EnergyMeter([CpuTimeBackend(cfg.cpu_watts_per_core)])
    if cfg.backend == "rapl":
        return EnergyMeter([RaplBackend(rapl.DEFAULT_ROOT)])
    if cfg.backend == "nvml":
        backend = NvmlBackend()
        if not backend.devices:
            raise EnergyUnavailableError(_no_gpu(backend))
        return EnergyMeter([backend])
    if cfg.backend == "fake-nvml":
        gpus = _gpus_or_note(NvmlBackend(FakeNvml(), simulated=True), notes)
    elif cfg.backend == "auto":
        try:
            gpus = _gpus_or_note(NvmlBackend(), notes)
        except EnergyUnavailableError as e:
            notes.append(str(e))
            gpus = []
    else:
        raise ValueError(f"unknown energy backend {cfg.backend!r}")
    return EnergyMeter([*gpus, _cpu_backend(cfg, notes)], notes=tuple(notes))
