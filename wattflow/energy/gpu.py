"""GPU energy read through Zeus's device layer (`zeus.device.gpu`): one backend for NVIDIA and AMD GPUs.

Zeus reads the hardware: the total-energy counter (mJ: NVML on Volta and newer, amdsmi where Zeus trusts
it) and instantaneous power (mW: NVML_FI_DEV_POWER_INSTANT, on Grace Hopper for the whole module; amdsmi's
socket power). wattflow keeps, on top, what Zeus does not do for a measurement window:

- Power integral: while any window is open, a daemon thread samples instantaneous power every
  `sample_period_s` (default 0.05 s) and integrates it by the trapezoid rule over one monotonic clock (the
  window edges sample too). It is the figure for GPUs without a usable counter, and the fallback for a window
  whose counter went down (driver reload: flagged "counter_reset") or could not be read. Zeus's own
  `PowerMonitor` polls in a separate process and keeps no per-window fallback, so this stays here. Average
  power (a 1-s moving average) is never integrated. Overhead: one power read per GPU per sample.
- Contention: at each edge and about once a second while a window is open, the GPU's processes (where the
  vendor layer lists them: `running_pids`) are compared with this process tree (see `contention`).
- Unavailable devices (MIG) and the reasons a counter or power cannot be read, found once when built.

Figures are labelled `method` ("measured:nvml", "measured:amdsmi") from the counter and `power_method`
("…-power") from the integral; unknown is None with the reason. Measure once per node around a launch.
Resolution (for the below_resolution flag): counter 1 mJ, updated about every 0.1 s; power integral 1 mJ,
updated once per sample period.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from wattflow.energy.contention import CANNOT_TELL, ForeignProcesses
from wattflow.energy.meter import UNAVAILABLE
from wattflow.energy.poller import Poller
from wattflow.energy.result import BELOW_RESOLUTION, CONTENDED, COUNTER_RESET, DeviceEnergy, Resolution
from wattflow.energy.units import mj_to_j

DEFAULT_SAMPLE_PERIOD_S = 0.05
PROCESS_CHECK_PERIOD_S = 1.0
COUNTER_RESOLUTION = Resolution(energy_j=1e-3, update_period_s=0.1)


def zeus_errors() -> tuple[type[Exception], type[Exception]]:
    """(any Zeus GPU error, Zeus's "not supported" error)."""
    from zeus.device.gpu.common import ZeusBaseGPUError, ZeusGPUNotSupportedError
    return ZeusBaseGPUError, ZeusGPUNotSupportedError


def cuda_sync() -> None:
    """Finish the kernels queued on every GPU this process has used: they belong to the window that launched
    them. Never imports torch, and never creates a CUDA context on a device this process has not touched."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    # torch.cuda.synchronize() waits for the current device only; a stage may have used others. Which devices
    # have a context is only in torch's C module (present in CUDA builds); without it, the current device.
    has_context = getattr(torch._C, "_cuda_hasPrimaryContext", None)
    if has_context is None:
        torch.cuda.synchronize()
        return
    for device in range(torch.cuda.device_count()):
        if has_context(device):
            torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Gpu:
    """One GPU as the backend sees it. `reader` is a Zeus `GPU` (or a fake with the same methods)."""

    label: str          # "gpu:<index> <uuid>"
    index: int          # the vendor library's index
    uuid: str
    reader: object
    unavailable: str = ""  # why no figure at all is possible (MIG); "" otherwise
    counter: str = ""      # why the energy counter cannot be used; "" when it can
    power: str = ""        # why instantaneous power cannot be read; "" when it can


def probe(label: str, index: int, uuid: str, reader, unavailable: str = "") -> Gpu:
    """A `Gpu` with the reasons its counter or power cannot be read, found by reading each once."""
    if unavailable:
        return Gpu(label, index, uuid, reader, unavailable, unavailable, unavailable)
    any_error, not_supported = zeus_errors()
    counter = power = ""
    try:
        if not reader.supports_get_total_energy_consumption():
            counter = ("energy counter not supported on this GPU (NVIDIA: before Volta; AMD: Zeus found it "
                       "inaccurate at start-up)")
    except any_error as e:
        counter = f"energy counter support unknown: {e}"
    try:
        reader.get_instant_power_usage()
    except not_supported:
        power = "instantaneous power (NVML_FI_DEV_POWER_INSTANT / amdsmi) not supported by this GPU or driver"
    except any_error:
        pass  # may be transient: the snapshot reports it if it persists
    return Gpu(label, index, uuid, reader, "", counter, power)


def used_gpus(devices: list[Gpu], cuda_ordinals: list[int] | None) -> list[Gpu]:
    """The GPUs a stage runs on, named by CUDA ordinal (None: every visible GPU). Matched by UUID where torch
    has CUDA (CUDA may order GPUs otherwise than NVML), else by position among the visible devices (the order
    of CUDA_VISIBLE_DEVICES, which is CUDA's)."""
    if cuda_ordinals is None:
        return devices
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        wanted = {str(torch.cuda.get_device_properties(k).uuid).removeprefix("GPU-") for k in cuda_ordinals
                  if k < torch.cuda.device_count()}
        return [g for g in devices if g.uuid.removeprefix("GPU-") in wanted]
    return [devices[k] for k in cuda_ordinals if 0 <= k < len(devices)]


@dataclass
class _Integral:
    """Running trapezoid integral of one GPU's power, from the samples taken so far."""

    joules: float = 0.0
    t_s: float | None = None    # when the last sample was read, on the backend's monotonic clock
    power_w: float = 0.0

    def add(self, t_s: float, power_w: float) -> None:
        if self.t_s is not None and t_s > self.t_s:
            self.joules += (self.power_w + power_w) / 2 * (t_s - self.t_s)
        self.t_s, self.power_w = t_s, power_w


@dataclass(frozen=True)
class _Edge:
    """One GPU at one window edge: counter in mJ and power integral in J, each or the error text."""

    counter_mj: int | str
    integral_j: float | str


@dataclass(frozen=True)
class _Snapshot:
    check: int                  # number of the process check taken at this edge
    edges: tuple[_Edge, ...]


def _no_processes(gpu: Gpu) -> set[int] | None:
    return None


class GpuBackend:
    """Energy of `devices` (see the module docstring). `running_pids(gpu)` gives the pids on a GPU, or None
    when they cannot be listed; `clock` (seconds, monotonic) times power samples and process checks."""

    kind = "gpu"
    cannot_tell_why = "its processes could not be listed"
    visible_count = 0   # GPUs of this vendor visible to the process, metered or not

    def __init__(self, name: str, devices: list[Gpu], method: str, power_method: str,
                 running_pids: Callable[[Gpu], set[int] | None] = _no_processes,
                 sample_period_s: float = DEFAULT_SAMPLE_PERIOD_S, clock: Callable[[], float] = time.monotonic):
        self.name, self.devices, self.method, self.power_method = name, devices, method, power_method
        self.power_resolution = Resolution(energy_j=1e-3, update_period_s=sample_period_s)
        self._running_pids = running_pids
        self._clock = clock
        self._any_error = zeus_errors()[0]
        self._lock = threading.Lock()
        self._integrals = [_Integral() for _ in devices]
        self._foreign = ForeignProcesses(len(devices))
        self._last_check_s = float("-inf")
        self._poller = Poller(self.poll, sample_period_s, f"wattflow-energy-{name}", on_start=self._reset)
        self._sampling = any(not g.unavailable for g in devices)  # no thread for nothing to sample

    @property
    def methods(self) -> set[str]:
        """Labels of the figures this backend gives when nothing goes wrong."""
        usable = [g for g in self.devices if not g.unavailable]
        return ({self.method for g in usable if not g.counter}
                | {self.power_method for g in usable if g.counter and not g.power})

    @property
    def unmeasurable(self) -> str:
        """Why some devices give no figure ("" when all can)."""
        return "; ".join(f"{g.label}: {g.unavailable or g.power}" for g in self.devices
                         if g.unavailable or (g.counter and g.power))

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

    def _sample(self) -> list[str]:
        """Extend every power integral by one sample; the error text per GPU ("" when it worked)."""
        errors = []
        for gpu, integral in zip(self.devices, self._integrals, strict=True):
            error = gpu.power
            if not error:
                try:
                    power_mw = gpu.reader.get_instant_power_usage()
                    integral.add(self._clock(), power_mw / 1000.0)
                except self._any_error as e:
                    error = f"power read failed: {e}"
            errors.append(error)
        return errors

    def _check_processes(self) -> int:
        self._last_check_s = self._clock()
        return self._foreign.check([set() if gpu.unavailable else self._running_pids(gpu) for gpu in self.devices])

    def poll(self) -> None:
        """One background step: a power sample per GPU, and a process check when one is due."""
        with self._lock:
            self._sample()
            if self._clock() - self._last_check_s >= PROCESS_CHECK_PERIOD_S:
                self._check_processes()

    # --- window edges ----------------------------------------------------------------------------------

    def snapshot(self) -> _Snapshot:
        cuda_sync()
        with self._lock:
            power_errors = self._sample()
            check = self._check_processes()
            edges = tuple(_Edge(self._read_counter(gpu), error or integral.joules)
                          for gpu, integral, error in zip(self.devices, self._integrals, power_errors, strict=True))
            return _Snapshot(check, edges)

    def _read_counter(self, gpu: Gpu) -> int | str:
        if gpu.counter:
            return gpu.counter
        try:
            return int(gpu.reader.get_total_energy_consumption())
        except self._any_error as e:
            return f"energy counter read failed: {e}"

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

    def _device(self, gpu: Gpu, a: _Edge, b: _Edge, duration_s: float, foreign: list[int]) -> DeviceEnergy:
        ids = {"kind": "gpu", "index": gpu.index, "uuid": gpu.uuid}
        if gpu.unavailable:
            return DeviceEnergy(gpu.label, None, UNAVAILABLE, gpu.unavailable, **ids)
        flags, notes = [], []
        if CANNOT_TELL in foreign:
            notes.append(f"cannot tell whether other processes used this GPU: {self.cannot_tell_why}")
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
    def _figure(gpu: Gpu, energy_j: float, method: str, resolution: Resolution, duration_s: float,
                flags: list[str], notes: list[str]) -> DeviceEnergy:
        if resolution.below(energy_j, duration_s):
            flags = [*flags, BELOW_RESOLUTION]
        return DeviceEnergy(gpu.label, energy_j, method, "; ".join(notes), kind="gpu", index=gpu.index,
                            uuid=gpu.uuid, flags=tuple(flags))

