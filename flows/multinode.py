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
The coordinator's code lives in tasks/multinode.py (the training task calls it; tasks never import flows).
"""

from __future__ import annotations

import dataclasses
import json
import socket
from contextlib import nullcontext
from pathlib import Path

from prefect import flow, get_run_logger

from tasks.concurrency import measured_slot, reads_host_counters
from tasks.multinode import NODE_DEPLOYMENT, first_node_on_host, node_record_path, train_multinode
from wattflow.config import PipelineConfig
from wattflow.distributed import Rendezvous, launch_training
from wattflow.energy import make_meter
from wattflow.stages import StageResult, metered_gpus


@flow(name="wattflow-train-node")
def train_node(config: PipelineConfig, nnodes: int, node_rank: int, endpoint: str, run_id: str, out_dir: str,
               hold_slot: bool = True) -> dict:
    """One node of a multi-node training job: its torchrun inside this node's energy meter. Writes and
    returns the node record: the TrainOutput, the host, and the node's energy record."""
    logger = get_run_logger()
    meter = make_meter(config.energy, metered_gpus(config, "train"))
    rendezvous = Rendezvous(nnodes=nnodes, node_rank=node_rank, endpoint=endpoint, run_id=run_id)
    # Nodes sharing a host share its slots: only the first to arrive takes them, or they would wait for each
    # other while the rendezvous waits for them all.
    hold = hold_slot and first_node_on_host(endpoint, run_id)
    # Measured once per node around the launch: the counters are device-wide, never per rank.
    slot = measured_slot(logger.info, host_wide=reads_host_counters(meter)) if hold else nullcontext()
    with slot, meter.window("train") as window:
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


@flow(name="wattflow-multinode-train")
def multinode_train(config: PipelineConfig, nnodes: int, out_dir: str, deployment: str = NODE_DEPLOYMENT,
                    rdzv_host: str | None = None) -> StageResult:
    """Train on `nnodes` nodes of the pool (one train-node run each) and return rank 0's StageResult."""
    logger = get_run_logger()
    return train_multinode(config, nnodes, out_dir, deployment=deployment, rdzv_host=rdzv_host, log=logger.info)
