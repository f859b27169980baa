"""Multi-node training through Prefect, for real: two process workers on one pool, the train-node deployment,
nnodes=2 with one Gloo CPU rank each, c10d rendezvous on 127.0.0.1; one process group, one result."""

from __future__ import annotations

import contextvars
import json
import threading

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings
from servers import process_worker, tail

import tasks.concurrency
from tasks.concurrency import flow_run_slots, measured_slot, reads_host_counters, slot_names
from tasks.multinode import node_energy, stage_result, train_multinode
from wattflow.config import PipelineConfig
from wattflow.energy import EnergyResult, FakeNvml
from wattflow.models import load_checkpoint, sha256_file


def tiny_config(work_dir) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "work_dir": str(work_dir), "experiment": "multinode",
        "train": {"model": "mlp", "mlp_hidden": [32], "epochs": 3, "cpu_ranks": 1, "timeout_s": 300},
        "energy": {"backend": "cpu-time"}})


def record(node_rank: int, host: str, kind: str, energy_j: float, holds_rank0: bool) -> dict:
    device = {"device": "cpu", "kind": kind, "energy_j": energy_j, "duration_s": 2.0, "method": "m",
              "flags": [], "note": ""}
    energy = {"name": "train", "node": host, "duration_s": 2.0, "devices": [device]}
    train = {"holds_rank0": holds_rank0, "world_size": 2, "checkpoint": "/shared/model.pt" if holds_rank0 else None,
             "sha256": "ab" * 32 if holds_rank0 else None, "device": "cpu", "samples_seen": 100, "restarts": 0,
             "metrics": {"val_accuracy": 0.9, "train_duration_s": 1.5} if holds_rank0 else {}}
    return {"node_rank": node_rank, "host": host, "train": train, "energy": energy}


def test_co_located_nodes_count_device_counters_once_and_process_estimates_each():
    estimates = [record(0, "box", "cpu-estimate", 5.0, False), record(1, "box", "cpu-estimate", 7.0, True)]
    assert sum(e.energy_j for e in node_energy(estimates)) == pytest.approx(12.0)
    rapl = [record(0, "box", "cpu", 50.0, False), record(1, "box", "cpu", 51.0, True)]
    assert [e.energy_j for e in node_energy(rapl)] == [50.0]  # the host's package counter, once
    cluster = [record(0, "a", "cpu", 50.0, True), record(1, "b", "cpu", 40.0, False)]
    result = stage_result(tiny_config("/tmp"), cluster)
    assert result.energy_result.energy_j == pytest.approx(90.0) and result.energy_result.nodes == ("a", "b")
    assert result.artifact.path == "/shared/model.pt" and result.params["rank0_node"] == "a"


def test_a_job_without_exactly_one_rank0_is_refused():
    with pytest.raises(RuntimeError, match="exactly one node holding global rank 0"):
        stage_result(tiny_config("/tmp"), [record(0, "a", "cpu", 1.0, False), record(1, "b", "cpu", 1.0, False)])


