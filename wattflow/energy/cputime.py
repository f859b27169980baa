"""An estimate of CPU energy from CPU time, for machines whose RAPL counters cannot be read.

energy_j = cpu_s x watts_per_core, where cpu_s is user + system time of this process and of its children
that have exited and been waited for (getrusage RUSAGE_SELF + RUSAGE_CHILDREN). That includes `torchrun`
and its ranks when the launch is waited inside the window.

It counts every thread of the process, so a window must not run concurrently with other work in the
same process (it would be charged for it). The default 3.5 W per core is Cloud Carbon Footprint's AWS
average max watts per vCPU: an upper-end figure for a fully busy core. Labelled "estimated:cpu-time".
"""

from __future__ import annotations

import resource

from wattflow.energy.meter import DeviceEnergy

DEFAULT_WATTS_PER_CORE = 3.5


def process_tree_cpu_s() -> float:
    """User + system CPU seconds of this process and its waited-for children."""
    total_s = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total_s += usage.ru_utime + usage.ru_stime
    return total_s


class CpuTimeBackend:
    name = "cpu-time"
    method = "estimated:cpu-time"

    def __init__(self, watts_per_core: float = DEFAULT_WATTS_PER_CORE):
        if not watts_per_core > 0:
            raise ValueError(f"watts_per_core must be > 0, got {watts_per_core}")
        self.watts_per_core = watts_per_core

    def snapshot(self) -> float:
        return process_tree_cpu_s()

    def delta(self, start: float, end: float, duration_s: float) -> list[DeviceEnergy]:
        cpu_s = max(0.0, end - start)
        return [DeviceEnergy("cpu:process-tree", cpu_s * self.watts_per_core, self.method,
                             f"{self.watts_per_core:g} W/core x {cpu_s:.3f} cpu-s")]
