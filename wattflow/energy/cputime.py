"""An estimate of CPU energy from CPU time, for machines where nothing is measurable.

energy_j = cpu_s x watts_per_core, where cpu_s is user + system time of the whole process tree:
this process and its reaped children (getrusage RUSAGE_SELF + RUSAGE_CHILDREN), plus every live
descendant (psutil: its own time and that of the children it has reaped). A child is counted live
until it is reaped, then through RUSAGE_CHILDREN, never both at once; so read() of an open window
around a running `torchrun` sees its ranks' time.

It counts every thread of the process, so a window must not run concurrently with other work in the
same process (it would be charged for it). The default 3.5 W per core is Cloud Carbon Footprint's AWS
average max watts per vCPU: an upper-end figure for a fully busy core. Labelled "estimated:cpu-time".
Resolution: one clock tick of CPU time (1 / SC_CLK_TCK s, as /proc reports it) x watts_per_core.
"""

from __future__ import annotations

import os
import resource

import psutil

from wattflow.energy.result import BELOW_RESOLUTION, DeviceEnergy, Resolution

DEFAULT_WATTS_PER_CORE = 3.5
CLOCK_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    total_s = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total_s += usage.ru_utime + usage.ru_stime
    return total_s


def _live_descendants_cpu_s() -> float:
    total_s = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:  # exited meanwhile: its time moves to its parent's reaped-children figure
            continue
        # children_* are the grandchildren it reaped: live ones are visited on their own.
        total_s += t.user + t.system + t.children_user + t.children_system
    return total_s


def process_tree_cpu_s() -> float:
    """User + system CPU seconds of this process, its reaped children and its live descendants."""
    # Own figures first: a child reaped between the two reads is then briefly missed, never counted twice.
    return _own_cpu_s() + _live_descendants_cpu_s()


class CpuTimeBackend:
    name = "cpu-time"
    kind = "cpu-estimate"
    method = "estimated:cpu-time"

    def __init__(self, watts_per_core: float = DEFAULT_WATTS_PER_CORE):
        if not watts_per_core > 0:
            raise ValueError(f"watts_per_core must be > 0, got {watts_per_core}")
        self.watts_per_core = watts_per_core
        self.resolution = Resolution(CLOCK_TICK_S * watts_per_core, CLOCK_TICK_S)

    def snapshot(self) -> float:
        return process_tree_cpu_s()

    def delta(self, start: float, end: float, duration_s: float) -> list[DeviceEnergy]:
        cpu_s = max(0.0, end - start)
        energy_j = cpu_s * self.watts_per_core
        flags = (BELOW_RESOLUTION,) if self.resolution.below(energy_j, duration_s) else ()
        return [DeviceEnergy("cpu:process-tree", energy_j, self.method,
                             f"{self.watts_per_core:g} W/core x {cpu_s:.3f} cpu-s",
                             kind=self.kind, uuid="process-tree", flags=flags)]