def test_slots_are_keyed_by_gpu_uuid_whatever_the_host_or_index(monkeypatch):
    nvml = FakeNvml(device_count=4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert slot_names("h", nvml) == [f"gpu:{u}" for u in nvml.uuids]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"2,{nvml.uuids[0][:12]}")  # an index and a UUID prefix
    assert slot_names("h", nvml) == [f"gpu:{nvml.uuids[2]}", f"gpu:{nvml.uuids[0]}"]
    # A container (own hostname) that NVML shows only GPU 2, renumbered as index 0: the same slot as the host's
    inside = FakeNvml(device_count=1, uuids=[nvml.uuids[2]])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert slot_names("container-7f3a", inside) == [f"gpu:{nvml.uuids[2]}"]
    # A MIG slice takes its parent GPU's slot: NVML's figures are the whole GPU's
    nvml.mig_mode[3], nvml.mig_uuids[3] = 1, ["MIG-3333cccc-0000"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-3333cccc-0000")
    assert slot_names("h", nvml) == [f"gpu:{nvml.uuids[3]}"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible: the host-wide slot
    assert slot_names("h", nvml) == ["cpu:h"]


def test_a_stage_whose_meter_reads_rapl_also_holds_the_host_slot(monkeypatch, tmp_path):
    """RAPL is host-wide: stages on two GPUs of one host would each be charged the other's CPU and DRAM energy."""
    from wattflow.energy import CpuTimeBackend, EnergyMeter, RaplBackend

    nvml = FakeNvml(device_count=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    on_gpu0 = slot_names("h", nvml, host_wide=True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    on_gpu1 = slot_names("h", nvml, host_wide=True)
    assert set(on_gpu0) & set(on_gpu1) == {"cpu:h"}   # they wait for each other
    assert not set(slot_names("h", nvml)) & set(on_gpu0[:1])   # NVML alone: GPU 1 does not wait for GPU 0
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    for name, value in (("name", "package-0"), ("energy_uj", "1000"), ("max_energy_range_uj", "262143328850")):
        (zone / name).write_text(value + "\n")
    assert reads_host_counters(EnergyMeter([RaplBackend(tmp_path)]))
    assert not reads_host_counters(EnergyMeter([CpuTimeBackend()]))


def holds_one_at_a_time(names: list[str]) -> list[str]:
    """Two threads enter measured_slot; the second must wait until the first leaves."""
    order: list[str] = []
    first_in, release = threading.Event(), threading.Event()

    def first():
        with measured_slot(names=names):
            order.append("first-in")
            first_in.set()
            release.wait(30)
            order.append("first-out")

    def second():
        first_in.wait(30)
        with measured_slot(names=names):
            order.append("second-in")

    # Each thread runs in a copy of this context: Prefect's settings (the server's URL) live in a contextvar.
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(fn,)) for fn in (first, second)]
    for t in threads:
        t.start()
    first_in.wait(30)
    threading.Event().wait(2.0)  # time for the second to try (and be refused) before the first leaves
    order.append("released")
    release.set()
    for t in threads:
        t.join(60)
    return order


@pytest.mark.integration
def test_two_workers_two_nodes_one_process_group(stack, tmp_path_factory):
    """On the session's stack (conftest.py); the train-node deployment is on its pool."""
    root = tmp_path_factory.mktemp("multinode")
    out_dir = root / "shared"
    # limit 1: each worker takes one node run, so the two nodes really run under two workers
    with process_worker(stack.worker_env, stack.pool, root / "worker-a.log", "worker-a", limit=1), \
            process_worker(stack.worker_env, stack.pool, root / "worker-b.log", "worker-b", limit=1), \
            temporary_settings({PREFECT_API_URL: stack.prefect.api_url}):
        try:
            result = train_multinode(tiny_config(root / "artifacts"), 2, out_dir, rdzv_host="127.0.0.1",
                                     poll_s=1.0)
        except Exception as e:
            raise AssertionError(f"{e}\nworker a:\n{tail(root / 'worker-a.log')}\n"
                                 f"worker b:\n{tail(root / 'worker-b.log')}") from e
        # measured_slot against the real server: created on first use, limit 1, one holder at a time
        assert holds_one_at_a_time(["gpu:test-host:0"]) == ["first-in", "released", "first-out", "second-in"]

    records = [json.loads((out_dir / f"node-{i}.json").read_text()) for i in (0, 1)]
    assert [r["train"]["world_size"] for r in records] == [2, 2]   # both nodes joined one process group
    # The rendezvous, not node_rank, decides which node holds global rank 0: exactly one does.
    assert sorted(r["train"]["holds_rank0"] for r in records) == [False, True]
    for name in ("worker-a", "worker-b"):
        assert (root / f"{name}.log").read_text().count("submitted to infrastructure") == 1, name
    leader, follower = sorted(records, key=lambda r: not r["train"]["holds_rank0"])
    assert follower["train"]["checkpoint"] is None and follower["train"]["metrics"] == {}
    assert not (out_dir / f"node-{follower['node_rank']}" / "model.pt").exists()
    ranks = {}
    for i in (0, 1):
        files = list((out_dir / f"node-{i}").glob("rank-*.json"))
        assert len(files) == 1  # one rank per node, each writing into its own node's directory
        info = json.loads(files[0].read_text())
        ranks[info["rank"]] = info
    assert sorted(ranks) == [0, 1] and all(r["world_size"] == 2 for r in ranks.values())
    # DDP kept the two nodes' replicas identical, and each node counts the samples of both
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-9)
    assert leader["train"]["samples_seen"] == follower["train"]["samples_seen"] == \
        ranks[0]["samples_seen"] + ranks[1]["samples_seen"]

    assert result.params["world_size"] == 2 and result.params["nnodes"] == 2
    assert sha256_file(result.artifact.path) == result.artifact.sha256   # rank 0's checkpoint, intact
    _, _, meta = load_checkpoint(result.artifact.path, expected_sha256=result.artifact.sha256)
    assert meta["world_size"] == 2
    assert 0 < result.metrics["val_accuracy"] <= 1
    energy = result.energy_result
    node_j = [EnergyResult.from_dict(r["energy"]).energy_j for r in records]
    assert energy.method == "estimated:cpu-time" and len(energy.nodes) == 2
    assert energy.energy_j == pytest.approx(sum(node_j)) and all(j > 0 for j in node_j)


def test_why_there_is_no_gpu_slot_is_said_once_per_process(monkeypatch):
    monkeypatch.setattr("tasks.concurrency._REASONS_SAID", set())
    monkeypatch.setattr("tasks.concurrency._host_slots", lambda *_: (["cpu:test-once"], "NVML unavailable (x)"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    lines: list[str] = []
    for _ in range(3):
        with measured_slot(lines.append):
            pass
    waiting = [line for line in lines if line.startswith("waiting")]
    assert waiting[0] == "waiting for measured-stage slot(s) cpu:test-once (NVML unavailable (x))"
    assert waiting[1:] == ["waiting for measured-stage slot(s) cpu:test-once"] * 2


@pytest.mark.integration
def test_a_flow_run_acquires_its_prefect_limits_once_for_all_its_measured_stages(stack, monkeypatch):
    """Per stage, each acquisition is an API call that a SQLite Prefect server answers in ~2 s after a task run's
    state changes; a flow run holds them across its stages instead, its stages taking only the file locks."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.client.orchestration import get_client

    acquired: list[list[str]] = []
    real = tasks.concurrency._prefect_limits
    monkeypatch.setattr(tasks.concurrency, "_prefect_limits",
                        lambda names, timeout_s=None: acquired.append(names) or real(names, timeout_s))
    monkeypatch.setenv("PREFECT_API_URL", stack.prefect.api_url)

    @task(cache_policy=NO_CACHE)
    def stage() -> list[str]:
        with measured_slot() as names:
            return names

    @flow
    def three_stages() -> list[str]:
        with flow_run_slots():
            return [stage() for _ in range(3)][0]

    with temporary_settings({PREFECT_API_URL: stack.prefect.api_url}):
        names = three_stages()
        with get_client(sync_client=True) as client:
            held = client.read_global_concurrency_limit_by_name(names[0]).active_slots
    assert acquired == [names] and held == 0   # once for the flow run, and released at the end
