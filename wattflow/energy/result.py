"""Immutable, JSON-serialisable energy records: one `DeviceEnergy` per device, one `EnergyResult` per window.

Unknown energy is `None` (method "unavailable"), never 0. Every known figure carries a method label
("measured:...", "simulated:...", "estimated:...") and flags that qualify it.

The below_resolution rule: a figure is flagged when its energy is under 100 x the source's resolution or
its window is shorter than 10 x the source's update period (`Resolution.below`). Such a figure is mostly
quantisation noise; it is kept, but should not be compared or divided into per-inference numbers.
"""

from __future__ import annotations

import math
import re
import socket
from dataclasses import dataclass, field, replace

UNAVAILABLE = "unavailable"
KINDS = ("gpu", "cpu", "dram", "cpu-estimate", "other")
TOTAL_KINDS = ("gpu", "cpu", "dram")   # energy_by_kind keys; cpu-estimate counts under "cpu"

BELOW_RESOLUTION = "below_resolution"  # figure under the rule above
COUNTER_RESET = "counter_reset"        # the energy counter went down inside the window (driver reload)
CONTENDED = "contended"                # processes outside this process tree used the device

_ALWAYS_EXCLUDED = ("PSU losses", "fans", "network")


@dataclass(frozen=True)
class Resolution:
    """How finely a source reads: its smallest energy step and how often it refreshes."""

    energy_j: float
    update_period_s: float

    def below(self, energy_j: float, duration_s: float) -> bool:
        return energy_j < 100 * self.energy_j or duration_s < 10 * self.update_period_s


