"""CPU energy from Linux powercap RAPL counters (`/sys/class/powercap/intel-rapl:*`, also used on AMD).

Counted: each package zone (`intel-rapl:N`, name "package-K") and its "dram" subzone, which lies outside
the package. Ignored, because they would count the same joules twice: "psys" (the whole SoC), the "core"
and "uncore" subzones (parts of the package) and `intel-rapl-mmio:*` (the package counter again).

`energy_uj` wraps at `max_energy_range_uj` (typically 65-262 kJ: minutes to tens of minutes at full load).
One wrap per window is corrected; a window long enough to wrap twice under-counts by whole ranges.
Since Linux 5.10 (CVE-2020-8694) `energy_uj` is readable by root only; `available()` says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from wattflow.energy.meter import UNAVAILABLE, DeviceEnergy, EnergyUnavailableError

DEFAULT_ROOT = "/sys/class/powercap"
_ZONE = re.compile(r"intel-rapl:(\d+)")
_SUBZONE = re.compile(r"intel-rapl:(\d+):(\d+)")


def _read_text(path: Path) -> str:
    return path.read_text().strip()


@dataclass(frozen=True)
class _Zone:
    label: str          # "cpu:package-0", "cpu:dram-0"
    energy_path: Path   # .../energy_uj
    range_uj: int       # max_energy_range_uj: the counter wraps back to 0 past this


def _zone(label: str, zone_dir: Path) -> _Zone:
    return _Zone(label, zone_dir / "energy_uj", int(_read_text(zone_dir / "max_energy_range_uj")))


def _subzone_dirs(root: Path, zone_dir: Path, zone_id: str) -> list[Path]:
    # sysfs links subzones both at the top of /sys/class/powercap and inside their parent zone.
    found: dict[str, Path] = {}
    for parent in (root, zone_dir):
        for sub in parent.glob(f"intel-rapl:{zone_id}:*"):
            if _SUBZONE.fullmatch(sub.name):
                found.setdefault(sub.name, sub)
    return [found[k] for k in sorted(found, key=lambda n: int(n.rsplit(":", 1)[1]))]


def _discover(root: Path) -> list[_Zone]:
    if not root.is_dir():
        raise EnergyUnavailableError(f"RAPL: {root} is absent (no powercap driver, or a VM/container)")
    zone_dirs = sorted((d for d in root.iterdir() if _ZONE.fullmatch(d.name)),
                       key=lambda d: int(d.name.split(":")[1]))
    zones = []
    for zone_dir in zone_dirs:
        name = _read_text(zone_dir / "name")
        if not name.startswith("package"):
            continue  # psys
        zones.append(_zone(f"cpu:{name}", zone_dir))
        package_id = name.removeprefix("package-")
        for sub in _subzone_dirs(root, zone_dir, zone_dir.name.split(":")[1]):
            if _read_text(sub / "name") == "dram":
                zones.append(_zone(f"cpu:dram-{package_id}", sub))
    if not zones:
        raise EnergyUnavailableError(f"RAPL: no package zones under {root}")
    return zones


class RaplBackend:
    """Package and DRAM energy from counter readings at the window edges. Raises `EnergyUnavailableError`
    with the reason (absent, permission denied) when the counters cannot be read."""

    name = "rapl"
    method = "measured:rapl"

    def __init__(self, root: str | Path = DEFAULT_ROOT):
        self.root = Path(root)
        try:
            self.zones = _discover(self.root)
            for zone in self.zones:
                int(_read_text(zone.energy_path))
        except PermissionError as e:
            raise EnergyUnavailableError(
                f"RAPL: permission denied reading {e.filename} (root-only since Linux 5.10); "
                "run as root or grant read access to energy_uj") from e
        except (OSError, ValueError) as e:
            raise EnergyUnavailableError(f"RAPL: cannot read counters under {self.root}: {e}") from e

    @classmethod
    def available(cls, root: str | Path = DEFAULT_ROOT) -> tuple[bool, str]:
        """(True, zone list) when every counter under `root` is readable, else (False, reason)."""
        try:
            backend = cls(root)
        except EnergyUnavailableError as e:
            return False, str(e)
        return True, "RAPL zones: " + ", ".join(z.label for z in backend.zones)

    def snapshot(self) -> tuple[int | str, ...]:
        """Counter per zone in µJ, or the error text of a failed read."""
        readings: list[int | str] = []
        for zone in self.zones:
            try:
                readings.append(int(_read_text(zone.energy_path)))
            except (OSError, ValueError) as e:
                readings.append(f"RAPL read failed: {e}")
        return tuple(readings)

    def delta(self, start, end, duration_s: float) -> list[DeviceEnergy]:
        out = []
        for zone, start_uj, end_uj in zip(self.zones, start, end, strict=True):
            if isinstance(start_uj, str) or isinstance(end_uj, str):
                reason = start_uj if isinstance(start_uj, str) else end_uj
                out.append(DeviceEnergy(zone.label, None, UNAVAILABLE, reason))
                continue
            energy_uj, note = end_uj - start_uj, ""
            if energy_uj < 0:
                energy_uj += zone.range_uj
                note = "counter wrapped once (corrected)"
            if energy_uj < 0:  # not a wrap: the counter was reset
                out.append(DeviceEnergy(zone.label, None, UNAVAILABLE, "counter went backwards (reset?)"))
                continue
            out.append(DeviceEnergy(zone.label, energy_uj / 1e6, self.method, note))
        return out
