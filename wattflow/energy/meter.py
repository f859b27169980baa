"""The meter core: named windows over pluggable backends, results that say how each figure was obtained.

    meter = EnergyMeter([CpuTimeBackend(3.5)])
    with meter.window("train") as w:
        ...
    w.result.energy_j, w.result.method   # e.g. 12.3, "estimated:cpu-time"

Hardware lives behind `Backend`; this module never imports pynvml. Unknown energy is `None`, never 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from wattflow.energy.result import (
    BELOW_RESOLUTION,
    CONTENDED,
    COUNTER_RESET,
    KINDS,
    UNAVAILABLE,
    DeviceEnergy,
    EnergyResult,
    Resolution,
    combine_nodes,
)

# Result types are re-exported: backends and older code import them from here.
__all__ = [
    "BELOW_RESOLUTION", "CONTENDED", "COUNTER_RESET", "KINDS", "UNAVAILABLE", "Backend", "DeviceEnergy",
    "EnergyMeter", "EnergyResult", "EnergyUnavailableError", "Resolution", "Window", "combine_nodes",
]


class EnergyUnavailableError(RuntimeError):
    """A backend that was asked for explicitly cannot measure on this machine; the message says why."""


class Backend(Protocol):
    """One source of energy figures. Snapshots are opaque; `delta` turns two of them into devices.

    Optional members, looked up with getattr: `kind` (of the figure reported when the whole backend
    fails; default "other"), `methods` (labels it can produce; default {method}), and `acquire()` /
    `release()`, called when a window opens / closes (to run background readers only while needed).
    """

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
    return [DeviceEnergy(backend.name, None, UNAVAILABLE, f"reading failed: {failed.error!r}",
                         kind=getattr(backend, "kind", "other"))]


class Window:
    """An open measurement window. Holds its own start snapshots, so windows nest freely."""

    def __init__(self, name: str, backends: list[Backend], clock: Callable[[], float] = time.perf_counter):
        self.name = name
        self._clock = clock
        self._backends = backends
        self._acquired = [b for b in backends if _call(b, "acquire")]
        # Clock after the snapshots and after them again at the end: a CUDA sync inside a snapshot
        # finishes earlier work at the start edge, and belongs to this window at the end edge.
        self._starts = [_snapshot(b) for b in backends]
        self._start_s = clock()
        self._result: EnergyResult | None = None

    def read(self) -> EnergyResult:
        """The reading from the window's start until now (the final reading once it is closed)."""
        if self._result is not None:
            return self._result
        ends = [_snapshot(b) for b in self._backends]
        duration_s = max(0.0, self._clock() - self._start_s)
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
        try:
            self._result = self.read()
        finally:
            for backend in self._acquired:
                _call(backend, "release")


def _call(backend: Backend, hook: str) -> bool:
    """Call an optional hook; True when it exists and succeeded (a failing backend must not break windows)."""
    fn = getattr(backend, hook, None)
    if fn is None:
        return False
    try:
        fn()
    except Exception:  # its snapshots will fail too and say why
        return False
    return True


class EnergyMeter:
    """Named energy windows over a fixed list of backends. `notes` records why other backends were skipped.
    `clock` (seconds, monotonic) times the windows; inject one in tests."""

    def __init__(self, backends: list[Backend], notes: tuple[str, ...] = (),
                 clock: Callable[[], float] = time.perf_counter):
        self.backends = list(backends)
        self.notes = tuple(notes)
        self.clock = clock

    @contextmanager
    def window(self, name: str) -> Iterator[Window]:
        w = Window(name, self.backends, self.clock)
        try:
            yield w
        finally:
            w._close()

    @property
    def method_summary(self) -> str:
        methods = {m for b in self.backends for m in getattr(b, "methods", (b.method,))}
        return "+".join(sorted(methods)) or UNAVAILABLE

