"""NVIDIA GPUs: which ones this process uses, read through Zeus (`zeus.device.gpu.nvidia.NVIDIAGPU`).

Zeus reads the energy counter and instantaneous power (see `gpu`). wattflow keeps, through pynvml, what Zeus
(0.16.0) lacks: UUIDs and CUDA_VISIBLE_DEVICES given as UUIDs (Zeus accepts integer indices only), MIG
(Zeus refuses MIG devices; here a MIG device names its parent GPU, reported unavailable with the reason: NVML's
figures cover the whole GPU, shared by its instances), and the GPU's running processes for contention.
Devices are identified by UUID and chosen as CUDA would under CUDA_VISIBLE_DEVICES. Labels: "measured:nvml"
(counter) and "measured:nvml-power" (power integral); "simulated:…" on FakeNvml.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable

from wattflow.energy.gpu import DEFAULT_SAMPLE_PERIOD_S, Gpu, GpuBackend, probe, used_gpus
from wattflow.energy.meter import EnergyUnavailableError

_MIG_ENABLE = 1             # NVML_DEVICE_MIG_ENABLE

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


def _mig_reason(nvml, handle) -> str:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except (nvml.NVMLError, AttributeError):
        return ""  # no MIG on this GPU (pre-Ampere) or in this nvidia-ml-py
    if current != _MIG_ENABLE:
        return ""
    return ("MIG mode is enabled: NVML's energy and power cover the whole GPU, shared by all its MIG "
            "instances, so this process's share cannot be measured")


def _open(reader: Callable[[int], object], index: int, unavailable: str) -> tuple[object, str]:
    """(Zeus's reader of GPU `index`, why the GPU gives no figure: "" when it can)."""
    if unavailable:
        return None, unavailable
    try:
        return reader(index), ""
    except Exception as e:  # one GPU Zeus cannot open must not take the meter (and the stage) down
        return None, f"Zeus could not open this GPU: {type(e).__name__}: {e}"


def _zeus_gpu(index: int):
    from zeus.device.gpu.nvidia import NVIDIAGPU
    return NVIDIAGPU(index)


class NvmlBackend(GpuBackend):
    """The NVIDIA GPUs this process may use (see the module docstring).

    `nvml` defaults to the real `pynvml` module, and `zeus_gpu(index)` to Zeus's `NVIDIAGPU`, which reads each
    GPU; pass a `FakeNvml` (with `simulated=True`) in tests, which also stands in for Zeus (`FakeNvml.zeus_gpu`)
    unless `zeus_gpu` is given. `cuda_ordinals`: only the GPUs a stage runs on (None: every visible one).
    Raises `EnergyUnavailableError` when NVML is missing or does not initialise.
    """

    def __init__(self, nvml=None, simulated: bool = False, sample_period_s: float = DEFAULT_SAMPLE_PERIOD_S,
                 clock: Callable[[], float] = time.monotonic, zeus_gpu: Callable[[int], object] | None = None,
                 cuda_ordinals: list[int] | None = None):
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError as e:
                raise EnergyUnavailableError("NVML: nvidia-ml-py (module pynvml) is not installed") from e
        self._nvml = nvml
        reader = zeus_gpu or getattr(nvml, "zeus_gpu", _zeus_gpu)
        try:
            _ensure_init(nvml)
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
        except nvml.NVMLError as e:
            raise EnergyUnavailableError(f"NVML did not initialise: {e}") from e
        self.visible_env = os.environ.get("CUDA_VISIBLE_DEVICES")
        migs = mig_parents(nvml, handles) if self.visible_env and "MIG-" in self.visible_env else {}
        visible = [Gpu(f"gpu:{i} {uuids[i]}", i, uuids[i], None)
                   for i in visible_indices(uuids, self.visible_env, migs)]
        devices = [probe(g.label, g.index, g.uuid, *_open(reader, g.index, _mig_reason(nvml, handles[g.index])))
                   for g in used_gpus(visible, cuda_ordinals)]
        self.visible_count = len(visible)
        self._handles = {g.index: handles[g.index] for g in devices}
        prefix = "simulated" if simulated else "measured"
        super().__init__("nvml", devices, f"{prefix}:nvml", f"{prefix}:nvml-power", self._processes,
                         sample_period_s, clock)

    cannot_tell_why = ("NVML listed process ids that do not exist here (a container without the host's PID "
                       "namespace?), or this driver cannot list them")

    def _processes(self, gpu: Gpu) -> set[int] | None:
        nvml, handle = self._nvml, self._handles[gpu.index]
        try:
            running = (nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                       + nvml.nvmlDeviceGetGraphicsRunningProcesses(handle))
        except (nvml.NVMLError, getattr(nvml, "NVMLLibraryMismatchError", AttributeError),
                AttributeError):  # an old driver's process query is not an NVMLError in nvidia-ml-py
            return None  # cannot tell on this GPU
        return {p.pid for p in running}
