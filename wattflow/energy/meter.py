"""The meter core: named windows over pluggable backends, results that say how each figure was obtained.

    meter = EnergyMeter([CpuTimeBackend(3.5)])
    with meter.window("train") as w:
        ...
    w.result.energy_j, w.result.method   # e.g. 12.3, "estimated:cpu-time"

Hardware lives behind `Backend`; this module never imports pynvml. Unknown energy is `None`, never 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

UNAVAILABLE = "unavailable"


class EnergyUnavailableError(RuntimeError):
    """A backend that was asked for explicitly cannot measure on this machine; the message says why."""


@dataclass(frozen=True)
class DeviceEnergy:
    """Energy of one device over one window. `energy_j is None` means unknown (method "unavailable")."""

    device: str
    energy_j: float | None
    method: str
    note: str = ""

    def __post_init__(self) -> None:
        # Refuse figures that would mislead: a number labelled unavailable, or an unknown labelled measured.
        if (self.energy_j is None) != (self.method == UNAVAILABLE):
            raise ValueError(f"{self.device}: energy_j is None exactly when method is {UNAVAILABLE!r}; "
                             f"got energy_j={self.energy_j!r}, method={self.method!r}")
        if self.energy_j is not None:
            energy_j = float(self.energy_j)
            if not math.isfinite(energy_j) or energy_j < 0:
                raise ValueError(f"{self.device}: energy_j must be finite and >= 0, got {energy_j!r}")
            object.__setattr__(self, "energy_j", energy_j)


@dataclass(frozen=True)
class EnergyResult:
    """Immutable, JSON-serialisable reading of one window: per-device joules plus derived totals."""

    name: str
    duration_s: float
    devices: tuple[DeviceEnergy, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "duration_s", float(self.duration_s))

    @property
    def _known(self) -> list[DeviceEnergy]:
        return [d for d in self.devices if d.energy_j is not None]

    @property
    def energy_j(self) -> float | None:
        known = self._known
        return sum(d.energy_j for d in known) if known else None

    @property
    def avg_power_w(self) -> float | None:
        energy_j = self.energy_j
        if energy_j is None or self.duration_s <= 0:
            return None
        return energy_j / self.duration_s

    @property
    def method(self) -> str:
        return "+".join(sorted({d.method for d in self._known})) or UNAVAILABLE

    def summary(self) -> str:
        """One line for logs; says "unknown" rather than printing 0 J."""
        if self.energy_j is None:
            return f"{self.name}: energy unknown over {self.duration_s:.3f} s ({self.method})"
        return (f"{self.name}: {self.energy_j:.3f} J over {self.duration_s:.3f} s "
                f"({self.avg_power_w or 0.0:.2f} W avg, {self.method})")

    def to_dict(self) -> dict:
        # The derived totals are included for readers of the JSON; from_dict recomputes them.
        return {
            "name": self.name,
            "duration_s": self.duration_s,
            "energy_j": self.energy_j,
            "avg_power_w": self.avg_power_w,
            "method": self.method,
            "devices": [{"device": d.device, "energy_j": d.energy_j, "method": d.method, "note": d.note}
                        for d in self.devices],
        }

    @classmethod
    def from_dict(cls, d: dict) -> EnergyResult:
        devices = tuple(DeviceEnergy(x["device"], x["energy_j"], x["method"], x.get("note", ""))
                        for x in d["devices"])
        return cls(name=d["name"], duration_s=d["duration_s"], devices=devices)


class Backend(Protocol):
    """One source of energy figures. Snapshots are opaque; `delta` turns two of them into devices."""

    name: str     # short label used when the backend itself fails, e.g. "nvml"
    method: str   # label of its figures when known, e.g. "measured:nvml"

    def snapshot(self) -> object: ...

    def delta(self, start: object, end: object, duration_s: float) -> list[DeviceEnergy]: ...


class _Failed:
    """Stands in for a snapshot that raised, so one broken backend cannot break the window or the body."""

    def __init__(self, error: Exception):
        self.error = error


def _snapshot(backend: Backend) -> object:
    try:
        return backend.snapshot()
    except Exception as e:  # any backend failure becomes an "unavailable" figure
        return _Failed(e)


def _delta(backend: Backend, start: object, end: object, duration_s: float) -> list[DeviceEnergy]:
    failed = start if isinstance(start, _Failed) else end if isinstance(end, _Failed) else None
    if failed is None:
        try:
            return backend.delta(start, end, duration_s)
        except Exception as e:
            failed = _Failed(e)
    return [DeviceEnergy(backend.name, None, UNAVAILABLE, f"reading failed: {failed.error!r}")]


class Window:
    """An open measurement window. Holds its own start snapshots, so windows nest freely."""

    def __init__(self, name: str, backends: list[Backend]):
        self.name = name
        self._backends = backends
        # Clock after the snapshots and after them again at the end: a CUDA sync inside a snapshot
        # finishes earlier work at the start edge, and belongs to this window at the end edge.
        self._starts = [_snapshot(b) for b in backends]
        self._start_s = time.perf_counter()
        self._result: EnergyResult | None = None

    def read(self) -> EnergyResult:
        """The reading from the window's start until now; the window stays open."""
        ends = [_snapshot(b) for b in self._backends]
        duration_s = time.perf_counter() - self._start_s
        devices: list[DeviceEnergy] = []
        for backend, start, end in zip(self._backends, self._starts, ends, strict=True):
            devices.extend(_delta(backend, start, end, duration_s))
        return EnergyResult(self.name, duration_s, tuple(devices))

    @property
    def result(self) -> EnergyResult:
        """The final reading, set when the window closes (also when its body raised)."""
        if self._result is None:
            raise RuntimeError(f"energy window {self.name!r} is still open; use read() for a reading so far")
        return self._result

    def _close(self) -> None:
        self._result = self.read()


class EnergyMeter:
    """Named energy windows over a fixed list of backends. `notes` records why other backends were skipped."""

    def __init__(self, backends: list[Backend], notes: tuple[str, ...] = ()):
        self.backends = list(backends)
        self.notes = tuple(notes)

    @contextmanager
    def window(self, name: str) -> Iterator[Window]:
        w = Window(name, self.backends)
        try:
            yield w
        finally:
            w._close()

    @property
    def method_summary(self) -> str:
        return "+".join(sorted({b.method for b in self.backends})) or UNAVAILABLE
