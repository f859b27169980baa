"""The torchrun command of a node of a multi-node job. Two nodes joined by a c10d rendezvous on 127.0.0.1, one
Gloo rank each, really train as one process group under two Prefect workers in test_multinode.py."""

from wattflow.distributed import Rendezvous, torchrun_command


def test_multi_node_command_uses_the_c10d_rendezvous(tmp_path):
    rdzv = Rendezvous(nnodes=2, node_rank=1, endpoint="10.0.0.5:29400", run_id="run-7")
    cmd = torchrun_command(tmp_path / "job.json", 4, max_restarts=3, rendezvous=rdzv)
    assert "--standalone" not in cmd
    for arg in ("--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.5:29400",
                "--rdzv-id=run-7", "--nproc-per-node=4", "--max-restarts=3"):
        assert arg in cmd
