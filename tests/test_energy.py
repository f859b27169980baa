"""The meter core, results, carbon and make_meter, against a fake NVML (no GPU needed).
NVML specifics: test_energy_nvml.py; RAPL and CPU time: test_energy_rapl_cpu.py; properties:
test_energy_properties.py."""

from __future__ import annotations

import json
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from wattflow.config import EnergyConfig
from wattflow.energy import (
    BELOW_RESOLUTION,
    CpuTimeBackend,
    DeviceEnergy,
    EnergyMeter,
    EnergyResult,
    EnergyUnavailableError,
    FakeNvml,
    NvmlBackend,
    Resolution,
    carbon_g,
    co2e_g,
    combine_nodes,
    j_to_kwh,
    make_meter,
)
from wattflow.energy import rapl as rapl_module


def fake_gpu_meter(power_w: float = 50.0, device_count: int = 1) -> tuple[EnergyMeter, FakeNvml]:
    fake = FakeNvml(power_w=power_w, device_count=device_count)
    return EnergyMeter([NvmlBackend(fake, simulated=True)]), fake


class ManualClock:
    def __init__(self, t_s: float = 100.0):
        self.t_s = t_s

    def __call__(self) -> float:
        return self.t_s


@pytest.fixture(autouse=True)
def _all_gpus_visible_and_no_leaked_threads(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield
    assert not [t.name for t in threading.enumerate() if t.name.startswith("wattflow-energy")]


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


def test_unsupported_counter_and_counter_going_backwards_fall_back_to_the_power_integral():
    fake = FakeNvml(power_w=50.0, device_count=3)
    fake.supported[1] = False
    meter = EnergyMeter([NvmlBackend(fake, simulated=True, sample_period_s=0.01)])
    with meter.window("w") as w:
        time.sleep(0.1)
        fake.offset_mj[2] = -10**9  # driver reload
    gpu0, gpu1, gpu2 = w.result.devices
    assert gpu0.method == "simulated:nvml" and gpu0.energy_j > 0 and gpu0.flags == (BELOW_RESOLUTION,)
    assert gpu1.method == "simulated:nvml-power" and "not supported" in gpu1.note
    assert gpu2.method == "simulated:nvml-power" and "counter_reset" in gpu2.flags
    for gpu in (gpu1, gpu2):
        assert gpu.energy_j == pytest.approx(50.0 * w.result.duration_s, rel=0.05)
    assert w.result.energy_j == pytest.approx(gpu0.energy_j + gpu1.energy_j + gpu2.energy_j)
    assert w.result.method == "simulated:nvml+simulated:nvml-power"
    assert set(w.result.flags) == {"below_resolution", "counter_reset"}


@pytest.mark.parametrize("cuda_initialised", [True, False])
def test_cuda_is_synchronised_at_the_edges_on_every_device_used_only_when_initialised(monkeypatch, cuda_initialised):
    # A stage may queue work on several GPUs: synchronize() alone waits for the current one only. Devices
    # this process never touched (no CUDA context) are left alone: syncing would create a context there.
    calls = []
    cuda = SimpleNamespace(is_initialized=lambda: cuda_initialised, device_count=lambda: 3,
                           synchronize=lambda device=None: calls.append(device))
    used = SimpleNamespace(_cuda_hasPrimaryContext=lambda device: device in (0, 2))
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda, _C=used))
    meter, _ = fake_gpu_meter()
    with meter.window("w"):
        pass
    assert calls == ([0, 2, 0, 2] if cuda_initialised else [])


def test_real_nvml_requested_without_a_gpu_is_a_typed_error():
    import pynvml  # a dependency (nvidia-ml-py): failing to import it is a failure, not a skip

    try:
        pynvml.nvmlInit()
        pytest.skip("this machine has NVML")
    except pynvml.NVMLError:
        pass
    with pytest.raises(EnergyUnavailableError, match="NVML"):
        make_meter(EnergyConfig(backend="nvml"))


# --- meter core ----------------------------------------------------------------------------------------

def test_injectable_clock_times_windows_exactly():
    clock = ManualClock(10.0)
    meter = EnergyMeter([CpuTimeBackend(3.5)], clock=clock)
    with meter.window("outer") as outer:
        clock.t_s = 12.5
        with meter.window("inner") as inner:
            clock.t_s = 13.0
            assert inner.read().duration_s == 0.5
            clock.t_s = 14.0
        clock.t_s = 20.0
    assert (outer.result.duration_s, inner.result.duration_s) == (10.0, 1.5)
    assert inner.result.devices[0].duration_s == 1.5
    assert outer.read() is outer.result  # read() of a closed window is its final reading


