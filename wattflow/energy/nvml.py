"""GPU energy from NVML: the total-energy counter where the GPU has one, else integrated instantaneous power.

Counter: `nvmlDeviceGetTotalEnergyConsumption` (mJ, Volta and newer), read at the window edges after a
CUDA synchronize. Labelled "measured:nvml" ("simulated:nvml" on FakeNvml).

Power integral: while any window is open, a daemon thread samples `NVML_FI_DEV_POWER_INSTANT` (mW) every
`sample_period_s` (default 0.05 s) and integrates it by the trapezoid rule over the times it read them (one
monotonic clock; NVML's own timestamps, wall-clock or 0, only tell a cached sample read twice); the window
edges sample too. It is the figure for GPUs without the counter, and the fallback for a window
whose counter went down (driver reload: flagged "counter_reset") or could not be read, so it runs on every
GPU with the power field. Labelled "measured:nvml-power". `nvmlDeviceGetPowerUsage` is never integrated:
it is a 1-s moving average. Overhead: one field read (tens of µs) per GPU per sample, ~0.1% of one core.

Contention: the counter and the power are device-global. At each edge and about once a second while a
window is open, the GPU's compute and graphics processes are compared with this process and its
descendants (any pid once seen in that tree stays ours); others seen during a window flag it "contended" and
are named in the note. Inside a container without the host's PID namespace NVML reports host pids, which do
not exist here: such a window is not flagged but says it cannot tell.
Measure once per node around a launch, never once per rank.

A MIG-enabled GPU is reported unavailable: NVML's figures cover the whole GPU, shared by its instances.
Devices are identified by UUID and chosen as CUDA would under CUDA_VISIBLE_DEVICES.

Resolution (for the below_resolution flag): counter 1 mJ, updated about every 0.1 s; power integral
1 mJ, updated once per sample period.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from wattflow.energy.contention import CANNOT_TELL, ForeignProcesses
from wattflow.energy.meter import UNAVAILABLE, EnergyUnavailableError
from wattflow.energy.poller import Poller
from wattflow.energy.result import BELOW_RESOLUTION, CONTENDED, COUNTER_RESET, DeviceEnergy, Resolution
from wattflow.energy.units import mj_to_j

DEFAULT_SAMPLE_PERIOD_S = 0.05
PROCESS_CHECK_PERIOD_S = 1.0
COUNTER_RESOLUTION = Resolution(energy_j=1e-3, update_period_s=0.1)
_POWER_INSTANT = 186        # NVML_FI_DEV_POWER_INSTANT, for nvidia-ml-py releases that lack the name
_MIG_ENABLE = 1             # NVML_DEVICE_MIG_ENABLE
_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}

# nvmlInit once per process per NVML module (the real pynvml, or a FakeNvml in tests).
_initialised: weakref.WeakSet = weakref.WeakSet()
_init_lock = threading.Lock()


def _ensure_init(nvml) -> None:
    with _init_lock:
        if nvml not in _initialised:
            nvml.nvmlInit()
            _initialised.add(nvml)


def visible_indices(uuids: list[str], cuda_visible_devices: str | None,
                    mig_parents: dict[str, int] | None = None) -> list[int]:
    """NVML indices of the GPUs that CUDA would use under CUDA_VISIBLE_DEVICES (None: all of them).

    Entries are indices or (unique prefixes of) UUIDs; a MIG device's UUID ("MIG-...", see `mig_parents`) names
    its parent GPU, whose figures cover every instance on it. As in CUDA, the first entry that names no device
    ends the list. Indices are NVML's (PCI bus order); they match CUDA's numbering only with
    CUDA_DEVICE_ORDER=PCI_BUS_ID, so prefer UUIDs.
    """
    if cuda_visible_devices is None:
        return list(range(len(uuids)))
    chosen: list[int] = []
    for token in (t.strip() for t in cuda_visible_devices.split(",")):
        index = _resolve(token, uuids) if not token.startswith("MIG-") else _resolve_mig(token, mig_parents or {})
        if index is None:
            break
        if index not in chosen:
            chosen.append(index)
    return chosen


def _resolve(token: str, uuids: list[str]) -> int | None:
    try:
        index = int(token)
        return index if 0 <= index < len(uuids) else None
    except ValueError:
        pass
    matches = [i for i, uuid in enumerate(uuids) if token and uuid.startswith(token)]
    return matches[0] if len(matches) == 1 else None


def _resolve_mig(token: str, parents: dict[str, int]) -> int | None:
    matches = {index for mig_uuid, index in parents.items() if mig_uuid.startswith(token)}
    return matches.pop() if len(matches) == 1 else None


def mig_parents(nvml, handles: list) -> dict[str, int]:
    """MIG device UUID -> the NVML index of the GPU it is a slice of (empty where MIG is off or unsupported)."""
    parents: dict[str, int] = {}
    for index, handle in enumerate(handles):
        try:
            slots = nvml.nvmlDeviceGetMaxMigDeviceCount(handle)
        except (nvml.NVMLError, AttributeError):
            continue
        for slot in range(slots):
            try:
                parents[_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)))] = index
            except nvml.NVMLError:  # no instance in this slot
                continue
    return parents


def _text(value) -> str:
    # Older nvidia-ml-py releases return bytes.
    return value.decode() if isinstance(value, bytes) else str(value)


def _cuda_sync() -> None:
    # Queued kernels belong to the window that launched them. Never import torch or create a context here.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@dataclass(frozen=True)
class _Gpu:
    label: str          # "gpu:<nvml index> <uuid>"
    index: int          # NVML index
    uuid: str
    handle: object
    unavailable: str    # why no figure at all is possible (MIG); "" otherwise
    counter: str        # why the energy counter cannot be used; "" when it can
    power: str          # why instantaneous power cannot be read; "" when it can


@dataclass
class _Integral:
    """Running trapezoid integral of one GPU's power, from the samples taken so far."""

    joules: float = 0.0
    t_s: float | None = None    # when the last sample was read, on the backend's monotonic clock
    power_w: float = 0.0
    stamp_us: int | None = None  # NVML's timestamp of the last sample (wall clock, or 0 when the driver gives none)

    def add(self, t_s: float, power_w: float, stamp_us: int | None = None) -> None:
        """Integrate over one monotonic clock. NVML's timestamp is on another clock (and 0 on some drivers):
        mixing the two once integrates over decades, so it only tells a cached sample read again."""
        if stamp_us and stamp_us == self.stamp_us:
            return
        if self.t_s is not None and t_s > self.t_s:
            self.joules += (self.power_w + power_w) / 2 * (t_s - self.t_s)
        self.t_s, self.power_w, self.stamp_us = t_s, power_w, stamp_us


