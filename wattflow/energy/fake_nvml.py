"""A stand-in for the `pynvml` module: GPUs that draw a constant power, so tests need no GPU.

Only the functions `NvmlBackend` calls exist. Every figure read through it is labelled "simulated:nvml".
"""

from __future__ import annotations

import time
from dataclasses import dataclass


class _FakeNVMLError(Exception):
    """Compatible with `pynvml.NVMLError`: carries the NVML return code in `.value`."""

    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        names = {1: "Uninitialized", 2: "Invalid Argument", 3: "Not Supported"}
        return names.get(self.value, f"NVML error code {self.value}")


@dataclass(frozen=True)
class _Handle:
    index: int


class FakeNvml:
    """`device_count` GPUs, each drawing `power_w` since construction.

    Test knobs: `supported[i] = False` makes device i lack the energy counter; lowering `offset_mj[i]`
    makes its counter go backwards (as after a driver reload). `init_calls` counts nvmlInit calls.
    """

    NVMLError = _FakeNVMLError
    NVML_ERROR_UNINITIALIZED = 1
    NVML_ERROR_INVALID_ARGUMENT = 2
    NVML_ERROR_NOT_SUPPORTED = 3

    def __init__(self, power_w: float = 50.0, device_count: int = 1):
        self.power_w = power_w
        self.device_count = device_count
        self.supported = [True] * device_count
        self.offset_mj = [0] * device_count
        self.init_calls = 0
        self._initialised = False
        self._t0_s = time.monotonic()

    def uuid(self, index: int) -> str:
        return f"GPU-fa4e{index:04x}-0000-4000-8000-{index:012x}"

    def nvmlInit(self) -> None:
        self.init_calls += 1
        self._initialised = True

    def nvmlShutdown(self) -> None:
        self._initialised = False

    def _check(self) -> None:
        if not self._initialised:
            raise self.NVMLError(self.NVML_ERROR_UNINITIALIZED)

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return self.device_count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._check()
        if not 0 <= index < self.device_count:
            raise self.NVMLError(self.NVML_ERROR_INVALID_ARGUMENT)
        return _Handle(index)

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        self._check()
        return self.uuid(handle.index)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: _Handle) -> int:
        """Energy since construction in mJ, as NVML reports it (an integer)."""
        self._check()
        if not self.supported[handle.index]:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        elapsed_s = time.monotonic() - self._t0_s
        return int(self.power_w * elapsed_s * 1000.0) + self.offset_mj[handle.index]
