"""AMD GPUs (ROCm 6.2 and later), read through Zeus (`zeus.device.gpu.amd.AMDGPUs`, over amdsmi).

Zeus chooses the GPUs (HIP_VISIBLE_DEVICES, else CUDA_VISIBLE_DEVICES, as HIP does), checks each energy
counter against power at start-up (about 0.5 s) and disables the ones it cannot trust; those windows fall back
to wattflow's power integral (see `gpu`). Labels: "measured:amdsmi" (counter) and "measured:amdsmi-power".
Zeus lists no processes per AMD GPU, so contention is not checked: every figure says it cannot tell.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from wattflow.energy.gpu import DEFAULT_SAMPLE_PERIOD_S, GpuBackend, probe
from wattflow.energy.meter import EnergyUnavailableError


def _zeus_amd_gpus() -> list:
    from zeus.device.gpu.amd import AMDGPUs, amdsmi_is_available
    from zeus.device.gpu.common import ZeusBaseGPUError
    amd_log = logging.getLogger("zeus.device.gpu.amd")
    level = amd_log.level
    amd_log.setLevel(logging.ERROR)  # on every host without ROCm Zeus warns that amdsmi cannot load: expected
    try:
        present = amdsmi_is_available()
    finally:
        amd_log.setLevel(level)
    if not present:
        raise EnergyUnavailableError("AMD SMI: amdsmi or its library (ROCm) is not available")
    try:
        return list(AMDGPUs().gpus)
    except ZeusBaseGPUError as e:
        raise EnergyUnavailableError(f"AMD SMI did not initialise: {e}") from e


def _uuid(gpu) -> str:
    try:
        from zeus.device.gpu.amd import amdsmi
        return str(amdsmi.amdsmi_get_gpu_device_uuid(gpu.handle))
    except Exception:  # any failure: the index is all we can name it by
        return f"amd-gpu-{gpu.gpu_index}"


class AmdBackend(GpuBackend):
    """The AMD GPUs this process may use. `gpus` defaults to Zeus's `AMDGPUs().gpus`; tests pass objects with
    the same methods (e.g. `FakeNvml.zeus_gpu(i)`) and `simulated=True`. Raises `EnergyUnavailableError` when
    amdsmi is missing or does not initialise."""

    cannot_tell_why = "Zeus lists no processes per AMD GPU"

    def __init__(self, gpus: list | None = None, simulated: bool = False,
                 sample_period_s: float = DEFAULT_SAMPLE_PERIOD_S, clock: Callable[[], float] = time.monotonic,
                 cuda_ordinals: list[int] | None = None):
        gpus = _zeus_amd_gpus() if gpus is None else gpus
        self.visible_count = len(gpus)
        if cuda_ordinals is not None:  # Zeus lists them in HIP's order: position is the ordinal
            gpus = [gpus[k] for k in cuda_ordinals if 0 <= k < len(gpus)]
        devices = []
        for position, gpu in enumerate(gpus):
            index = getattr(gpu, "gpu_index", position)
            uuid = _uuid(gpu) if not simulated else f"amd-gpu-{index}"
            devices.append(probe(f"gpu:{index} {uuid}", index, uuid, gpu))
        prefix = "simulated" if simulated else "measured"
        super().__init__("amdsmi", devices, f"{prefix}:amdsmi", f"{prefix}:amdsmi-power",
                         sample_period_s=sample_period_s, clock=clock)
