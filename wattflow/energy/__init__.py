"""Measured energy, honest about how: every figure carries a method label; unknown is None, never 0.

    meter = make_meter(cfg.energy)
    with meter.window("train") as w:
        run_training()
    w.result.to_dict()   # per-device joules, duration, average watts, method, flags; scope in words

Modules: meter (windows), result (records, combine_nodes), nvml / rapl / cputime (backends), fake_nvml
(tests), poller (background readers), contention (foreign GPU processes), carbon and units (conversions).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wattflow.energy import rapl
from wattflow.energy.carbon import carbon_g, co2e_g
from wattflow.energy.cputime import CpuTimeBackend
from wattflow.energy.fake_nvml import FakeNvml
from wattflow.energy.meter import Backend, EnergyMeter, EnergyUnavailableError, Window
from wattflow.energy.nvml import NvmlBackend
from wattflow.energy.rapl import RaplBackend
from wattflow.energy.result import (
    BELOW_RESOLUTION,
    CONTENDED,
    COUNTER_RESET,
    DeviceEnergy,
    EnergyResult,
    Resolution,
    combine_nodes,
)
from wattflow.energy.units import j_to_kwh, mj_to_j, uj_to_j

if TYPE_CHECKING:
    from wattflow.config import EnergyConfig

__all__ = [
    "BELOW_RESOLUTION", "CONTENDED", "COUNTER_RESET", "Backend", "CpuTimeBackend", "DeviceEnergy", "EnergyMeter",
    "EnergyResult", "EnergyUnavailableError", "FakeNvml", "NvmlBackend", "RaplBackend", "Resolution", "Window",
    "carbon_g", "co2e_g", "combine_nodes", "j_to_kwh", "make_meter", "mj_to_j", "uj_to_j",
]


def _cpu_backend(cfg: EnergyConfig, notes: list[str]) -> Backend:
    ok, reason = RaplBackend.available(rapl.DEFAULT_ROOT)
    if ok:
        return RaplBackend(rapl.DEFAULT_ROOT, cfg.rapl_poll_period_s)
    notes.append(f"{reason}; CPU energy is estimated from CPU time")
    return CpuTimeBackend(cfg.cpu_watts_per_core)


def _no_gpu(backend: NvmlBackend) -> str:
    return f"NVML: no GPU visible (CUDA_VISIBLE_DEVICES={backend.visible_env!r})"


def _unmeasurable(backend: NvmlBackend) -> str:
    return "; ".join(f"{g.label}: {g.unavailable or g.power}" for g in backend.devices
                     if g.unavailable or (g.counter and g.power))


def _gpus_or_note(backend: NvmlBackend, notes: list[str]) -> list[Backend]:
    if not backend.devices:
        notes.append(_no_gpu(backend))
        return []
    if _unmeasurable(backend):
        # Kept in the meter: their figures say "unavailable" and why, rather than vanishing from the record.
        notes.append(f"NVML: cannot measure {_unmeasurable(backend)}")
    return [backend]


def make_meter(cfg: EnergyConfig) -> EnergyMeter:
    """The meter for `cfg.backend`. Explicit backends raise `EnergyUnavailableError` when they cannot
    measure; "auto" falls back and records why in `meter.notes`."""
    notes: list[str] = []
    if cfg.backend == "cpu-time":
        return EnergyMeter([CpuTimeBackend(cfg.cpu_watts_per_core)])
    if cfg.backend == "rapl":
        return EnergyMeter([RaplBackend(rapl.DEFAULT_ROOT, cfg.rapl_poll_period_s)])
    if cfg.backend == "nvml":
        backend = NvmlBackend(sample_period_s=cfg.power_sample_period_s)
        if not backend.devices:
            raise EnergyUnavailableError(_no_gpu(backend))
        if not backend.methods:
            raise EnergyUnavailableError(f"NVML: cannot measure {_unmeasurable(backend)}")
        return EnergyMeter([backend], notes=(f"NVML: cannot measure {_unmeasurable(backend)}",)
                           if _unmeasurable(backend) else ())
    if cfg.backend == "fake-nvml":
        fake = NvmlBackend(FakeNvml(), simulated=True, sample_period_s=cfg.power_sample_period_s)
        gpus = _gpus_or_note(fake, notes)
    elif cfg.backend == "auto":
        try:
            gpus = _gpus_or_note(NvmlBackend(sample_period_s=cfg.power_sample_period_s), notes)
        except EnergyUnavailableError as e:
            notes.append(str(e))
            gpus = []
    else:
        raise ValueError(f"unknown energy backend {cfg.backend!r}")
    return EnergyMeter([*gpus, _cpu_backend(cfg, notes)], notes=tuple(notes))
