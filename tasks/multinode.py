"""The multi-node coordinator that the training task runs when train.nnodes > 1 (see flows/multinode.py for the
whole picture): it serves the rendezvous store, starts one `train-node` deployment run per node, waits for them
and combines their records."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.states import Cancelling
from torch.distributed import TCPStore

from wattflow.config import PipelineConfig
from wattflow.energy import EnergyResult, combine_nodes
from wattflow.stages import Artifact, StageResult

NODE_DEPLOYMENT = "wattflow-train-node/train-node"
LOOPBACK = ("127.0.0.1", "localhost")
# Node runs may wait this long for a worker, on top of train.timeout_s, before the job is given up.
START_TIMEOUT_S = 600.0


def node_record_path(out_dir: str | Path, node_rank: int) -> Path:
    return Path(out_dir) / f"node-{node_rank}.json"


def first_node_on_host(endpoint: str, run_id: str) -> bool:
    """Counts this job's nodes per host on the coordinator's store (the rendezvous store)."""
    host, port = endpoint.rsplit(":", 1)
    store = TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=60))
    return store.add(f"wattflow/{run_id}/host/{socket.gethostname()}", 1) == 1


def node_energy(records: list[dict]) -> list[EnergyResult]:
    """Each node's energy, once. Nodes sharing a host (one-box drills) both read the host's device-global
    counters (NVML, RAPL), so only one of them counts; process-tree estimates are per node and all count."""
    kept: dict[str, EnergyResult] = {}
    for rec in sorted(records, key=lambda r: r["node_rank"]):
        energy = EnergyResult.from_dict(rec["energy"])
        per_process = all(d.kind == "cpu-estimate" for d in energy.devices)
        if energy.node not in kept:
            kept[energy.node] = energy
        elif per_process:
            name = f"{energy.node}#node-{rec['node_rank']}"
            kept[name] = dataclasses.replace(energy, node=name)
    return list(kept.values())


def stage_result(config: PipelineConfig, records: list[dict]) -> StageResult:
    """The StageResult of the job: rank 0's checkpoint and metrics, and the nodes' energy summed once."""
    holders = [r for r in records if r["train"]["holds_rank0"]]
    if len(holders) != 1:
        raise RuntimeError(f"expected exactly one node holding global rank 0, got {len(holders)}: "
                           f"{[r['node_rank'] for r in holders]}")
    world_sizes = {r["train"]["world_size"] for r in records}
    if len(world_sizes) != 1:
        raise RuntimeError(f"the nodes disagree on the world size ({sorted(world_sizes)}): not one process group")
    rank0 = holders[0]["train"]
    energy = combine_nodes("train", node_energy(records))
    return StageResult(
        name="train", stage="train", chain=["train"],
        artifact=Artifact(path=rank0["checkpoint"], format="torch", sha256=rank0["sha256"]),
        params={"model": config.train.model, "world_size": rank0["world_size"], "device": rank0["device"],
                "nnodes": len(records), "rank0_node": holders[0]["host"]},
        metrics={"val_accuracy": rank0["metrics"]["val_accuracy"], "samples_seen": rank0["samples_seen"],
                 "train_duration_s": rank0["metrics"]["train_duration_s"],
                 "restarts": max(r["train"]["restarts"] for r in records)},
        energy=energy.to_dict())


def _cancel(client, runs: list, reason: str) -> None:
    for run in runs:
        state = client.read_flow_run(run.id).state
        if state is None or not state.is_final():
            client.set_flow_run_state(run.id, Cancelling(message=reason), force=True)


def wait_for_nodes(runs: list, deadline_s: float, log: Callable[[str], None], poll_s: float = 2.0) -> None:
    """Poll the node runs until all completed; on the first that failed (or the deadline), cancel the rest
    and raise, naming the run and its state."""
    with get_client(sync_client=True) as client:
        while True:
            states = {run.name: client.read_flow_run(run.id).state for run in runs}
            bad = {name: s for name, s in states.items() if s is not None and s.is_final() and not s.is_completed()}
            if bad:
                _cancel(client, runs, f"another node failed: {', '.join(bad)}")
                raise RuntimeError("multi-node training failed: " + "; ".join(
                    f"{name} is {s.name} ({s.message or 'no message'})" for name, s in bad.items())
                    + " — the other nodes were cancelled; see each node run's log in the Prefect UI")
            if all(s is not None and s.is_completed() for s in states.values()):
                return
            if time.monotonic() > deadline_s:
                _cancel(client, runs, "multi-node training timed out")
                waiting = [name for name, s in states.items() if s is None or s.is_scheduled() or s.is_pending()]
                raise TimeoutError(f"multi-node training did not finish in time; still waiting for a worker: "
                                   f"{waiting or 'none'} — is a worker running on the deployment's pool?")
            time.sleep(poll_s)


def train_multinode(config: PipelineConfig, nnodes: int, out_dir: str | Path, *,
                    deployment: str = NODE_DEPLOYMENT, rdzv_host: str | None = None,
                    log: Callable[[str], None] = print, poll_s: float = 2.0) -> StageResult:
    """Train on `nnodes` nodes through the `deployment` (train-node) and return the job's StageResult.
    Callable from the pipeline's train task. `rdzv_host`: an address of this host every node can reach
    (default $WATTFLOW_RDZV_HOST, else this host's FQDN; 127.0.0.1 when all nodes run on this host)."""
    if nnodes < 1:
        raise ValueError(f"nnodes must be at least 1, got {nnodes}")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("node-*.json"):
        stale.unlink()
    host = rdzv_host or os.environ.get("WATTFLOW_RDZV_HOST") or socket.getfqdn()
    store = TCPStore(host, 0, is_master=True, wait_for_workers=False)  # port 0: the OS picks a free one
    endpoint, run_id = f"{host}:{store.port}", f"wattflow-{uuid.uuid4().hex[:12]}"
    # Nodes on this one host would wait for each other's cpu:<host> slot while the rendezvous waits for them.
    hold_slot = host not in LOOPBACK
    log(f"multi-node training {run_id}: {nnodes} node(s) via {deployment}, rendezvous {endpoint}, "
        f"records in {out_dir}" + ("" if hold_slot else "; one-host drill: nodes hold no measured-stage slot"))
    in_flow = FlowRunContext.get() is not None
    runs = [run_deployment(deployment, timeout=0, as_subflow=in_flow, flow_run_name=f"{run_id}-node-{i}",
                           parameters={"config": config.model_dump(mode="json"), "nnodes": nnodes,
                                       "node_rank": i, "endpoint": endpoint, "run_id": run_id,
                                       "out_dir": str(out_dir), "hold_slot": hold_slot})
            for i in range(nnodes)]
    try:
        wait_for_nodes(runs, time.monotonic() + config.train.timeout_s + START_TIMEOUT_S, log, poll_s)
    finally:
        del store  # the rendezvous is over either way; stop serving it
    records = [json.loads(node_record_path(out_dir, i).read_text()) for i in range(nnodes)]
    result = stage_result(config, records)
    log(f"multi-node training {run_id} done: world size {result.params['world_size']}, rank 0 on "
        f"{result.params['rank0_node']}; {result.energy_result.summary()}")
    return result


