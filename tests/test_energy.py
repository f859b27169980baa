"""The energy meter against a fake NVML, a fake RAPL sysfs tree and real CPU time (no GPU needed)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from wattflow.config import EnergyConfig
from wattflow.energy import (
    CpuTimeBackend,
    DeviceEnergy,
    EnergyMeter,
    EnergyResult,
    EnergyUnavailableError,
    FakeNvml,
    NvmlBackend,
    RaplBackend,
    carbon_g,
    make_meter,
)
from wattflow.energy import rapl as rapl_module
from wattflow.energy.cputime import process_tree_cpu_s


def fake_gpu_meter(power_w: float = 50.0, device_count: int = 1) -> tuple[EnergyMeter, FakeNvml]:
    fake = FakeNvml(power_w=power_w, device_count=device_count)
    return EnergyMeter([NvmlBackend(fake, simulated=True)]), fake


@pytest.fixture(autouse=True)
def _all_gpus_visible(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


# --- fake NVML -----------------------------------------------------------------------------------------

def test_fake_nvml_window_energy_is_power_times_duration():
    meter, fake = fake_gpu_meter(power_w=80.0)
    with meter.window("infer") as w:
        time.sleep(0.2)
    r = w.result
    assert 0.2 <= r.duration_s < 1.0
    (gpu,) = r.devices
    assert gpu.device == f"gpu:0 {fake.uuid(0)}"
    assert gpu.method == "simulated:nvml" and r.method == "simulated:nvml"
    # The counter and the window clock are read a few µs apart (more on a loaded machine).
    assert r.energy_j == pytest.approx(80.0 * r.duration_s, rel=0.05)
    assert r.avg_power_w == pytest.approx(80.0, rel=0.02)
    assert meter.method_summary == "simulated:nvml"


def test_nvml_init_once_per_module():
    fake = FakeNvml()
    NvmlBackend(fake, simulated=True)
    NvmlBackend(fake, simulated=True)
    assert fake.init_calls == 1


def test_nested_windows_and_read_of_open_window():
    meter, _ = fake_gpu_meter(power_w=100.0)
    with meter.window("pipeline") as outer:
        time.sleep(0.05)
        with meter.window("train") as inner:
            time.sleep(0.1)
            partial = inner.read()
            assert partial.name == "train"
            assert partial.energy_j == pytest.approx(100.0 * partial.duration_s, rel=0.05)
            with pytest.raises(RuntimeError, match="still open"):
                _ = inner.result
            time.sleep(0.05)
        time.sleep(0.05)
    assert inner.result.duration_s > partial.duration_s
    assert outer.result.duration_s > inner.result.duration_s + 0.09
    assert outer.result.energy_j > inner.result.energy_j + 9.0  # >= 0.1 s x 100 W outside the inner window
    assert inner.result.energy_j == pytest.approx(100.0 * inner.result.duration_s, rel=0.05)


def test_result_is_set_when_the_body_raises():
    meter, _ = fake_gpu_meter(power_w=50.0)
    with pytest.raises(ZeroDivisionError):
        with meter.window("crash") as w:
            time.sleep(0.05)
            _ = 1 / 0
    assert w.result.name == "crash"
    assert w.result.energy_j == pytest.approx(50.0 * w.result.duration_s, rel=0.05)


@pytest.mark.parametrize(("visible", "expected"), [
    ("2", [2]),
    ("2,0", [2, 0]),
    ("1,7,2", [1]),            # as in CUDA, an entry naming no device ends the list
    ("", []),
])
def test_cuda_visible_devices_by_index(monkeypatch, visible, expected):
    fake = FakeNvml(device_count=3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    backend = NvmlBackend(fake, simulated=True)
    assert [d.label for d in backend.devices] == [f"gpu:{i} {fake.uuid(i)}" for i in expected]


def test_cuda_visible_devices_by_uuid_and_prefix(monkeypatch):
    fake = FakeNvml(device_count=3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{fake.uuid(2)},{fake.uuid(1)[:13]}")
    meter = EnergyMeter([NvmlBackend(fake, simulated=True)])
    with meter.window("w") as w:
        time.sleep(0.02)
    assert [d.device for d in w.result.devices] == [f"gpu:2 {fake.uuid(2)}", f"gpu:1 {fake.uuid(1)}"]


def test_unsupported_counter_and_counter_going_backwards():
    fake = FakeNvml(power_w=50.0, device_count=3)
    fake.supported[1] = False
    meter = EnergyMeter([NvmlBackend(fake, simulated=True)])
    with meter.window("w") as w:
        time.sleep(0.02)
        fake.offset_mj[2] = -10**9  # driver reload
    gpu0, gpu1, gpu2 = w.result.devices
    assert gpu0.method == "simulated:nvml" and gpu0.energy_j > 0
    assert (gpu1.energy_j, gpu1.method) == (None, "unavailable")
    assert "not supported" in gpu1.note and "not implemented yet" in gpu1.note
    assert (gpu2.energy_j, gpu2.method) == (None, "unavailable")
    assert gpu2.note == "counter went backwards (driver reload?)"
    assert w.result.energy_j == gpu0.energy_j  # the sum covers known devices only
    assert w.result.method == "simulated:nvml"


@pytest.mark.parametrize("cuda_initialised", [True, False])
def test_cuda_is_synchronised_at_the_edges_only_when_initialised(monkeypatch, cuda_initialised):
    calls = []
    cuda = SimpleNamespace(is_initialized=lambda: cuda_initialised, synchronize=lambda: calls.append(1))
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    meter, _ = fake_gpu_meter()
    with meter.window("w"):
        pass
    assert len(calls) == (2 if cuda_initialised else 0)


def test_real_nvml_requested_without_a_gpu_is_a_typed_error():
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pytest.skip("this machine has NVML")
    except pynvml.NVMLError:
        pass
    with pytest.raises(EnergyUnavailableError, match="NVML"):
        make_meter(EnergyConfig(backend="nvml"))


# --- results -------------------------------------------------------------------------------------------

def test_round_trip_and_json():
    r = EnergyResult("train", 12.345678901234567, (
        DeviceEnergy("gpu:0 GPU-x", 1234.5678901234567, "measured:nvml"),
        DeviceEnergy("cpu:package-0", 0.1 + 0.2, "measured:rapl", "counter wrapped once (corrected)"),
        DeviceEnergy("gpu:1 GPU-y", None, "unavailable", "energy counter not supported"),
    ))
    d = r.to_dict()
    text = json.dumps(d)
    back = EnergyResult.from_dict(json.loads(text))
    assert back == r
    assert back.energy_j == r.energy_j == 1234.5678901234567 + (0.1 + 0.2)
    assert d["method"] == "measured:nvml+measured:rapl"
    assert d["avg_power_w"] == pytest.approx(r.energy_j / 12.345678901234567)
    assert d["devices"][2]["energy_j"] is None


def test_unknown_energy_is_none_never_zero():
    r = EnergyResult("w", 2.0, (DeviceEnergy("gpu:0 GPU-x", None, "unavailable", "no counter"),))
    assert r.energy_j is None and r.avg_power_w is None and r.method == "unavailable"
    assert "unknown" in r.summary() and "0.000 J" not in r.summary()
    assert EnergyResult("empty", 1.0, ()).energy_j is None
    with pytest.raises(ValueError):
        DeviceEnergy("gpu:0", 0.0, "unavailable")
    with pytest.raises(ValueError):
        DeviceEnergy("gpu:0", None, "measured:nvml")
    # A measured zero is a real zero, and it is kept.
    assert EnergyResult("idle", 1.0, (DeviceEnergy("cpu:dram-0", 0.0, "measured:rapl"),)).energy_j == 0.0


def test_a_failing_backend_becomes_unavailable_not_a_crash():
    class Broken:
        name, method = "broken", "measured:broken"

        def snapshot(self):
            raise OSError("device gone")

        def delta(self, start, end, duration_s):
            raise AssertionError("not reached")

    meter = EnergyMeter([Broken(), CpuTimeBackend(3.5)])
    with meter.window("w") as w:
        pass
    broken, cpu = w.result.devices
    assert (broken.device, broken.energy_j, broken.method) == ("broken", None, "unavailable")
    assert "device gone" in broken.note
    assert cpu.method == "estimated:cpu-time"
    assert meter.method_summary == "estimated:cpu-time+measured:broken"


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


def test_rapl_zones_exclude_psys_core_uncore_and_mmio(powercap):
    ok, reason = RaplBackend.available(powercap)
    assert ok, reason
    backend = RaplBackend(powercap)
    assert [z.label for z in backend.zones] == ["cpu:package-0", "cpu:dram-0", "cpu:package-1", "cpu:dram-1"]


def test_rapl_window_with_wraparound(powercap):
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
    assert w.result.method == "measured:rapl"
    wrapped = next(d for d in w.result.devices if d.device == "cpu:package-1")
    assert "wrapped" in wrapped.note


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


def test_auto_uses_rapl_when_readable(powercap, monkeypatch):
    monkeypatch.setattr(rapl_module, "DEFAULT_ROOT", str(powercap))
    meter = make_meter(EnergyConfig(backend="fake-nvml"))
    assert meter.method_summary == "measured:rapl+simulated:nvml"
    assert make_meter(EnergyConfig(backend="rapl")).method_summary == "measured:rapl"


# --- CPU-time estimate ---------------------------------------------------------------------------------

def test_cpu_time_of_a_waited_subprocess():
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    meter = EnergyMeter([CpuTimeBackend(watts_per_core=3.5)])
    with meter.window("launch") as w:
        before_s = process_tree_cpu_s()
        subprocess.run([sys.executable, "-c", burn], check=True)
        cpu_s = process_tree_cpu_s() - before_s
    (cpu,) = w.result.devices
    assert cpu.device == "cpu:process-tree" and cpu.method == "estimated:cpu-time"
    assert cpu_s >= 0.3
    assert cpu.energy_j >= 0.3 * 3.5
    assert cpu.energy_j == pytest.approx(cpu_s * 3.5, rel=0.1)
    assert cpu.note.startswith("3.5 W/core x ") and cpu.note.endswith(" cpu-s")


def test_make_meter_cpu_time_and_auto_without_hardware(monkeypatch, tmp_path):
    (cpu,) = make_meter(EnergyConfig(backend="cpu-time", cpu_watts_per_core=7.0)).backends
    assert cpu.watts_per_core == 7.0
    monkeypatch.setattr(rapl_module, "DEFAULT_ROOT", str(tmp_path / "none"))

    def no_nvml():
        raise EnergyUnavailableError("NVML did not initialise: test")

    monkeypatch.setattr("wattflow.energy.NvmlBackend", no_nvml)
    with pytest.raises(EnergyUnavailableError, match="absent"):
        make_meter(EnergyConfig(backend="rapl"))
    meter = make_meter(EnergyConfig(backend="auto"))
    assert meter.method_summary == "estimated:cpu-time"
    assert any("NVML" in n for n in meter.notes) and any("estimated" in n for n in meter.notes)


# --- carbon --------------------------------------------------------------------------------------------

def test_carbon_arithmetic():
    assert carbon_g(3.6e6, 475.0, 1.0) == pytest.approx(475.0)        # 1 kWh
    assert carbon_g(7.2e6, 400.0, 1.5) == pytest.approx(1200.0)       # 2 kWh x 400 g/kWh x 1.5
    assert carbon_g(0.0, 475.0, 1.2) == 0.0
    assert carbon_g(None, 475.0, 1.2) is None
    with pytest.raises(ValueError):
        carbon_g(1.0, 475.0, 0.9)
