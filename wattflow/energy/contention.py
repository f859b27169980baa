"""Which processes outside this process tree used a device during a window (device-global counters
charge their work to us: such a window is flagged "contended").

Presence is sampled by numbered checks. For each foreign pid we keep the runs of consecutive checks in
which it was seen, so a window asks "seen at any check from my start edge to my end edge?" and a nested
window that did not overlap a visitor is not blamed for it.
"""

from __future__ import annotations

import os

import psutil


def own_pids() -> set[int]:
    """This process and all its descendants (e.g. torchrun and its ranks)."""
    me = psutil.Process()
    try:
        return {me.pid, *(c.pid for c in me.children(recursive=True))}
    except psutil.Error:
        return {me.pid}


CANNOT_TELL = -1  # recorded instead of pids that do not exist here (NVML sees another PID namespace)


class ForeignProcesses:
    def __init__(self, device_count: int):
        self.checks = 0   # number of the latest check
        self._runs: list[dict[int, list[list[int]]]] = [{} for _ in range(device_count)]  # pid -> [[first, last]]
        # Every pid once seen in this process tree: a rank that has exited by a later check is still ours.
        self._own: set[int] = {os.getpid()}

    def clear(self) -> None:
        """Forget all sightings (no window is open, so no one can ask about them)."""
        for runs in self._runs:
            runs.clear()

    def check(self, running: list[set[int] | None]) -> int:
        """Record one check: the pids on each device (None: they cannot be listed). Returns the check's number.
        A pid that is not ours and does not exist here is not counted as a foreign process: inside a container
        without the host's PID namespace NVML reports host pids, our own ranks' among them, so whether others
        ran cannot be told."""
        self.checks += 1
        if set().union(*(pids for pids in running if pids)) - self._own:
            self._own |= own_pids()  # walking the tree reads all of /proc: only when another pid is on a device
        for pids, device_runs in zip(running, self._runs, strict=True):
            others = set() if pids is None else pids - self._own
            strangers = pids is None or any(not psutil.pid_exists(pid) for pid in others)
            others = {pid for pid in others if psutil.pid_exists(pid)}
            for pid in sorted(others) + ([CANNOT_TELL] if strangers else []):
                runs = device_runs.setdefault(pid, [])
                if runs and runs[-1][1] == self.checks - 1:
                    runs[-1][1] = self.checks
                else:
                    runs.append([self.checks, self.checks])
        return self.checks

    def seen(self, device: int, first_check: int, last_check: int) -> list[int]:
        """Foreign pids seen on `device` at any check numbered first_check..last_check (CANNOT_TELL first when
        some could not be told apart)."""
        return sorted(pid for pid, runs in self._runs[device].items()
                      if any(a <= last_check and b >= first_check for a, b in runs))
