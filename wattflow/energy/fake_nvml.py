"""A stand-in for the `pynvml` module and for Zeus's `NVIDIAGPU` over it, so tests need no GPU. Figures read
through it are labelled "simulated".

Only the functions and constants wattflow calls exist: pynvml's for discovery, MIG and processes, and Zeus's
GPU methods for readings (`FakeNvml.zeus_gpu(index)`, raising Zeus's errors as Zeus maps NVML's). By default
each GPU draws a constant `power_w` since construction; the per-device lists below script everything else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


class _FakeLibraryMismatchError(Exception):
    """Like `pynvml.NVMLLibraryMismatchError`: not an NVMLError (old drivers, versioned process queries)."""


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
    mig: int | None = None  # a MIG device's slot on its parent GPU `index`


@dataclass
class _Value:  # the c_nvmlValue_t union; the fake fills the member its valueType names
    dVal: float = 0.0
    uiVal: int = 0


@dataclass
class _FieldValue:  # c_nvmlFieldValue_t
    fieldId: int
    timestamp: int          # µs since the epoch of the fake's clock
    nvmlReturn: int
    valueType: int = 1      # NVML_VALUE_TYPE_UNSIGNED_INT
    value: _Value = field(default_factory=_Value)
    scopeId: int = 0
    latencyUsec: int = 0


@dataclass(frozen=True)
class _Process:
    pid: int
    usedGpuMemory: int = 0


Script = list[float] | Callable[[], float] | None


def _next(script: Script, reads: int) -> float | None:
    """A scripted value: None (use the default), a list (one per read, the last repeats) or a callable."""
    if script is None:
        return None
    if callable(script):
        return script()
    return script[min(reads, len(script) - 1)]


class FakeNvml:
    """`device_count` GPUs, each drawing `power_w` since construction, timed by `clock` (seconds).

    Per-device knobs (lists indexed by NVML index):
      supported[i] = False        the energy counter is unsupported (pre-Volta)
      offset_mj[i]                added to the counter: lower it to simulate a driver reload (counter reset)
      counter_mj[i]               scripted counter in mJ: a list (one value per read, the last repeats)
                                  or a callable. NvmlBackend reads it once when built, then per window edge
      power_supported[i] = False  NVML_FI_DEV_POWER_INSTANT is unsupported
      power_mw[i]                 scripted instantaneous power in mW: a list or a callable. Read once when
                                  built, then per window edge and per sampler poll
    Set them before building the NvmlBackend: it probes counter, power and MIG mode once.
      mig_mode[i]                 None: no MIG support (Not Supported), 0: disabled, 1: enabled
      mig_uuids[i]                the UUIDs ("MIG-...") of GPU i's MIG devices (with mig_mode[i] = 1)
      processes[i], graphics_processes[i]   pids running on the GPU
      library_mismatch = True     the process queries raise NVMLLibraryMismatchError (a driver older than
                                  nvidia-ml-py's versioned query)
    `uuids` sets the UUIDs (NVML index order); `init_calls` counts nvmlInit calls.
    """

    NVMLError = _FakeNVMLError
    NVMLLibraryMismatchError = _FakeLibraryMismatchError
    NVML_SUCCESS = 0
    NVML_ERROR_UNINITIALIZED = 1
    NVML_ERROR_INVALID_ARGUMENT = 2
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NOT_FOUND = 6
    NVML_FI_DEV_POWER_INSTANT = 186
    NVML_FI_DEV_POWER_AVERAGE = 185
    NVML_POWER_SCOPE_GPU = 0
    NVML_POWER_SCOPE_MODULE = 1
    NVML_DEVICE_ARCH_KEPLER = 2
    NVML_DEVICE_ARCH_VOLTA = 5
    NVML_DEVICE_ARCH_HOPPER = 9
    NVML_VALUE_TYPE_DOUBLE = 0
    NVML_VALUE_TYPE_UNSIGNED_INT = 1
    NVML_DEVICE_MIG_ENABLE = 1

    def __init__(self, power_w: float = 50.0, device_count: int = 1,
                 clock: Callable[[], float] = time.monotonic, uuids: list[str] | None = None):
        n = device_count
        self.power_w = power_w
        self.device_count = n
        self.clock = clock
        self.uuids = list(uuids) if uuids is not None else [self._default_uuid(i) for i in range(n)]
        if len(self.uuids) != n:
            raise ValueError(f"need {n} uuids, got {len(self.uuids)}")
        self.supported = [True] * n
        self.offset_mj = [0] * n
        self.counter_mj: list[Script] = [None] * n
        self.power_supported = [True] * n
        self.power_mw: list[Script] = [None] * n
        self.mig_mode: list[int | None] = [None] * n
        self.mig_uuids: list[list[str]] = [[] for _ in range(n)]
        self.processes: list[list[int]] = [[] for _ in range(n)]
        self.graphics_processes: list[list[int]] = [[] for _ in range(n)]
        self.library_mismatch = False
        self.counter_reads = [0] * n
        self.power_reads = [0] * n
        self.init_calls = 0
        self._initialised = False
        self._t0_s = clock()

    @staticmethod
    def _default_uuid(index: int) -> str:
        return f"GPU-fa4e{index:04x}-0000-4000-8000-{index:012x}"

    def uuid(self, index: int) -> str:
        return self.uuids[index]

    def nvmlInit(self) -> None:
        self.init_calls += 1
        self._initialised = True

    def nvmlShutdown(self) -> None:
        self._initialised = False

    def _check(self, handle: _Handle | None = None) -> None:
        if not self._initialised:
            raise self.NVMLError(self.NVML_ERROR_UNINITIALIZED)
        if handle is not None and not 0 <= handle.index < self.device_count:
            raise self.NVMLError(self.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return self.device_count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._check(_Handle(index))
        return _Handle(index)

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        self._check(handle)
        return self.uuids[handle.index] if handle.mig is None else self.mig_uuids[handle.index][handle.mig]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: _Handle) -> int:
        self._check(handle)
        if self.mig_mode[handle.index] is None:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return 7  # an A100's most; the slots without an instance answer NOT_FOUND

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: _Handle, index: int) -> _Handle:
        self._check(handle)
        if not self.mig_mode[handle.index] or index >= len(self.mig_uuids[handle.index]):
            raise self.NVMLError(self.NVML_ERROR_NOT_FOUND)
        return _Handle(handle.index, mig=index)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: _Handle) -> int:
        """Energy in mJ, as NVML reports it (an integer)."""
        self._check(handle)
        i = handle.index
        if not self.supported[i]:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        scripted = _next(self.counter_mj[i], self.counter_reads[i])
        self.counter_reads[i] += 1
        if scripted is None:
            scripted = self.power_w * (self.clock() - self._t0_s) * 1000.0
        return int(scripted) + self.offset_mj[i]

    def nvmlDeviceGetArchitecture(self, handle: _Handle) -> int:
        """Hopper where the energy counter is supported, else Kepler (no counter before Volta)."""
        self._check(handle)
        return self.NVML_DEVICE_ARCH_HOPPER if self.supported[handle.index] else self.NVML_DEVICE_ARCH_KEPLER

    def nvmlDeviceGetC2cModeInfoV(self, handle: _Handle):
        self._check(handle)
        raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)  # not a Grace Hopper module

    def nvmlDeviceGetFieldValues(self, handle: _Handle, field_ids: list) -> list[_FieldValue]:
        """`field_ids`: field ids, or (field id, scope id) pairs as in nvidia-ml-py."""
        self._check(handle)
        i, now_us = handle.index, int(self.clock() * 1e6)
        values = []
        for field_id in (f[0] if isinstance(f, tuple) else f for f in field_ids):
            if field_id != self.NVML_FI_DEV_POWER_INSTANT or not self.power_supported[i]:
                values.append(_FieldValue(field_id, now_us, self.NVML_ERROR_NOT_SUPPORTED))
                continue
            scripted = _next(self.power_mw[i], self.power_reads[i])
            self.power_reads[i] += 1
            power_mw = round(self.power_w * 1000.0 if scripted is None else scripted)
            values.append(_FieldValue(field_id, now_us, self.NVML_SUCCESS, value=_Value(uiVal=power_mw)))
        return values

    def nvmlDeviceGetMigMode(self, handle: _Handle) -> list[int]:
        self._check(handle)
        mode = self.mig_mode[handle.index]
        if mode is None:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return [mode, mode]  # [current, pending]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[_Process]:
        self._check(handle)
        if self.library_mismatch:
            raise self.NVMLLibraryMismatchError("Unversioned function called and the pyNVML version does not "
                                                "match the NVML lib version")
        return [_Process(pid) for pid in self.processes[handle.index]]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: _Handle) -> list[_Process]:
        self._check(handle)
        return [_Process(pid) for pid in self.graphics_processes[handle.index]]

    def zeus_gpu(self, index: int) -> FakeZeusGpu:
        """What `zeus.device.gpu.nvidia.NVIDIAGPU(index)` is to wattflow, over this fake."""
        return FakeZeusGpu(self, index)


class FakeZeusGpu:
    """The `zeus.device.gpu.common.GPU` methods wattflow reads, as Zeus's NVIDIAGPU implements them over NVML:
    NVML errors become Zeus's (`NVIDIAGPU._exception_map`)."""

    def __init__(self, nvml: FakeNvml, index: int):
        self._nvml, self._handle = nvml, _Handle(index)

    def _call(self, fn, *args):
        from zeus.device.gpu.common import ZeusGPUUnknownError
        from zeus.device.gpu.nvidia import NVIDIAGPU
        try:
            return fn(*args)
        except _FakeNVMLError as e:
            raise NVIDIAGPU._exception_map.get(e.value, ZeusGPUUnknownError)(str(e)) from e

    def supports_get_total_energy_consumption(self) -> bool:
        return self._nvml.supported[self._handle.index]  # Zeus: architecture >= Volta

    def get_total_energy_consumption(self) -> int:
        """mJ."""
        return self._call(self._nvml.nvmlDeviceGetTotalEnergyConsumption, self._handle)

    def get_instant_power_usage(self) -> int:
        """mW."""
        def read() -> int:
            (value,) = self._nvml.nvmlDeviceGetFieldValues(self._handle, [self._nvml.NVML_FI_DEV_POWER_INSTANT])
            if value.nvmlReturn != self._nvml.NVML_SUCCESS:
                raise self._nvml.NVMLError(value.nvmlReturn)
            return value.value.uiVal
        return self._call(read)
