"""Two torchrun nodes joined by a c10d rendezvous on 127.0.0.1, one Gloo rank each, launched the way two
Prefect workers would: two `launch_training` calls at once, each into its own directory."""

import json
import threading
import uuid

import pytest

from wattflow.config import PipelineConfig
from wattflow.distributed import Rendezvous, free_port, launch_training, torchrun_command
from wattflow.models import load_checkpoint

pytestmark = pytest.mark.integration  # starts torchrun ranks or servers: not in make test-fast


def test_multi_node_command_uses_the_c10d_rendezvous(tmp_path):
    rdzv = Rendezvous(nnodes=2, node_rank=1, endpoint="10.0.0.5:29400", run_id="run-7")
    cmd = torchrun_command(tmp_path / "job.json", 4, max_restarts=3, rendezvous=rdzv)
    assert "--standalone" not in cmd
    for arg in ("--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.5:29400",
                "--rdzv-id=run-7", "--nproc-per-node=4", "--max-restarts=3"):
        assert arg in cmd


def test_two_nodes_form_one_process_group(tmp_path):
    cfg = PipelineConfig.model_validate({"train": {"model": "mlp", "epochs": 3, "lr": 0.1, "cpu_ranks": 1,
                                                   "timeout_s": 180}})
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"test-{uuid.uuid4().hex[:8]}"
    outputs, errors = {}, {}

    def node(node_rank: int) -> None:
        try:
            outputs[node_rank] = launch_training(cfg, tmp_path / f"node{node_rank}", lambda _: None,
                                                 rendezvous=Rendezvous(2, node_rank, endpoint, run_id))
        except Exception as err:  # surfaced below, in the test's thread
            errors[node_rank] = err

    threads = [threading.Thread(target=node, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert sorted(outputs) == [0, 1] and [outputs[i].node_rank for i in (0, 1)] == [0, 1]
    assert all(out.world_size == 2 for out in outputs.values())
    # The rendezvous, not node_rank, decides which node holds global rank 0: exactly one does.
    holders = [i for i, out in outputs.items() if out.holds_rank0]
    assert len(holders) == 1
    leader, follower = outputs[holders[0]], outputs[1 - holders[0]]
    assert follower.checkpoint is None and follower.metrics == {}
    assert not (tmp_path / f"node{1 - holders[0]}" / "model.pt").exists()
    _, _, meta = load_checkpoint(leader.checkpoint, expected_sha256=leader.sha256)
    assert meta["world_size"] == 2 and leader.metrics["val_accuracy"] > 0.8

    ranks = {}
    for i in (0, 1):
        files = list((tmp_path / f"node{i}").glob("rank-*.json"))
        assert len(files) == 1  # one rank per node, each writing into its own node's directory
        info = json.loads(files[0].read_text())
        ranks[info["rank"]] = info
    assert sorted(ranks) == [0, 1] and all(r["world_size"] == 2 for r in ranks.values())
    # DDP kept the two nodes' replicas identical
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-9)
    assert leader.samples_seen == follower.samples_seen == ranks[0]["samples_seen"] + ranks[1]["samples_seen"]