def _finite_nonneg(what: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be finite and >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class DeviceEnergy:
    """Energy of one device over one window. `energy_j is None` means unknown (method "unavailable").

    `uuid` is the GPU UUID, the RAPL zone directory ("intel-rapl:0:2") or "process-tree". `duration_s`
    is the window's; `EnergyResult` fills it in when a backend leaves it None.
    """

    device: str
    energy_j: float | None
    method: str
    note: str = ""
    kind: str = "other"
    index: int | None = None
    uuid: str = ""
    flags: tuple[str, ...] = ()
    duration_s: float | None = None

    def __post_init__(self) -> None:
        # Refuse figures that would mislead: a number labelled unavailable, or an unknown labelled measured.
        if (self.energy_j is None) != (self.method == UNAVAILABLE):
            raise ValueError(f"{self.device}: energy_j is None exactly when method is {UNAVAILABLE!r}; "
                             f"got energy_j={self.energy_j!r}, method={self.method!r}")
        if self.kind not in KINDS:
            raise ValueError(f"{self.device}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.energy_j is not None:
            object.__setattr__(self, "energy_j", _finite_nonneg(f"{self.device}: energy_j", self.energy_j))
        if self.duration_s is not None:
            object.__setattr__(self, "duration_s", _finite_nonneg(f"{self.device}: duration_s", self.duration_s))
        object.__setattr__(self, "flags", tuple(sorted(set(self.flags))))

    @property
    def avg_power_w(self) -> float | None:
        if self.energy_j is None or not self.duration_s:
            return None
        return self.energy_j / self.duration_s

    def to_dict(self) -> dict:
        return {"device": self.device, "kind": self.kind, "index": self.index, "uuid": self.uuid,
                "energy_j": self.energy_j, "duration_s": self.duration_s, "avg_power_w": self.avg_power_w,
                "method": self.method, "flags": list(self.flags), "note": self.note}

    @classmethod
    def from_dict(cls, d: dict) -> DeviceEnergy:
        return cls(d["device"], d["energy_j"], d["method"], d.get("note", ""), d.get("kind", "other"),
                   d.get("index"), d.get("uuid", ""), tuple(d.get("flags", ())), d.get("duration_s"))


def _sum(values: list[float]) -> float | None:
    return math.fsum(values) if values else None


@dataclass(frozen=True)
class EnergyResult:
    """Immutable, JSON-serialisable reading of one window on one node (or several, see `combine_nodes`)."""

    name: str
    duration_s: float
    devices: tuple[DeviceEnergy, ...]
    node: str = field(default_factory=socket.gethostname)

    def __post_init__(self) -> None:
        duration_s = _finite_nonneg("duration_s", self.duration_s)
        object.__setattr__(self, "duration_s", duration_s)
        object.__setattr__(self, "devices", tuple(
            d if d.duration_s is not None else replace(d, duration_s=duration_s) for d in self.devices))

    @property
    def _known(self) -> list[DeviceEnergy]:
        return [d for d in self.devices if d.energy_j is not None]

    @property
    def energy_j(self) -> float | None:
        return _sum([d.energy_j for d in self._known])

    @property
    def avg_power_w(self) -> float | None:
        energy_j = self.energy_j
        if energy_j is None or self.duration_s <= 0:
            return None
        return energy_j / self.duration_s

    @property
    def method(self) -> str:
        return "+".join(sorted({d.method for d in self._known})) or UNAVAILABLE

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(sorted({f for d in self.devices for f in d.flags}))

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(self.node.split("+"))

    def energy_by_kind(self) -> dict[str, float | None]:
        """Joules per kind (gpu, cpu, dram; the CPU-time estimate counts as cpu); None where nothing known.
        An "other" key appears only when a device of kind "other" is present."""
        def kind_of(d: DeviceEnergy) -> str:
            return "cpu" if d.kind == "cpu-estimate" else d.kind
        kinds = TOTAL_KINDS + (("other",) if any(d.kind == "other" for d in self.devices) else ())
        return {k: _sum([d.energy_j for d in self._known if kind_of(d) == k]) for k in kinds}

    @property
    def scope(self) -> str:
        """In words: what the total covers and what it leaves out."""
        known = self._known
        kinds = {d.kind for d in known}
        parts = list(dict.fromkeys(_scope_part(d) for d in sorted(known, key=lambda d: KINDS.index(d.kind))))
        excluded = ["GPU"] if "gpu" not in kinds else []
        excluded += ["CPU"] if not kinds & {"cpu", "cpu-estimate"} else []
        excluded += ["DRAM"] if "dram" not in kinds else []
        excluded += [*_ALWAYS_EXCLUDED, *(["other nodes"] if len(self.nodes) == 1 else [])]
        text = (" + ".join(parts) or "nothing measured") + "; excludes " + ", ".join(excluded)
        if len(self.nodes) > 1:
            text = f"{len(self.nodes)} nodes ({', '.join(self.nodes)}): {text}"
        unknown = [d.device for d in self.devices if d.energy_j is None]
        return text + (f"; unknown: {', '.join(unknown)}" if unknown else "")

    def summary(self) -> str:
        """One line for logs; says "unknown" rather than printing 0 J."""
        flags = f", flags: {','.join(self.flags)}" if self.flags else ""
        if self.energy_j is None:
            return f"{self.name}: energy unknown over {self.duration_s:.3f} s ({self.method}{flags})"
        return (f"{self.name}: {self.energy_j:.3f} J over {self.duration_s:.3f} s "
                f"({self.avg_power_w or 0.0:.2f} W avg, {self.method}{flags})")

    def to_dict(self) -> dict:
        # Derived figures are included for readers of the JSON; from_dict recomputes them.
        return {
            "name": self.name, "node": self.node, "duration_s": self.duration_s,
            "energy_j": self.energy_j, "avg_power_w": self.avg_power_w, "method": self.method,
            "energy_by_kind_j": self.energy_by_kind(), "scope": self.scope, "flags": list(self.flags),
            "devices": [d.to_dict() for d in self.devices],
        }

    @classmethod
    def from_dict(cls, d: dict) -> EnergyResult:
        # Records written before `node` existed read back with node "" (unknown).
        return cls(d["name"], d["duration_s"], tuple(DeviceEnergy.from_dict(x) for x in d["devices"]),
                   d.get("node", ""))


def _scope_part(d: DeviceEnergy) -> str:
    simulated = ", simulated" if d.method.startswith("simulated") else ""
    if d.kind == "gpu":
        return f"GPU board (NVML{simulated})"
    if d.kind == "cpu":
        return f"CPU package (RAPL{simulated})"
    if d.kind == "dram":
        return f"DRAM (RAPL{simulated})"
    if d.kind == "cpu-estimate":
        watts = re.match(r"(\S+) W/core", d.note)  # CpuTimeBackend writes "3.5 W/core x ..."
        return f"CPU time of this process tree{f' x {watts[1]} W/core' if watts else ''} (estimate)"
    return f"{d.device} ({d.method})"


def combine_nodes(name: str, results: list[EnergyResult]) -> EnergyResult:
    """One record for a multi-node job: every node's devices once, labelled "<node>/<device>", each keeping
    its node's duration; the job's duration is the longest node's. The per-node records are unchanged."""
    if not results:
        raise ValueError("combine_nodes needs at least one node's result")
    nodes = [n for r in results for n in r.nodes]
    if len(set(nodes)) != len(nodes) or "" in nodes:
        # Summing a node twice double-counts its device-global counters.
        raise ValueError(f"each node must appear once and be named; got {nodes}")
    devices = tuple(replace(d, device=f"{r.node}/{d.device}") if len(r.nodes) == 1 else d
                    for r in results for d in r.devices)
    return EnergyResult(name, max(r.duration_s for r in results), devices, "+".join(nodes))
