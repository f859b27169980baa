"""NVML against FakeNvml: scripted counters, the power-integral fallback, counter resets, MIG, contention,
UUID/index mapping and the sampling thread's lifetime. Deterministic tests share a manual clock between
the fake GPU and the meter and drive the sampler by calling `poll()`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from wattflow.energy import BELOW_RESOLUTION, CONTENDED, COUNTER_RESET, EnergyMeter, FakeNvml, NvmlBackend

NO_THREAD_POLLS_S = 3600.0  # a sample period so long that only the window edges and the test sample


class ManualClock:
    def __init__(self, t_s: float = 100.0):
        self.t_s = t_s

    def __call__(self) -> float:
        return self.t_s


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "wattflow-energy-nvml"]


@pytest.fixture(autouse=True)
def _all_gpus_visible_and_no_leaked_threads(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield
    assert not [t.name for t in threading.enumerate() if t.name.startswith("wattflow-energy")]


def manual_gpu(device_count: int = 1, **knobs) -> tuple[FakeNvml, NvmlBackend, EnergyMeter, ManualClock]:
    """A 50 W fake GPU on a manual clock; `knobs` set FakeNvml's per-device lists before the backend probes."""
    clock = ManualClock()
    fake = FakeNvml(power_w=50.0, device_count=device_count, clock=clock)
    for name, value in knobs.items():
        setattr(fake, name, value)
    backend = NvmlBackend(fake, simulated=True, sample_period_s=NO_THREAD_POLLS_S, clock=clock)
    return fake, backend, EnergyMeter([backend], clock=clock), clock


def test_scripted_counter_gives_exact_joules():
    fake, _, meter, clock = manual_gpu(counter_mj=[[1_000, 3_500]])   # the two edges
    with meter.window("w") as w:
        clock.t_s += 2.0
    (gpu,) = w.result.devices
    assert (gpu.energy_j, gpu.method, gpu.duration_s, gpu.avg_power_w) == (2.5, "simulated:nvml", 2.0, 1.25)
    assert gpu.flags == () and gpu.note == ""
    assert fake.counter_reads[0] == 2


@pytest.mark.parametrize(("counter_mj", "duration_s", "flagged"), [
    ([0, 2_500], 2.0, False),
    ([0, 99], 2.0, True),          # 0.099 J < 100 x 1 mJ
    ([0, 2_500], 0.99, True),      # shorter than 10 counter updates (0.1 s each)
])
def test_counter_below_resolution(counter_mj, duration_s, flagged):
    fake, _, meter, clock = manual_gpu(counter_mj=[counter_mj])
    with meter.window("w") as w:
        clock.t_s += duration_s
    assert (BELOW_RESOLUTION in w.result.flags) is flagged


def test_unsupported_counter_integrates_instantaneous_power_by_trapezoid():
    # Power reads: the probe when built, the start edge, one poll, the end edge.
    fake, backend, meter, clock = manual_gpu(supported=[False], power_mw=[[0, 100_000, 200_000, 100_000]])
    assert backend.methods == {"simulated:nvml-power"}
    with meter.window("w") as w:
        clock.t_s += 1.0
        backend.poll()
        clock.t_s += 1.0
    (gpu,) = w.result.devices
    assert gpu.energy_j == pytest.approx(150.0 + 150.0, abs=1e-9)   # (100+200)/2 x 1 s + (200+100)/2 x 1 s
    assert gpu.method == "simulated:nvml-power" and COUNTER_RESET not in gpu.flags
    assert "not supported" in gpu.note and "integrated instantaneous power" in gpu.note


def test_the_power_integral_runs_on_the_backends_clock_only():
    # NVML stamps samples in wall-clock µs (some drivers 0) and Zeus passes no stamp on: the integral is timed by
    # the backend's monotonic clock alone, so a GPU-side clock that jumps cannot integrate over decades.
    fake_clock = ManualClock(1_764_000_000.0)
    fake = FakeNvml(power_w=50.0, clock=fake_clock)
    fake.supported[0] = False
    fake.power_mw[0] = [100_000]
    clock = ManualClock()
    backend = NvmlBackend(fake, simulated=True, sample_period_s=NO_THREAD_POLLS_S, clock=clock)
    with EnergyMeter([backend], clock=clock).window("w") as w:
        clock.t_s += 1.0
        fake_clock.t_s = 0.0
        backend.poll()
        clock.t_s += 1.0
    (gpu,) = w.result.devices
    assert gpu.energy_j == pytest.approx(200.0)   # 100 W x 2 s


def test_power_integral_with_the_real_sampling_thread_matches_power_times_duration():
    fake = FakeNvml(power_w=120.0)
    fake.supported[0] = False
    backend = NvmlBackend(fake, simulated=True, sample_period_s=0.01)
    assert not sampler_threads()
    with EnergyMeter([backend]).window("w") as w:
        time.sleep(0.3)
        (thread,) = sampler_threads()
        assert thread.daemon
    (gpu,) = w.result.devices
    assert gpu.method == "simulated:nvml-power"
    assert gpu.energy_j == pytest.approx(120.0 * w.result.duration_s, rel=0.03)
    assert fake.power_reads[0] > 10   # the thread sampled, not only the edges


