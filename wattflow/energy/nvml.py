"""GPU energy from NVML's total-energy counter (`nvmlDeviceGetTotalEnergyConsumption`, mJ, Volta and newer).

The counter is device-global: it counts every process on the GPU. Measure once per node around a launch,
never once per rank. Devices are identified by UUID and chosen as CUDA would under CUDA_VISIBLE_DEVICES.

A device without the counter (pre-Volta, some virtualised GPUs) is reported "unavailable" with the reason:
integrating instantaneous power in a sampling thread is not implemented yet.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from dataclasses import dataclass

from wattflow.energy.meter import UNAVAILABLE, DeviceEnergy, EnergyUnavailableError

# nvmlInit once per process per NVML module (the real pynvml, or a FakeNvml in tests).
_initialised: weakref.WeakSet = weakref.WeakSet()
_init_lock = threading.Lock()


def _ensure_init(nvml) -> None:
    with _init_lock:
        if nvml not in _initialised:
            nvml.nvmlInit()
            _initialised.add(nvml)


def visible_indices(uuids: list[str], cuda_visible_devices: str | None) -> list[int]:
    """NVML indices of the GPUs that CUDA would use under CUDA_VISIBLE_DEVICES (None: all of them).

    Entries are indices or (unique prefixes of) UUIDs. As in CUDA, the first entry that names no device
    ends the list. Indices are NVML's (PCI bus order); they match CUDA's numbering only with
    CUDA_DEVICE_ORDER=PCI_BUS_ID, so prefer UUIDs.
    """
    if cuda_visible_devices is None:
        return list(range(len(uuids)))
    chosen: list[int] = []
    for token in (t.strip() for t in cuda_visible_devices.split(",")):
        index = _resolve(token, uuids)
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
    label: str         # "gpu:<nvml index> <uuid>"
    handle: object
    unsupported: str   # why the energy counter cannot be used; "" when it can


class NvmlBackend:
    """Energy of the visible GPUs from counter readings at the window edges.

    `nvml` defaults to the real `pynvml` module; pass a `FakeNvml` (with `simulated=True`) in tests.
    Raises `EnergyUnavailableError` when NVML is missing or does not initialise.
    """

    name = "nvml"

    def __init__(self, nvml=None, simulated: bool = False):
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError as e:
                raise EnergyUnavailableError("NVML: nvidia-ml-py (module pynvml) is not installed") from e
        self._nvml = nvml
        self.method = "simulated:nvml" if simulated else "measured:nvml"
        try:
            _ensure_init(nvml)
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
        except nvml.NVMLError as e:
            raise EnergyUnavailableError(f"NVML did not initialise: {e}") from e
        self.visible_env = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.devices = [_Gpu(f"gpu:{i} {uuids[i]}", handles[i], self._probe(handles[i]))
                        for i in visible_indices(uuids, self.visible_env)]

    def _probe(self, handle) -> str:
        try:
            self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except self._nvml.NVMLError as e:
            if getattr(e, "value", None) == self._nvml.NVML_ERROR_NOT_SUPPORTED:
                return ("energy counter not supported on this GPU (needs Volta or newer); "
                        "power-sampling fallback not implemented yet")
            # Any other error may be transient: the snapshot reports it if it persists.
        return ""

    def snapshot(self) -> tuple[int | str, ...]:
        """Counter per device in mJ, or the error text of a failed read."""
        _cuda_sync()
        readings: list[int | str] = []
        for gpu in self.devices:
            if gpu.unsupported:
                readings.append(gpu.unsupported)
                continue
            try:
                readings.append(int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(gpu.handle)))
            except self._nvml.NVMLError as e:
                readings.append(f"NVML read failed: {e}")
        return tuple(readings)

    def delta(self, start, end, duration_s: float) -> list[DeviceEnergy]:
        out = []
        for gpu, start_mj, end_mj in zip(self.devices, start, end, strict=True):
            if isinstance(start_mj, str) or isinstance(end_mj, str):
                reason = start_mj if isinstance(start_mj, str) else end_mj
                out.append(DeviceEnergy(gpu.label, None, UNAVAILABLE, reason))
            elif end_mj < start_mj:
                reason = "counter went backwards (driver reload?)"
                out.append(DeviceEnergy(gpu.label, None, UNAVAILABLE, reason))
            else:
                out.append(DeviceEnergy(gpu.label, (end_mj - start_mj) / 1000.0, self.method))
        return out
