"""Measured energy, honest about how: every figure carries a method label; unknown is None, never 0.

    meter = make_meter(cfg.energy)
    with meter.window("train") as w:
        run_training()
    w.result.to_dict()   # per-device joules, duration, average watts, method, flags; scope in words

Modules: meter (windows), result (records, combine_nodes); backends: gpu (GPUs through Zeus, with nvml for
NVIDIA and amd for AMD), soc (Apple Silicon and Jetson through Zeus), rapl and cputime (wattflow's own);
fake_nvml (tests), poller (background readers), contention (foreign GPU processes), carbon and units.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from wattflow.energy import rapl
from wattflow.energy.amd import AmdBackend
from wattflow.energy.carbon import carbon_g, co2e_g
from wattflow.energy.cputime import CpuTimeBackend
from wattflow.energy.fake_nvml import FakeNvml
from wattflow.energy.gpu import GpuBackend
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
from wattflow.energy.soc import SocBackend
from wattflow.energy.units import j_to_kwh, mj_to_j, uj_to_j

if TYPE_CHECKING:
    from wattflow.config import EnergyConfig

__all__ = [
    "BELOW_RESOLUTION", "CONTENDED", "COUNTER_RESET", "AmdBackend", "Backend", "CpuTimeBackend", "DeviceEnergy",
    "EnergyMeter", "EnergyResult", "EnergyUnavailableError", "FakeNvml", "GpuBackend", "NvmlBackend", "RaplBackend",
    "Resolution", "SocBackend", "Window",
    "carbon_g", "co2e_g", "combine_nodes", "j_to_kwh", "make_meter", "mj_to_j", "uj_to_j",
]


def _cpu_backend(cfg: EnergyConfig, notes: list[str]) -> Backend:
    ok, reason = RaplBackend.available(rapl.DEFAULT_ROOT)
    if ok:
        return RaplBackend(rapl.DEFAULT_ROOT, cfg.rapl_poll_period_s)
    notes.append(f"{reason}; CPU energy is estimated from CPU time")
    return CpuTimeBackend(cfg.cpu_watts_per_core)


def _no_gpu(backend: GpuBackend) -> str:
    return f"{backend.name}: no GPU visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"


def _not_used(backend: GpuBackend) -> str:
    return (f"{backend.name}: {backend.visible_count} GPU(s) not metered: this stage does not run on them, so their "
            "idle draw is not charged to it")


def _gpus_or_note(backend: GpuBackend, notes: list[str]) -> list[Backend]:
    if not backend.devices:
        notes.append(_not_used(backend) if backend.visible_count else _no_gpu(backend))
        return []
    # Unmeasurable GPUs stay in the meter: their figures say "unavailable" and why, rather than vanishing.
    notes.extend(_cannot_measure(backend))
    return [backend]


def _cannot_measure(backend: GpuBackend) -> list[str]:
    return [f"{backend.name}: cannot measure {backend.unmeasurable}"] if backend.unmeasurable else []


def _explicit_gpus(backend: GpuBackend) -> EnergyMeter:
    if not backend.visible_count:
        raise EnergyUnavailableError(_no_gpu(backend))
    if not backend.devices:  # a stage on the CPU only: nothing this backend meters is in use
        return EnergyMeter([], notes=(_not_used(backend),))
    if not backend.methods:
        raise EnergyUnavailableError(*_cannot_measure(backend))
    return EnergyMeter([backend], notes=tuple(_cannot_measure(backend)))


def _auto(cfg: EnergyConfig, gpus: list[int] | None) -> EnergyMeter:
    """NVIDIA GPUs, else AMD GPUs, each with the CPU; else a whole-chip SoC reading; else the CPU alone."""
    notes: list[str] = []
    for vendor in (NvmlBackend, AmdBackend):
        try:
            backend = vendor(sample_period_s=cfg.power_sample_period_s, cuda_ordinals=gpus)
        except EnergyUnavailableError as e:
            notes.append(str(e))
            continue
        if backend.visible_count:
            return EnergyMeter([*_gpus_or_note(backend, notes), _cpu_backend(cfg, notes)], notes=tuple(notes))
        notes.append(_no_gpu(backend))
    try:
        return EnergyMeter([SocBackend()], notes=tuple(notes))
    except EnergyUnavailableError as e:
        notes.append(str(e))
    return EnergyMeter([_cpu_backend(cfg, notes)], notes=tuple(notes))


def make_meter(cfg: EnergyConfig, gpus: list[int] | None = None) -> EnergyMeter:
    """The meter for `cfg.backend` over the GPUs a stage runs on: `gpus` are CUDA ordinals (None: every visible
    GPU; []: none, a CPU-only stage, which is then not charged the idle draw of the GPUs beside it). Explicit
    backends raise `EnergyUnavailableError` when they cannot measure; "auto" falls back and records why in
    `meter.notes`. fake-nvml's simulated GPU is metered in every stage (it stands in for the GPU path end to end).
    """
    if cfg.backend == "auto":
        return _auto(cfg, gpus)
    if cfg.backend == "cpu-time":
        return EnergyMeter([CpuTimeBackend(cfg.cpu_watts_per_core)])
    if cfg.backend == "rapl":
        return EnergyMeter([RaplBackend(rapl.DEFAULT_ROOT, cfg.rapl_poll_period_s)])
    if cfg.backend == "nvml":
        return _explicit_gpus(NvmlBackend(sample_period_s=cfg.power_sample_period_s, cuda_ordinals=gpus))
    if cfg.backend == "amdsmi":
        return _explicit_gpus(AmdBackend(sample_period_s=cfg.power_sample_period_s, cuda_ordinals=gpus))
    if cfg.backend == "soc":
        return EnergyMeter([SocBackend()])
    if cfg.backend == "fake-nvml":
        notes: list[str] = []
        fake = NvmlBackend(FakeNvml(), simulated=True, sample_period_s=cfg.power_sample_period_s)
        return EnergyMeter([*_gpus_or_note(fake, notes), _cpu_backend(cfg, notes)], notes=tuple(notes))
    raise ValueError(f"unknown energy backend {cfg.backend!r}")