def test_a_window_prints_nothing(capfd):
    meter, _ = fake_gpu_meter()
    with meter.window("quiet") as w:
        pass
    w.result.to_dict()
    assert capfd.readouterr() == ("", "")


# --- results -------------------------------------------------------------------------------------------

def test_round_trip_and_json():
    r = EnergyResult("train", 12.345678901234567, (
        DeviceEnergy("gpu:0 GPU-x", 1234.5678901234567, "measured:nvml", kind="gpu", index=0, uuid="GPU-x",
                     flags=("contended",)),
        DeviceEnergy("cpu:package-0", 0.1 + 0.2, "measured:rapl", "counter wrapped 1 time (corrected)",
                     kind="cpu", index=0, uuid="intel-rapl:0", flags=("below_resolution",)),
        DeviceEnergy("cpu:dram-0", 2.0, "measured:rapl", kind="dram", index=0, uuid="intel-rapl:0:2"),
        DeviceEnergy("gpu:1 GPU-y", None, "unavailable", "energy counter not supported", kind="gpu", index=1),
    ), node="node-a")
    d = r.to_dict()
    back = EnergyResult.from_dict(json.loads(json.dumps(d)))
    assert back == r
    assert back.energy_j == r.energy_j == 1234.5678901234567 + (0.1 + 0.2) + 2.0
    assert d["method"] == "measured:nvml+measured:rapl"
    assert d["avg_power_w"] == pytest.approx(r.energy_j / 12.345678901234567)
    assert d["node"] == "node-a" and d["flags"] == ["below_resolution", "contended"]
    assert d["energy_by_kind_j"] == {"gpu": 1234.5678901234567, "cpu": 0.1 + 0.2, "dram": 2.0}
    assert d["scope"] == ("GPU board (NVML) + CPU package (RAPL) + DRAM (RAPL); excludes PSU losses, fans, "
                          "network, other nodes; unknown: gpu:1 GPU-y")
    gpu0 = d["devices"][0]
    assert gpu0 == {"device": "gpu:0 GPU-x", "kind": "gpu", "index": 0, "uuid": "GPU-x",
                    "energy_j": 1234.5678901234567, "duration_s": 12.345678901234567,
                    "avg_power_w": 1234.5678901234567 / 12.345678901234567, "method": "measured:nvml",
                    "flags": ["contended"], "note": ""}
    assert d["devices"][3]["energy_j"] is None and d["devices"][3]["avg_power_w"] is None


def test_older_records_still_load():
    old = {"name": "train", "duration_s": 2.0, "energy_j": 7.0, "avg_power_w": 3.5, "method": "estimated:cpu-time",
           "devices": [{"device": "cpu:process-tree", "energy_j": 7.0, "method": "estimated:cpu-time",
                        "note": "3.5 W/core x 2.000 cpu-s"}]}
    r = EnergyResult.from_dict(old)
    assert (r.energy_j, r.node, r.devices[0].kind, r.devices[0].duration_s) == (7.0, "", "other", 2.0)


def test_scope_of_an_estimate_and_by_kind():
    r = EnergyResult("w", 2.0, (DeviceEnergy("cpu:process-tree", 7.0, "estimated:cpu-time",
                                             "3.5 W/core x 2.000 cpu-s", kind="cpu-estimate"),))
    assert r.scope == ("CPU time of this process tree x 3.5 W/core (estimate); excludes GPU, DRAM, "
                       "PSU losses, fans, network, other nodes")
    assert r.energy_by_kind() == {"gpu": None, "cpu": 7.0, "dram": None}
    with pytest.raises(ValueError, match="kind"):
        DeviceEnergy("x", 1.0, "measured:x", kind="tpu")


def test_below_resolution_rule():
    res = Resolution(energy_j=1e-3, update_period_s=0.1)
    assert not res.below(0.1, 1.0)             # exactly 100 x resolution over exactly 10 updates
    assert res.below(0.0999, 1.0) and res.below(5.0, 0.999)
    meter = EnergyMeter([CpuTimeBackend(3.5)])
    with meter.window("blink") as w:
        pass
    assert w.result.flags == (BELOW_RESOLUTION,)