def test_counter_reset_is_flagged_and_that_window_uses_the_power_integral():
    fake, _, meter, clock = manual_gpu(counter_mj=[[5_000, 100, 200, 2_200]])   # down: driver reload
    with meter.window("w") as w:
        clock.t_s += 2.0
    (gpu,) = w.result.devices
    # Only the two edge samples (no thread polls here): fewer than 10 sample periods, so below resolution.
    assert gpu.flags == (BELOW_RESOLUTION, COUNTER_RESET)
    assert (gpu.energy_j, gpu.method) == (pytest.approx(100.0), "simulated:nvml-power")   # 50 W x 2 s
    assert "went down" in gpu.note
    with meter.window("next") as w2:   # the next window is back on the counter
        clock.t_s += 2.0
    assert (w2.result.energy_j, w2.result.devices[0].method, w2.result.flags) == (2.0, "simulated:nvml", ())


def test_counter_reset_without_power_is_unavailable_and_flagged():
    fake, _, meter, clock = manual_gpu(power_supported=[False], counter_mj=[[5_000, 100]])
    with meter.window("w") as w:
        clock.t_s += 2.0
    (gpu,) = w.result.devices
    assert (gpu.energy_j, gpu.method, gpu.flags) == (None, "unavailable", (COUNTER_RESET,))
    assert "went down" in gpu.note and "NVML_FI_DEV_POWER_INSTANT" in gpu.note
    assert w.result.energy_j is None


def test_uuid_and_index_mapping(monkeypatch):
    uuids = ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000", "GPU-cccc3333-0000"]
    fake = FakeNvml(device_count=3, uuids=uuids)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-cccc,0")
    meter = EnergyMeter([NvmlBackend(fake, simulated=True, sample_period_s=NO_THREAD_POLLS_S)])
    with meter.window("w") as w:
        pass
    assert [(d.kind, d.index, d.uuid, d.device) for d in w.result.devices] == [
        ("gpu", 2, "GPU-cccc3333-0000", "gpu:2 GPU-cccc3333-0000"),
        ("gpu", 0, "GPU-aaaa1111-0000", "gpu:0 GPU-aaaa1111-0000")]


def test_mig_enabled_gpu_is_unavailable_with_the_reason():
    fake, backend, meter, clock = manual_gpu(3, mig_mode=[1, 0, None])   # enabled, disabled, no MIG support
    assert backend.methods == {"simulated:nvml"}
    with meter.window("w") as w:
        clock.t_s += 2.0
    mig, plain, old = w.result.devices
    assert (mig.energy_j, mig.method, mig.index) == (None, "unavailable", 0)
    assert "MIG mode is enabled" in mig.note
    assert plain.method == old.method == "simulated:nvml"
    assert "unknown: gpu:0" in w.result.scope