@dataclass(frozen=True)
class _Edge:
    """One GPU at one window edge: counter in mJ and power integral in J, each or the error text."""

    counter_mj: int | str
    integral_j: float | str


@dataclass(frozen=True)
class _Snapshot:
    check: int                  # number of the process check taken at this edge
    edges: tuple[_Edge, ...]


class NvmlBackend:
    """Energy of the visible GPUs (see the module docstring).

    `nvml` defaults to the real `pynvml` module; pass a `FakeNvml` (with `simulated=True`) in tests.
    `clock` (seconds) times power samples that carry no NVML timestamp, and the process checks.
    Raises `EnergyUnavailableError` when NVML is missing or does not initialise.
    """

    name = "nvml"
    kind = "gpu"

    def __init__(self, nvml=None, simulated: bool = False, sample_period_s: float = DEFAULT_SAMPLE_PERIOD_S,
                 clock: Callable[[], float] = time.monotonic):
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError as e:
                raise EnergyUnavailableError("NVML: nvidia-ml-py (module pynvml) is not installed") from e
        self._nvml = nvml
        self._clock = clock
        self.method = "simulated:nvml" if simulated else "measured:nvml"
        self.power_method = "simulated:nvml-power" if simulated else "measured:nvml-power"
        self.power_resolution = Resolution(energy_j=1e-3, update_period_s=sample_period_s)
        try:
            _ensure_init(nvml)
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
        except nvml.NVMLError as e:
            raise EnergyUnavailableError(f"NVML did not initialise: {e}") from e
        self.visible_env = os.environ.get("CUDA_VISIBLE_DEVICES")
        migs = mig_parents(nvml, handles) if self.visible_env and "MIG-" in self.visible_env else {}
        self.devices = [self._gpu(i, uuids[i], handles[i]) for i in visible_indices(uuids, self.visible_env, migs)]
        self._lock = threading.Lock()
        self._integrals = [_Integral() for _ in self.devices]
        self._foreign = ForeignProcesses(len(self.devices))
        self._last_check_s = float("-inf")
        self._poller = Poller(self.poll, sample_period_s, "wattflow-energy-nvml", on_start=self._reset)
        self._sampling = any(not g.unavailable for g in self.devices)  # no thread for nothing to sample

    # --- probing ---------------------------------------------------------------------------------------

    def _gpu(self, index: int, uuid: str, handle) -> _Gpu:
        label = f"gpu:{index} {uuid}"
        mig = self._mig_reason(handle)
        if mig:
            return _Gpu(label, index, uuid, handle, mig, mig, mig)
        return _Gpu(label, index, uuid, handle, "", self._counter_reason(handle), self._power_reason(handle))

    def _not_supported(self, e: Exception) -> bool:
        return getattr(e, "value", None) == self._nvml.NVML_ERROR_NOT_SUPPORTED

    def _mig_reason(self, handle) -> str:
        try:
            current, _pending = self._nvml.nvmlDeviceGetMigMode(handle)
        except (self._nvml.NVMLError, AttributeError):
            return ""  # no MIG on this GPU (pre-Ampere) or in this nvidia-ml-py
        if current != _MIG_ENABLE:
            return ""
        return ("MIG mode is enabled: NVML's energy and power cover the whole GPU, shared by all its MIG "
                "instances, so this process's share cannot be measured")

    def _counter_reason(self, handle) -> str:
        try:
            self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except self._nvml.NVMLError as e:
            if self._not_supported(e):
                return "energy counter not supported on this GPU (needs Volta or newer)"
            # Any other error may be transient: the snapshot reports it if it persists.
        return ""

    def _power_reason(self, handle) -> str:
        try:
            self._read_power(handle)
        except self._nvml.NVMLError as e:
            if self._not_supported(e):
                return "instantaneous power (NVML_FI_DEV_POWER_INSTANT) not supported by this GPU or driver"
        except AttributeError:
            return "this nvidia-ml-py has no nvmlDeviceGetFieldValues"
        return ""

    @property
    def methods(self) -> set[str]:
        """Labels of the figures this backend gives when nothing goes wrong."""
        usable = [g for g in self.devices if not g.unavailable]
        return ({self.method for g in usable if not g.counter}
                | {self.power_method for g in usable if g.counter and not g.power})

    # --- background sampling ---------------------------------------------------------------------------

    def acquire(self) -> None:
        if self._sampling:
            self._poller.acquire()

    def release(self) -> None:
        if self._sampling:
            self._poller.release()

    def _reset(self) -> None:
        # No samples were taken while no window was open: integrate only from the next one.
        with self._lock:
            for integral in self._integrals:
                integral.t_s = None
            self._foreign.clear()

    def _read_power(self, handle) -> tuple[float, float, int]:
        """(monotonic time s, power W, NVML's timestamp µs) of one instantaneous power sample; raises
        NVMLError."""
        field_id = getattr(self._nvml, "NVML_FI_DEV_POWER_INSTANT", _POWER_INSTANT)
        (value,) = self._nvml.nvmlDeviceGetFieldValues(handle, [field_id])
        if value.nvmlReturn != getattr(self._nvml, "NVML_SUCCESS", 0):
            raise self._nvml.NVMLError(value.nvmlReturn)
        power_mw = getattr(value.value, _VALUE_MEMBERS.get(value.valueType, "uiVal"))
        return self._clock(), power_mw / 1000.0, value.timestamp

    def _sample(self) -> list[str]:
        """Extend every power integral by one sample; the error text per GPU ("" when it worked)."""
        errors = []
        for gpu, integral in zip(self.devices, self._integrals, strict=True):
            error = gpu.power
            if not error:
                try:
                    integral.add(*self._read_power(gpu.handle))
                except self._nvml.NVMLError as e:
                    error = f"power read failed: {e}"
            errors.append(error)
        return errors

    def _running_pids(self, gpu: _Gpu) -> set[int]:
        if gpu.unavailable:
            return set()
        try:
            running = (self._nvml.nvmlDeviceGetComputeRunningProcesses(gpu.handle)
                       + self._nvml.nvmlDeviceGetGraphicsRunningProcesses(gpu.handle))
        except (self._nvml.NVMLError, getattr(self._nvml, "NVMLLibraryMismatchError", AttributeError),
                AttributeError):  # an old driver's process query is not an NVMLError in nvidia-ml-py
            return set()  # cannot tell on this GPU
        return {p.pid for p in running}

    def _check_processes(self) -> int:
        self._last_check_s = self._clock()
        return self._foreign.check([self._running_pids(gpu) for gpu in self.devices])

    def poll(self) -> None:
        """One background step: a power sample per GPU, and a process check when one is due."""
        with self._lock:
            self._sample()
            if self._clock() - self._last_check_s >= PROCESS_CHECK_PERIOD_S:
                self._check_processes()

    # --- window edges ----------------------------------------------------------------------------------

    def snapshot(self) -> _Snapshot:
        _cuda_sync()
        with self._lock:
            power_errors = self._sample()
            check = self._check_processes()
            edges = tuple(_Edge(self._read_counter(gpu), error or integral.joules)
                          for gpu, integral, error in zip(self.devices, self._integrals, power_errors, strict=True))
            return _Snapshot(check, edges)

    def _read_counter(self, gpu: _Gpu) -> int | str:
        if gpu.counter:
            return gpu.counter
        try:
            return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(gpu.handle))
        except self._nvml.NVMLError as e:
            return f"NVML read failed: {e}"

    def delta(self, start: _Snapshot, end: _Snapshot, duration_s: float) -> list[DeviceEnergy]:
        with self._lock:
            foreign = [self._foreign.seen(i, start.check, end.check) for i in range(len(self.devices))]
        return [self._device(gpu, a, b, duration_s, pids)
                for gpu, a, b, pids in zip(self.devices, start.edges, end.edges, foreign, strict=True)]

    def both_readings(self, start: _Snapshot, end: _Snapshot) -> list[tuple[str, float | None, float | None]]:
        """(device, counter J, power-integral J) per GPU over one window, for cross-checking the two
        readings (`make gpu-check`); None where a reading is unavailable or the counter went down."""
        rows = []
        for gpu, a, b in zip(self.devices, start.edges, end.edges, strict=True):
            counter = (None if isinstance(a.counter_mj, str) or isinstance(b.counter_mj, str)
                       or b.counter_mj < a.counter_mj else mj_to_j(b.counter_mj - a.counter_mj))
            integral = (None if isinstance(a.integral_j, str) or isinstance(b.integral_j, str)
                        else b.integral_j - a.integral_j)
            rows.append((gpu.label, counter, integral))
        return rows

    def _device(self, gpu: _Gpu, a: _Edge, b: _Edge, duration_s: float, foreign: list[int]) -> DeviceEnergy:
        ids = {"kind": "gpu", "index": gpu.index, "uuid": gpu.uuid}
        if gpu.unavailable:
            return DeviceEnergy(gpu.label, None, UNAVAILABLE, gpu.unavailable, **ids)
        flags, notes = [], []
        if CANNOT_TELL in foreign:
            notes.append("cannot tell whether other processes used this GPU: NVML listed process ids that do not "
                         "exist here (a container without the host's PID namespace?)")
            foreign = [pid for pid in foreign if pid != CANNOT_TELL]
        if foreign:
            flags.append(CONTENDED)
            notes.append("other processes on this GPU: pids " + ", ".join(map(str, foreign)))
        if isinstance(a.counter_mj, str) or isinstance(b.counter_mj, str):
            reason = a.counter_mj if isinstance(a.counter_mj, str) else b.counter_mj
        elif b.counter_mj < a.counter_mj:
            reason = "energy counter went down (driver reload?)"
            flags.append(COUNTER_RESET)
        else:
            return self._figure(gpu, mj_to_j(b.counter_mj - a.counter_mj), self.method, COUNTER_RESOLUTION,
                                duration_s, flags, notes)
        # The counter cannot give this window's figure: fall back to the power integral.
        if isinstance(a.integral_j, str) or isinstance(b.integral_j, str):
            why_not = a.integral_j if isinstance(a.integral_j, str) else b.integral_j
            return DeviceEnergy(gpu.label, None, UNAVAILABLE, "; ".join([reason, why_not, *notes]),
                                flags=tuple(flags), **ids)
        notes.insert(0, f"{reason}; integrated instantaneous power sampled every "
                        f"{self.power_resolution.update_period_s:g} s")
        return self._figure(gpu, max(0.0, b.integral_j - a.integral_j), self.power_method,
                            self.power_resolution, duration_s, flags, notes)

    @staticmethod
    def _figure(gpu: _Gpu, energy_j: float, method: str, resolution: Resolution, duration_s: float,
                flags: list[str], notes: list[str]) -> DeviceEnergy:
        if resolution.below(energy_j, duration_s):
            flags = [*flags, BELOW_RESOLUTION]
        return DeviceEnergy(gpu.label, energy_j, method, "; ".join(notes), kind="gpu", index=gpu.index,
                            uuid=gpu.uuid, flags=tuple(flags))
