"""Whole-chip energy on Apple Silicon and NVIDIA Jetson, read through Zeus (`zeus.device.soc.get_soc`).

Zeus reads cumulative counters per part of the chip (mJ): on Apple Silicon through IOReport (the
`zeus-apple-silicon` package: `pip install 'zeus[apple]'`, no root needed), on Jetson by integrating the INA3221
power rails in a polling process. One backend covers CPU, GPU and memory, so no RAPL or CPU-time backend is
added beside it. Parts, each its own device record:

- Apple Silicon ("measured:apple-silicon"): cpu_total_mj -> "soc:cpu", dram_mj -> "soc:dram",
  gpu_mj + gpu_sram_mj -> "soc:gpu", ane_mj (Neural Engine) -> "soc:ane" (kind "other").
- Jetson ("measured:jetson"): cpu_energy_mj -> "soc:cpu", gpu_energy_mj -> "soc:gpu", and the module's
  input rail less those two -> "soc:rest-of-module" (kind "other"), so totals do not count CPU and GPU twice.

A part the chip does not report is unavailable (None), never 0. The counters are host-wide: stages hold the
host's slot while measuring. Resolution: whole mJ; the refresh period is not documented, 0.1 s assumed.
"""

from __future__ import annotations

import sys

from wattflow.energy.meter import UNAVAILABLE, EnergyUnavailableError
from wattflow.energy.result import BELOW_RESOLUTION, DeviceEnergy, Resolution
from wattflow.energy.units import mj_to_j

RESOLUTION = Resolution(energy_j=1e-3, update_period_s=0.1)

# (device label, kind, measurement fields summed) per chip family, named by Zeus's measurement class.
_PARTS = {
    "AppleSiliconMeasurement": ("apple-silicon", (
        ("soc:cpu", "cpu", ("cpu_total_mj",)),
        ("soc:dram", "dram", ("dram_mj",)),
        ("soc:gpu", "gpu", ("gpu_mj", "gpu_sram_mj")),
        ("soc:ane", "other", ("ane_mj",)),
    )),
    "JetsonMeasurement": ("jetson", (
        ("soc:cpu", "cpu", ("cpu_energy_mj",)),
        ("soc:gpu", "gpu", ("gpu_energy_mj",)),
    )),
}


def _zeus_soc():
    from zeus.device.soc import ZeusSoCInitError, get_soc
    try:
        return get_soc()
    except ZeusSoCInitError as e:
        hint = " (Apple Silicon needs `pip install 'zeus[apple]'`)" if sys.platform == "darwin" else ""
        raise EnergyUnavailableError(f"SoC: {e}{hint}") from e


def _sum(measurement, fields: tuple[str, ...]) -> float | None:
    values = [getattr(measurement, f, None) for f in fields]
    known = [v for v in values if v is not None]
    return float(sum(known)) if known else None


class SocBackend:
    """Energy of the chip's parts (see the module docstring). `soc` defaults to Zeus's `get_soc()`; tests pass
    an object whose `get_total_energy_consumption()` returns Zeus measurements, and `simulated=True`."""

    name = "soc"
    kind = "other"
    host_wide = True

    def __init__(self, soc=None, simulated: bool = False):
        self._soc = _zeus_soc() if soc is None else soc
        try:
            first = self._soc.get_total_energy_consumption()
        except Exception as e:  # e.g. Jetson's polling process not answering: no figure, not a crash
            raise EnergyUnavailableError(f"SoC: first reading failed: {type(e).__name__}: {e}") from e
        family = type(first).__name__
        if family not in _PARTS:
            raise EnergyUnavailableError(f"SoC: Zeus reports {family}, which wattflow does not map to parts")
        self.family, self._parts = _PARTS[family]
        self.method = f"{'simulated' if simulated else 'measured'}:{self.family}"

    def snapshot(self):
        return self._soc.get_total_energy_consumption()

    def delta(self, start, end, duration_s: float) -> list[DeviceEnergy]:
        out = []
        for label, kind, fields in self._parts:
            a, b = _sum(start, fields), _sum(end, fields)
            if a is not None and b is not None and b < a:
                out.append(DeviceEnergy(label, None, UNAVAILABLE, "counter went down", kind=kind))
                continue
            out.append(self._figure(label, kind, None if a is None or b is None else mj_to_j(b - a), duration_s))
        if self.family == "jetson":
            total = [getattr(m, "total_energy_mj", None) for m in (start, end)]
            parts = [d.energy_j for d in out[:2]]
            rest = (None if None in total or None in parts
                    else max(0.0, mj_to_j(total[1] - total[0]) - sum(parts)))
            out.append(self._figure("soc:rest-of-module", "other", rest, duration_s,
                                    "the module's input rail less CPU and GPU"))
        return out

    def _figure(self, label: str, kind: str, energy_j: float | None, duration_s: float,
                note: str = "") -> DeviceEnergy:
        if energy_j is None:
            return DeviceEnergy(label, None, UNAVAILABLE, f"this {self.family} chip does not report it", kind=kind)
        flags = (BELOW_RESOLUTION,) if RESOLUTION.below(energy_j, duration_s) else ()
        return DeviceEnergy(label, energy_j, self.method, note, kind=kind, flags=flags)