def test_combine_nodes():
    a = EnergyResult("train", 10.0, (DeviceEnergy("gpu:0 GPU-a", 1000.0, "measured:nvml", kind="gpu", index=0),
                                     DeviceEnergy("cpu:package-0", 200.0, "measured:rapl", kind="cpu")), node="a")
    b = EnergyResult("train", 12.0, (DeviceEnergy("gpu:0 GPU-b", 1500.0, "measured:nvml", kind="gpu", index=0,
                                                  flags=("contended",)),), node="b")
    job = combine_nodes("train", [a, b])
    assert job.node == "a+b" and job.nodes == ("a", "b")
    assert job.duration_s == 12.0 and job.energy_j == 2700.0
    assert [d.device for d in job.devices] == ["a/gpu:0 GPU-a", "a/cpu:package-0", "b/gpu:0 GPU-b"]
    assert [d.duration_s for d in job.devices] == [10.0, 10.0, 12.0]   # each device keeps its node's window
    assert job.devices[0].avg_power_w == 100.0
    assert job.energy_by_kind() == {"gpu": 2500.0, "cpu": 200.0, "dram": None}
    assert job.flags == ("contended",)
    assert job.scope.startswith("2 nodes (a, b): GPU board (NVML) + CPU package (RAPL); excludes DRAM")
    assert "other nodes" not in job.scope
    assert EnergyResult.from_dict(json.loads(json.dumps(job.to_dict()))) == job
    assert a.devices[0].device == "gpu:0 GPU-a"  # the per-node records are unchanged
    with pytest.raises(ValueError, match="once"):
        combine_nodes("train", [a, a])
    with pytest.raises(ValueError):
        combine_nodes("train", [])


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


# --- make_meter ----------------------------------------------------------------------------------------

def test_make_meter_cpu_time_and_auto_without_hardware(monkeypatch, tmp_path):
    (cpu,) = make_meter(EnergyConfig(backend="cpu-time", cpu_watts_per_core=7.0)).backends
    assert cpu.watts_per_core == 7.0
    monkeypatch.setattr(rapl_module, "DEFAULT_ROOT", str(tmp_path / "none"))

    def no_nvml(*args, **kwargs):
        raise EnergyUnavailableError("NVML did not initialise: test")

    monkeypatch.setattr("wattflow.energy.NvmlBackend", no_nvml)
    with pytest.raises(EnergyUnavailableError, match="absent"):
        make_meter(EnergyConfig(backend="rapl"))
    meter = make_meter(EnergyConfig(backend="auto"))
    assert meter.method_summary == "estimated:cpu-time"
    assert any("NVML" in n for n in meter.notes) and any("estimated" in n for n in meter.notes)


def test_make_meter_fake_nvml(monkeypatch, tmp_path):
    monkeypatch.setattr(rapl_module, "DEFAULT_ROOT", str(tmp_path / "none"))
    meter = make_meter(EnergyConfig(backend="fake-nvml"))
    assert meter.method_summary == "estimated:cpu-time+simulated:nvml"
    with meter.window("w") as w:
        time.sleep(0.01)
    assert [d.kind for d in w.result.devices] == ["gpu", "cpu-estimate"]

    def mig_fake():
        fake = FakeNvml()
        fake.mig_mode[0] = 1
        return fake

    monkeypatch.setattr("wattflow.energy.FakeNvml", mig_fake)
    meter = make_meter(EnergyConfig(backend="fake-nvml"))
    assert any("MIG mode is enabled" in n for n in meter.notes)
    assert meter.method_summary == "estimated:cpu-time"   # the GPU stays, reported unavailable


# --- carbon --------------------------------------------------------------------------------------------

def test_co2e_is_kwh_times_intensity_times_pue():
    assert carbon_g is co2e_g
    assert j_to_kwh(3.6e6) == 1.0 and j_to_kwh(1.8e6) == 0.5
    assert co2e_g(7.2e6, 400.0, 1.5) == 2.0 * 400.0 * 1.5


def test_carbon_arithmetic():
    assert carbon_g(3.6e6, 475.0, 1.0) == pytest.approx(475.0)        # 1 kWh
    assert carbon_g(7.2e6, 400.0, 1.5) == pytest.approx(1200.0)       # 2 kWh x 400 g/kWh x 1.5
    assert carbon_g(0.0, 475.0, 1.2) == 0.0
    assert carbon_g(None, 475.0, 1.2) is None
    with pytest.raises(ValueError):
        carbon_g(1.0, 475.0, 0.9)
