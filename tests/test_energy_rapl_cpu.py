"""RAPL on a fake sysfs tree (wraps, permissions, duplicate zones) and the CPU-time estimate (live children)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from wattflow.config import EnergyConfig
from wattflow.energy import (
    BELOW_RESOLUTION,
    CpuTimeBackend,
    EnergyMeter,
    EnergyUnavailableError,
    RaplBackend,
    make_meter,
)
from wattflow.energy import rapl as rapl_module
from wattflow.energy.cputime import process_tree_cpu_s

NO_THREAD_POLLS_S = 3600.0  # a poll period so long that only the window edges and the test poll


@pytest.fixture(autouse=True)
def _no_leaked_threads():
    yield
    assert not [t.name for t in threading.enumerate() if t.name.startswith("wattflow-energy")]


# --- RAPL on a fake sysfs tree -------------------------------------------------------------------------

def make_zone(parent: Path, dirname: str, name: str, energy_uj: int, range_uj: int = 262_143_328_850) -> Path:
    zone = parent / dirname
    zone.mkdir(parents=True)
    (zone / "name").write_text(name + "\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{range_uj}\n")
    return zone


@pytest.fixture
def powercap(tmp_path: Path) -> Path:
    root = tmp_path / "powercap"
    (root / "intel-rapl").mkdir(parents=True)  # the control type: no counters
    make_zone(root, "intel-rapl:0", "package-0", 1_000_000)
    make_zone(root, "intel-rapl:0:0", "core", 500_000)
    make_zone(root, "intel-rapl:0:1", "uncore", 100_000)
    make_zone(root / "intel-rapl:0", "intel-rapl:0:2", "dram", 2_000_000)   # only nested
    make_zone(root, "intel-rapl:1", "package-1", 1_000_000_000, range_uj=1_000_000_500)
    make_zone(root, "intel-rapl:1:0", "dram", 3_000_000)
    make_zone(root / "intel-rapl:1", "intel-rapl:1:0", "dram", 3_000_000)  # same subzone, linked twice
    make_zone(root, "intel-rapl:2", "psys", 9_000_000)
    make_zone(root, "intel-rapl-mmio:0", "package-0", 1_000_000)
    return root


def bump(root: Path, dirname: str, energy_uj: int) -> None:
    (root / dirname / "energy_uj").write_text(f"{energy_uj}\n")


def test_rapl_zones_are_deduplicated_and_exclude_psys_core_uncore_and_mmio(powercap):
    ok, reason = RaplBackend.available(powercap)
    assert ok, reason
    backend = RaplBackend(powercap)
    assert [(z.label, z.kind, z.index, z.zone) for z in backend.zones] == [
        ("cpu:package-0", "cpu", 0, "intel-rapl:0"), ("cpu:dram-0", "dram", 0, "intel-rapl:0:2"),
        ("cpu:package-1", "cpu", 1, "intel-rapl:1"), ("cpu:dram-1", "dram", 1, "intel-rapl:1:0")]


def test_rapl_window_with_one_wrap(powercap):
    meter = EnergyMeter([RaplBackend(powercap)])
    with meter.window("train") as w:
        bump(powercap, "intel-rapl:0", 1_000_000 + 12_500_000)       # +12.5 J
        bump(powercap / "intel-rapl:0", "intel-rapl:0:2", 2_000_000 + 1_500_000)  # +1.5 J
        bump(powercap, "intel-rapl:1", 400_000)                       # wrapped: 500 + 400_000 uJ
        bump(powercap, "intel-rapl:1:0", 3_250_000)                   # +0.25 J
        bump(powercap, "intel-rapl:2", 99_000_000)                    # psys: must not count
        bump(powercap, "intel-rapl:0:0", 99_000_000)                  # core: must not count
    energy = {d.device: d.energy_j for d in w.result.devices}
    assert energy == pytest.approx({"cpu:package-0": 12.5, "cpu:dram-0": 1.5,
                                    "cpu:package-1": 0.4005, "cpu:dram-1": 0.25})
    assert w.result.energy_j == pytest.approx(12.5 + 1.5 + 0.4005 + 0.25)
    assert w.result.energy_by_kind() == pytest.approx({"gpu": None, "cpu": 12.9005, "dram": 1.75})
    assert w.result.method == "measured:rapl"
    assert w.result.scope.startswith("CPU package (RAPL) + DRAM (RAPL); excludes GPU, PSU losses")
    wrapped = next(d for d in w.result.devices if d.device == "cpu:package-1")
    assert wrapped.note == "counter wrapped 1 time (corrected)" and wrapped.uuid == "intel-rapl:1"


def test_rapl_several_wraps_in_one_window_polled_directly(tmp_path):
    root = tmp_path / "powercap"
    make_zone(root, "intel-rapl:0", "package-0", 900_000, range_uj=1_000_000)
    backend = RaplBackend(root, poll_period_s=NO_THREAD_POLLS_S)
    with EnergyMeter([backend]).window("long") as w:
        for raw_uj in (100_000, 950_000, 50_000, 990_000, 10_000):   # three wraps
            bump(root, "intel-rapl:0", raw_uj)
            backend.poll()
        bump(root, "intel-rapl:0", 60_000)
    (pkg,) = w.result.devices
    # 100k + 100k + 850k + 100k + 940k + 20k + 50k µJ
    assert pkg.energy_j == pytest.approx(2.16, abs=1e-12)
    assert pkg.note == "counter wrapped 3 times (corrected)"


def test_rapl_background_reader_catches_wraps_between_edges(tmp_path):
    root = tmp_path / "powercap"
    make_zone(root, "intel-rapl:0", "package-0", 0, range_uj=1_000_000)
    meter = EnergyMeter([RaplBackend(root, poll_period_s=0.002)])
    with meter.window("long") as w:
        for raw_uj in (600_000, 200_000, 800_000, 400_000):   # +0.6, wrap +0.6, +0.6, wrap +0.6 J
            bump(root, "intel-rapl:0", raw_uj)
            time.sleep(0.05)   # ~25 poll periods
        assert [t for t in threading.enumerate() if t.name == "wattflow-energy-rapl"][0].daemon
    (pkg,) = w.result.devices
    assert pkg.energy_j == pytest.approx(2.4) and "2 times" in pkg.note


def test_rapl_jumps_between_windows_are_not_counted(tmp_path):
    root = tmp_path / "powercap"
    make_zone(root, "intel-rapl:0", "package-0", 0, range_uj=1_000_000)
    meter = EnergyMeter([RaplBackend(root, poll_period_s=NO_THREAD_POLLS_S)])
    with meter.window("a"):
        bump(root, "intel-rapl:0", 100_000)
    bump(root, "intel-rapl:0", 50_000)   # unknown wraps while no window was open
    with meter.window("b") as w:
        bump(root, "intel-rapl:0", 70_000)
    assert w.result.energy_j == pytest.approx(0.02)


def test_rapl_absent(tmp_path):
    ok, reason = RaplBackend.available(tmp_path / "nope")
    assert not ok and "absent" in reason
    (tmp_path / "empty").mkdir()
    ok, reason = RaplBackend.available(tmp_path / "empty")
    assert not ok and "no package zones" in reason
    with pytest.raises(EnergyUnavailableError, match="absent"):
        RaplBackend(tmp_path / "nope")


def test_rapl_permission_denied(powercap, monkeypatch):
    # Tests may run as root, where chmod 000 does not stop a read: deny it the way the kernel would.
    real_read = rapl_module._read_text

    def read(path: Path) -> str:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(rapl_module, "_read_text", read)
    ok, reason = RaplBackend.available(powercap)
    assert not ok and "permission denied" in reason and "energy_uj" in reason
    monkeypatch.setattr(rapl_module, "DEFAULT_ROOT", str(powercap))
    with pytest.raises(EnergyUnavailableError, match="permission denied"):
        make_meter(EnergyConfig(backend="rapl"))


def test_auto_uses_rapl_when_readable(powercap, monkeypatch):
    monkeypatch.setattr(rapl_module, "DEFAULT_ROOT", str(powercap))
    meter = make_meter(EnergyConfig(backend="fake-nvml"))
    assert meter.method_summary == "measured:rapl+simulated:nvml"
    assert make_meter(EnergyConfig(backend="rapl")).method_summary == "measured:rapl"


# --- CPU-time estimate ---------------------------------------------------------------------------------

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass"


def test_cpu_time_of_a_waited_subprocess():
    meter = EnergyMeter([CpuTimeBackend(watts_per_core=3.5)])
    with meter.window("launch") as w:
        before_s = process_tree_cpu_s()
        subprocess.run([sys.executable, "-c", BURN.format(s=0.3)], check=True)
        cpu_s = process_tree_cpu_s() - before_s
    (cpu,) = w.result.devices
    assert (cpu.device, cpu.kind, cpu.uuid) == ("cpu:process-tree", "cpu-estimate", "process-tree")
    assert cpu.method == "estimated:cpu-time"
    assert cpu_s >= 0.3
    assert cpu.energy_j >= 0.3 * 3.5
    assert cpu.energy_j == pytest.approx(cpu_s * 3.5, rel=0.1)
    assert cpu.note.startswith("3.5 W/core x ") and cpu.note.endswith(" cpu-s")


def test_cpu_time_of_a_live_child_read_while_it_runs():
    meter = EnergyMeter([CpuTimeBackend(watts_per_core=2.0)])
    with meter.window("launch") as w:
        child = subprocess.Popen([sys.executable, "-c", BURN.format(s=30)])
        try:
            deadline = time.monotonic() + 10
            while psutil.Process(child.pid).cpu_times().user < 0.3 and time.monotonic() < deadline:
                time.sleep(0.02)
            partial = w.read()
            assert child.poll() is None   # still running: only the live-tree walk can see its time
        finally:
            child.kill()
            child.wait()
    assert partial.energy_j >= 0.3 * 2.0
    # Once reaped, its time moves to RUSAGE_CHILDREN: counted once, not lost, not doubled.
    assert w.result.energy_j >= partial.energy_j - 0.05
    assert w.result.energy_j < partial.energy_j + (w.result.duration_s - partial.duration_s) * 2 * 2.0 + 0.1


def test_cpu_time_short_window_is_below_resolution():
    with EnergyMeter([CpuTimeBackend()]).window("blink") as w:
        pass
    assert w.result.flags == (BELOW_RESOLUTION,)
