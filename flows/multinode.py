"""Multi-node training through Prefect: one `train-node` flow run per node, each a torchrun node.

    wattflow-multinode-train(config, nnodes=2, out_dir=/shared/run-1)      (the coordinator, below)
      ├─ hosts the c10d rendezvous store on <rdzv_host>:<free port> for the job's lifetime
      ├─ run_deployment("wattflow-train-node/train-node", node_rank=i, ...)  for i in 0..nnodes-1
      │     each on whichever worker of the pool picks it up:
      │     torchrun --nnodes N --node-rank i --rdzv-backend c10d --rdzv-endpoint host:port --rdzv-id <run>
      │     inside that node's energy meter, then writes <out_dir>/node-<i>.json
      └─ waits for all (a failed node cancels the others), sums the node energy once, and returns a
         StageResult for the checkpoint of the node that held global rank 0; the pipeline continues on it.

`out_dir` must be storage every node and the coordinator can read (NFS, a shared volume): node records and
rank 0's checkpoint are exchanged as files. The coordinator, not a node, serves the rendezvous store, because
it cannot know which worker will pick up which node; a node on the same host finds the port taken and joins
as a client (torch's c10d backend does so by itself). torch's TCPStore listens on every interface: keep the
port range inside the cluster's network. Which node gets global rank 0 is decided by the rendezvous
(torchrun ignores --node-rank with c10d), so rank 0 is found from the records (`holds_rank0`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.states import Cancelling
from torch.distributed import TCPStore

from tasks.concurrency import measured_slot
from wattflow.config import PipelineConfig
from wattflow.distributed import Rendezvous, launch_training
from wattflow.energy import EnergyResult, combine_nodes, make_meter
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


@flow(name="wattflow-train-node")
def train_node(config: PipelineConfig, nnodes: int, node_rank: int, endpoint: str, run_id: str, out_dir: str,
               hold_slot: bool = True) -> dict:
    """One node of a multi-node training job: its torchrun inside this node's energy meter. Writes and
    returns the node record: the TrainOutput, the host, and the node's energy record."""
    logger = get_run_logger()
    meter = make_meter(config.energy)
    rendezvous = Rendezvous(nnodes=nnodes, node_rank=node_rank, endpoint=endpoint, run_id=run_id)
    # Nodes sharing a host share its slots: only the first to arrive takes them, or they would wait for each
    # other while the rendezvous waits for them all.
    hold = hold_slot and first_node_on_host(endpoint, run_id)
    # Measured once per node around the launch: the counters are device-wide, never per rank.
    with (measured_slot(logger.info) if hold else nullcontext()), meter.window("train") as window:
        out = launch_training(config, Path(out_dir) / f"node-{node_rank}", logger.info, rendezvous=rendezvous)
    record = {"node_rank": node_rank, "host": socket.gethostname(), "train": dataclasses.asdict(out),
              "energy": window.result.to_dict()}
    path = node_record_path(out_dir, node_rank)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)  # atomic: the coordinator never reads half a record
    logger.info("node %d of %d done (world size %d, holds rank 0: %s); %s", node_rank, nnodes, out.world_size,
                out.holds_rank0, window.result.summary())
    return record


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


@flow(name="wattflow-multinode-train")
def multinode_train(config: PipelineConfig, nnodes: int, out_dir: str, deployment: str = NODE_DEPLOYMENT,
                    rdzv_host: str | None = None) -> StageResult:
    """Train on `nnodes` nodes of the pool (one train-node run each) and return rank 0's StageResult."""
    logger = get_run_logger()
    return train_multinode(config, nnodes, out_dir, deployment=deployment, rdzv_host=rdzv_host, log=logger.info)