def test_a_mig_device_in_cuda_visible_devices_names_its_parent_gpu_reported_unavailable(monkeypatch):
    fake = FakeNvml(device_count=2)
    fake.mig_mode = [0, 1]
    fake.mig_uuids[1] = ["MIG-1111aaaa-0000", "MIG-2222bbbb-0000"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-2222bbbb")
    backend = NvmlBackend(fake, simulated=True, sample_period_s=NO_THREAD_POLLS_S)
    with EnergyMeter([backend]).window("w") as w:
        pass
    (gpu,) = w.result.devices
    assert (gpu.index, gpu.uuid, gpu.energy_j, gpu.method) == (1, fake.uuids[1], None, "unavailable")
    assert "MIG mode is enabled" in gpu.note   # whole-GPU figures cannot be split between its instances


def test_foreign_processes_flag_the_gpu_contended():
    fake, _, meter, clock = manual_gpu(device_count=3)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    others = sorted({1, os.getppid()})  # processes that exist here and are not ours
    try:
        fake.processes[0] = [os.getpid(), others[-1]]
        fake.graphics_processes[0] = [others[0]]
        fake.processes[1] = [os.getpid(), child.pid]    # our own descendant: not foreign
        fake.processes[2] = [os.getpid(), 4_000_000]    # no such pid here: NVML sees another PID namespace
        with meter.window("w") as w:
            clock.t_s += 2.0
    finally:
        child.kill()
        child.wait()
    busy, ours, container = w.result.devices
    assert busy.flags == (CONTENDED,) and f"pids {', '.join(map(str, others))}" in busy.note
    assert busy.method == "simulated:nvml" and busy.energy_j is not None
    assert ours.flags == () and ours.note == ""
    # In a container without the host's PID namespace NVML lists host pids: not "contended", but said
    assert container.flags == () and "cannot tell whether other processes used this GPU" in container.note
    assert container.energy_j is not None


def test_an_old_drivers_process_query_does_not_break_the_window():
    fake, _, meter, clock = manual_gpu(library_mismatch=True)   # the versioned query this driver lacks
    with meter.window("w") as w:
        clock.t_s += 2.0
    (gpu,) = w.result.devices
    assert gpu.energy_j == pytest.approx(100.0) and CONTENDED not in gpu.flags   # 50 W x 2 s


def test_a_rank_that_exits_during_the_window_is_still_ours():
    fake, _, meter, clock = manual_gpu()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    fake.processes[0] = [child.pid]
    with meter.window("w") as w:         # the start edge sees it in this process tree
        child.kill()
        child.wait()
        clock.t_s += 1.0                 # NVML still lists it at the end edge (the driver lags the exit)
    (gpu,) = w.result.devices
    assert gpu.flags == () and gpu.note == ""


def test_contention_belongs_to_the_windows_it_overlapped():
    fake, _, meter, clock = manual_gpu()
    with meter.window("outer") as outer:
        fake.processes[0] = [os.getppid()]
        with meter.window("first") as first:
            clock.t_s += 1.0
        fake.processes[0] = []
        with meter.window("second") as second:
            clock.t_s += 1.0
    assert CONTENDED in first.result.flags and CONTENDED in outer.result.flags
    assert CONTENDED not in second.result.flags


def test_sampler_is_reference_counted_across_nested_windows():
    fake = FakeNvml()
    meter = EnergyMeter([NvmlBackend(fake, simulated=True, sample_period_s=0.01)])
    with meter.window("outer"):
        with meter.window("inner"):
            assert len(sampler_threads()) == 1
        assert len(sampler_threads()) == 1   # the outer window still needs it
    assert not sampler_threads()
    with meter.window("again"):
        assert len(sampler_threads()) == 1
    assert not sampler_threads()


def test_nvml_init_once_per_module():
    fake = FakeNvml()
    NvmlBackend(fake, simulated=True)
    NvmlBackend(fake, simulated=True)
    assert fake.init_calls == 1


def test_zeus_nvidiagpu_itself_reads_through_the_fake(monkeypatch):
    # The real path: Zeus's NVIDIAGPU (its NVML calls, its error mapping) over FakeNvml in place of pynvml.
    from zeus.device.gpu import nvidia
    clock = ManualClock()
    fake = FakeNvml(power_w=50.0, device_count=2, clock=clock)
    fake.supported[1] = False                   # pre-Volta: Zeus says no counter, wattflow integrates power
    monkeypatch.setattr(nvidia, "pynvml", fake)
    backend = NvmlBackend(fake, simulated=True, sample_period_s=NO_THREAD_POLLS_S, clock=clock,
                          zeus_gpu=nvidia.NVIDIAGPU)
    assert all(isinstance(g.reader, nvidia.NVIDIAGPU) for g in backend.devices)
    with EnergyMeter([backend], clock=clock).window("w") as w:
        clock.t_s += 2.0
    counter, power = w.result.devices
    assert (counter.energy_j, counter.method) == (pytest.approx(100.0), "simulated:nvml")   # 50 W x 2 s
    assert (power.energy_j, power.method) == (pytest.approx(100.0), "simulated:nvml-power")
    assert "not supported" in power.note


def test_an_nvml_error_reaches_the_record_as_zeus_maps_it(monkeypatch):
    from zeus.device.gpu import nvidia
    clock = ManualClock()
    fake = FakeNvml(power_w=50.0, clock=clock)
    monkeypatch.setattr(nvidia, "pynvml", fake)
    backend = NvmlBackend(fake, simulated=True, sample_period_s=NO_THREAD_POLLS_S, clock=clock,
                          zeus_gpu=nvidia.NVIDIAGPU)
    fake.power_supported[0] = False              # the counter then fails too: nothing left to give a figure
    fake.supported[0] = False
    with EnergyMeter([backend], clock=clock).window("w") as w:
        clock.t_s += 1.0
    (gpu,) = w.result.devices
    assert (gpu.energy_j, gpu.method) == (None, "unavailable")
    assert "energy counter read failed: Not Supported" in gpu.note and "power read failed" in gpu.note


def test_a_gpu_zeus_cannot_open_is_unavailable_with_the_reason_and_the_others_still_measure():
    fake = FakeNvml(device_count=2)

    def zeus_gpu(index):
        if index == 0:
            raise RuntimeError("GPU is lost")
        return fake.zeus_gpu(index)

    backend = NvmlBackend(fake, simulated=True, sample_period_s=NO_THREAD_POLLS_S, zeus_gpu=zeus_gpu)
    with EnergyMeter([backend]).window("w") as w:
        pass
    lost, fine = w.result.devices
    assert (lost.energy_j, lost.method) == (None, "unavailable") and "GPU is lost" in lost.note
    assert fine.method == "simulated:nvml"
