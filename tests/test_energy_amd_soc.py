"""AMD GPUs and whole-chip SoCs (Apple Silicon, Jetson), read through Zeus: faked at the Zeus boundary wattflow
calls (a Zeus GPU's methods, a Zeus SoC's cumulative measurements), and how `auto` chooses among backends."""

from __future__ import annotations

import pytest
from zeus.device.soc.apple import AppleSiliconMeasurement
from zeus.device.soc.jetson import JetsonMeasurement

import wattflow.energy as energy
from wattflow.config import EnergyConfig
from wattflow.energy import AmdBackend, EnergyMeter, EnergyUnavailableError, FakeNvml, SocBackend, make_meter


class ManualClock:
    def __init__(self, t_s: float = 100.0):
        self.t_s = t_s

    def __call__(self) -> float:
        return self.t_s


def test_amd_gpus_give_counter_figures_and_fall_back_to_power_where_zeus_distrusts_the_counter():
    clock = ManualClock()
    fake = FakeNvml(power_w=200.0, device_count=2, clock=clock)
    fake.nvmlInit()
    fake.supported[1] = False   # Zeus's start-up check disabled this counter
    backend = AmdBackend([fake.zeus_gpu(0), fake.zeus_gpu(1)], simulated=True, sample_period_s=3600.0, clock=clock)
    with EnergyMeter([backend], clock=clock).window("w") as w:
        clock.t_s += 2.0
    counter, power = w.result.devices
    assert (counter.energy_j, counter.method) == (pytest.approx(400.0), "simulated:amdsmi")
    assert (power.energy_j, power.method) == (pytest.approx(400.0), "simulated:amdsmi-power")
    # Zeus lists no processes per AMD GPU: contention cannot be checked, and every figure says so
    assert all("cannot tell whether other processes used this GPU: Zeus lists no processes" in d.note
               for d in (counter, power))
    assert w.result.energy_by_kind()["gpu"] == pytest.approx(800.0)


class FakeSoc:
    """Zeus's SoC interface: cumulative measurements, one per read (the last repeats)."""

    def __init__(self, *measurements):
        self.measurements, self.reads = list(measurements), 0

    def get_total_energy_consumption(self):
        m = self.measurements[min(self.reads, len(self.measurements) - 1)]
        self.reads += 1
        return m


def test_apple_silicon_parts_become_device_records_and_a_missing_part_is_unknown():
    soc = FakeSoc(AppleSiliconMeasurement(cpu_total_mj=0, gpu_mj=0, gpu_sram_mj=0, ane_mj=0),
                  AppleSiliconMeasurement(cpu_total_mj=1_000, gpu_mj=0, gpu_sram_mj=0, ane_mj=0),
                  AppleSiliconMeasurement(cpu_total_mj=21_000, gpu_mj=4_000, gpu_sram_mj=1_000, ane_mj=500))
    clock = ManualClock()
    meter = EnergyMeter([SocBackend(soc, simulated=True)], clock=clock)
    with meter.window("w") as w:
        clock.t_s += 2.0
    by_device = {d.device: d for d in w.result.devices}
    assert by_device["soc:cpu"].energy_j == pytest.approx(20.0) and by_device["soc:cpu"].kind == "cpu"
    assert by_device["soc:gpu"].energy_j == pytest.approx(5.0)           # GPU + its SRAM
    assert by_device["soc:ane"].kind == "other" and by_device["soc:ane"].energy_j == pytest.approx(0.5)
    assert by_device["soc:dram"].energy_j is None and by_device["soc:dram"].method == "unavailable"
    assert by_device["soc:cpu"].method == "simulated:apple-silicon"
    assert w.result.energy_j == pytest.approx(25.5) and "unknown: soc:dram" in w.result.scope


def test_jetson_reports_the_rest_of_the_module_without_counting_cpu_and_gpu_twice():
    soc = FakeSoc(JetsonMeasurement(cpu_energy_mj=0, gpu_energy_mj=0, total_energy_mj=0),
                  JetsonMeasurement(cpu_energy_mj=1_000, gpu_energy_mj=2_000, total_energy_mj=10_000),
                  JetsonMeasurement(cpu_energy_mj=6_000, gpu_energy_mj=12_000, total_energy_mj=40_000))
    clock = ManualClock()
    with EnergyMeter([SocBackend(soc)], clock=clock).window("w") as w:
        clock.t_s += 5.0
    assert [(d.device, d.energy_j, d.method) for d in w.result.devices] == [
        ("soc:cpu", pytest.approx(5.0), "measured:jetson"), ("soc:gpu", pytest.approx(10.0), "measured:jetson"),
        ("soc:rest-of-module", pytest.approx(15.0), "measured:jetson")]
    assert w.result.energy_j == pytest.approx(30.0)   # the module's input rail over the window


def test_auto_without_any_gpu_or_soc_says_why_for_each_and_estimates_the_cpu(monkeypatch):
    def unavailable(name):
        def build(*args, **kwargs):
            raise EnergyUnavailableError(f"{name}: not here")
        return build
    monkeypatch.setattr(energy, "NvmlBackend", unavailable("NVML"))
    monkeypatch.setattr(energy, "AmdBackend", unavailable("AMD SMI"))
    monkeypatch.setattr(energy, "SocBackend", unavailable("SoC"))
    monkeypatch.setattr(energy.RaplBackend, "available", classmethod(lambda cls, root: (False, "RAPL: absent")))
    meter = make_meter(EnergyConfig(backend="auto"))
    assert meter.method_summary == "estimated:cpu-time"
    assert [n.split(":")[0] for n in meter.notes] == ["NVML", "AMD SMI", "SoC", "RAPL"]


def test_auto_prefers_amd_gpus_when_nvml_is_absent_and_takes_the_soc_only_without_gpus(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setattr(energy, "NvmlBackend", lambda **kw: (_ for _ in ()).throw(EnergyUnavailableError("no NVML")))
    monkeypatch.setattr(energy, "AmdBackend", lambda **kw: AmdBackend([fake.zeus_gpu(0)], simulated=True, **kw))
    monkeypatch.setattr(energy.RaplBackend, "available", classmethod(lambda cls, root: (False, "RAPL: absent")))
    meter = make_meter(EnergyConfig(backend="auto"))
    assert meter.method_summary == "estimated:cpu-time+simulated:amdsmi"
    monkeypatch.setattr(energy, "AmdBackend", lambda **kw: (_ for _ in ()).throw(EnergyUnavailableError("no AMD")))
    monkeypatch.setattr(energy, "SocBackend", lambda: SocBackend(FakeSoc(JetsonMeasurement(0, 0, 0)), simulated=True))
    meter = make_meter(EnergyConfig(backend="auto"))
    assert meter.method_summary == "simulated:jetson"   # the chip covers its CPU: no CPU backend beside it


def test_explicit_amdsmi_without_amd_gpus_is_a_typed_error():
    with pytest.raises(EnergyUnavailableError, match="AMD SMI"):
        make_meter(EnergyConfig(backend="amdsmi"))
