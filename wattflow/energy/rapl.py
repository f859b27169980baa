"""CPU energy from Linux powercap RAPL counters (`/sys/class/powercap/intel-rapl:*`, also used on AMD).

Counted: each package zone (`intel-rapl:N`, name "package-K") and its "dram" subzone, which lies outside
the package. Ignored, because they would count the same joules twice: "psys" (the whole SoC), the "core"
and "uncore" subzones (parts of the package) and `intel-rapl-mmio:*` (the package counter again).

`energy_uj` wraps at `max_energy_range_uj` (typically 65-262 kJ: minutes to tens of minutes at full load).
While a window is open a daemon thread reads every zone each `poll_period_s` (default 1 s, far shorter
than a wrap) and keeps a monotonic extended counter per zone, so any number of wraps inside a window is
counted; the window edges read too. A decrease between two reads is taken as one wrap. Overhead: one
small sysfs read per zone per second.

Resolution: the energy unit is not exposed in sysfs; readings are in µJ and the counters update about
every 1 ms, so the below_resolution rule uses 1 µJ and 1 ms.
Since Linux 5.10 (CVE-2020-8694) `energy_uj` is readable by root only; `available()` says so.

Why not Zeus's RAPL reader (zeus 0.16.0, `zeus.device.cpu.rapl`), when GPUs and SoCs are read through Zeus: it
takes every top-level zone as a CPU, psys included (the whole SoC: counted twice beside the package on client
CPUs), and tracks wraps in one spawned process per counter that lives until the interpreter exits; this reader
skips the duplicate zones and extends the counters in a thread only while a window is open.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from wattflow.energy.meter import UNAVAILABLE, EnergyUnavailableError
from wattflow.energy.poller import Poller
from wattflow.energy.result import BELOW_RESOLUTION, DeviceEnergy, Resolution
from wattflow.energy.units import uj_to_j

DEFAULT_ROOT = "/sys/class/powercap"
DEFAULT_POLL_PERIOD_S = 1.0
RESOLUTION = Resolution(energy_j=1e-6, update_period_s=1e-3)
_ZONE = re.compile(r"intel-rapl:(\d+)")
_SUBZONE = re.compile(r"intel-rapl:(\d+):(\d+)")


def _read_text(path: Path) -> str:
    return path.read_text().strip()


@dataclass(frozen=True)
class _Zone:
    label: str          # "cpu:package-0", "cpu:dram-0"
    kind: str           # "cpu" or "dram"
    index: int          # N of the package zone intel-rapl:N
    zone: str           # sysfs directory name, e.g. "intel-rapl:0:2"
    energy_path: Path   # .../energy_uj
    range_uj: int       # max_energy_range_uj: the counter wraps back to 0 past this


def _zone(label: str, kind: str, index: int, zone_dir: Path) -> _Zone:
    return _Zone(label, kind, index, zone_dir.name, zone_dir / "energy_uj",
                 int(_read_text(zone_dir / "max_energy_range_uj")))


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
        package_id, index = name.removeprefix("package-"), int(zone_dir.name.split(":")[1])
        zones.append(_zone(f"cpu:{name}", "cpu", index, zone_dir))
        for sub in _subzone_dirs(root, zone_dir, str(index)):
            if _read_text(sub / "name") == "dram":
                zones.append(_zone(f"cpu:dram-{package_id}", "dram", index, sub))
    if not zones:
        raise EnergyUnavailableError(f"RAPL: no package zones under {root}")
    return zones


@dataclass
class _Extended:
    """A zone's counter extended past its wraps: µJ since the first read, and how many wraps that took."""

    last_raw_uj: int | None = None
    total_uj: int = 0
    wraps: int = 0
    error: str = ""


class RaplBackend:
    """Package and DRAM energy from extended counters read at the window edges and by a background
    reader while any window is open. Raises `EnergyUnavailableError` with the reason (absent,
    permission denied) when the counters cannot be read."""

    name = "rapl"
    kind = "cpu"
    host_wide = True
    method = "measured:rapl"
    resolution = RESOLUTION

    def __init__(self, root: str | Path = DEFAULT_ROOT, poll_period_s: float = DEFAULT_POLL_PERIOD_S):
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
        self._lock = threading.Lock()
        self._counters = [_Extended() for _ in self.zones]
        self._poller = Poller(self.poll, poll_period_s, "wattflow-energy-rapl", on_start=self._rebaseline)

    @classmethod
    def available(cls, root: str | Path = DEFAULT_ROOT) -> tuple[bool, str]:
        """(True, zone list) when every counter under `root` is readable, else (False, reason)."""
        try:
            backend = cls(root)
        except EnergyUnavailableError as e:
            return False, str(e)
        return True, "RAPL zones: " + ", ".join(z.label for z in backend.zones)

    def acquire(self) -> None:
        self._poller.acquire()

    def release(self) -> None:
        self._poller.release()

    def _rebaseline(self) -> None:
        # No reader ran since the last window closed, so wraps in that gap are unknown: start afresh.
        with self._lock:
            for counter in self._counters:
                counter.last_raw_uj = None

    def poll(self) -> None:
        """Read every zone once and extend its counter (the background reader calls this; so may tests)."""
        with self._lock:
            for zone, counter in zip(self.zones, self._counters, strict=True):
                try:
                    raw_uj = int(_read_text(zone.energy_path))
                except (OSError, ValueError) as e:
                    counter.error = f"RAPL read failed: {e}"
                    continue
                counter.error = ""
                if counter.last_raw_uj is not None:
                    step_uj = raw_uj - counter.last_raw_uj
                    if step_uj < 0:
                        step_uj += zone.range_uj
                        counter.wraps += 1
                    counter.total_uj += step_uj
                counter.last_raw_uj = raw_uj

    def snapshot(self) -> tuple[tuple[int, int] | str, ...]:
        """(extended µJ, wraps so far) per zone, or the error text of a failed read."""
        self.poll()
        with self._lock:
            return tuple(c.error or (c.total_uj, c.wraps) for c in self._counters)

    def delta(self, start, end, duration_s: float) -> list[DeviceEnergy]:
        out = []
        for zone, first, last in zip(self.zones, start, end, strict=True):
            ids = {"kind": zone.kind, "index": zone.index, "uuid": zone.zone}
            if isinstance(first, str) or isinstance(last, str):
                reason = first if isinstance(first, str) else last
                out.append(DeviceEnergy(zone.label, None, UNAVAILABLE, reason, **ids))
                continue
            energy_j = uj_to_j(last[0] - first[0])
            wraps = last[1] - first[1]
            note = f"counter wrapped {wraps} time{'s' if wraps > 1 else ''} (corrected)" if wraps else ""
            flags = (BELOW_RESOLUTION,) if self.resolution.below(energy_j, duration_s) else ()
            out.append(DeviceEnergy(zone.label, energy_j, self.method, note, flags=flags, **ids))
        return out
