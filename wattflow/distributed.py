"""Launch DDP training as a `torchrun` subprocess and collect its per-rank result files.

`torchrun` (python -m torch.distributed.run) rather than mp.spawn: it runs cleanly under a Prefect
worker thread, it owns rank supervision, and the same command scales to several nodes.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from wattflow.config import PipelineConfig
from wattflow.data import splits_for
from wattflow.models import default_spec, sha256_file


class TrainingError(RuntimeError):
    """torchrun exited non-zero; the message carries the tail of the ranks' output."""


@dataclass(frozen=True)
class TrainOutput:
    checkpoint: str
    sha256: str
    device: str       # "cuda" or "cpu"
    world_size: int
    metrics: dict     # rank 0's metrics.json
    samples_seen: int  # summed over ranks


def plan_ranks(cpu_ranks: int) -> tuple[str, int]:
    """One rank per visible GPU; `cpu_ranks` Gloo ranks where there is none."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return "cuda", torch.cuda.device_count()
    return "cpu", cpu_ranks


def torchrun_command(job_path: Path, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "wattflow.train", "--job", str(job_path)]


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the group (torchrun forwards it to its ranks), SIGKILL what is left after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def launch_training(cfg: PipelineConfig, out_dir: str | Path, log: Callable[[str], None] = print
                    ) -> TrainOutput:
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("rank-*.json"), out_dir / "progress.jsonl", out_dir / "metrics.json"]:
        stale.unlink(missing_ok=True)
    splits = splits_for(cfg.data)
    device, nproc = plan_ranks(cfg.train.cpu_ranks)
    job = {"train": cfg.train.model_dump(), "data": cfg.data.model_dump(), "out_dir": str(out_dir),
           "device": device, "spec": default_spec(cfg.train.model, splits.in_features, splits.num_classes,
                                                 mlp_hidden=cfg.train.mlp_hidden, cnn_channels=cfg.train.cnn_channels,
                                                 cnn_hidden=cfg.train.cnn_hidden)}
    job_path = out_dir / "job.json"
    job_path.write_text(json.dumps(job, indent=2))

    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.train.threads_per_rank), "PYTHONUNBUFFERED": "1"}
    cmd = torchrun_command(job_path, nproc)
    log(f"launching {nproc} {device} rank(s): {' '.join(cmd)}")
    tail: collections.deque[str] = collections.deque(maxlen=40)
    # Own process group, so that a timeout stops torchrun and every rank it started.
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=out_dir, start_new_session=True) as proc:
        timed_out = threading.Event()
        watchdog = threading.Timer(cfg.train.timeout_s, lambda: (timed_out.set(), stop_process_group(proc)))
        watchdog.start()
        try:
            for line in proc.stdout:
                line = line.rstrip()
                tail.append(line)
                log(line)
            proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:  # the caller was interrupted: leave no orphaned ranks
                stop_process_group(proc)
    if timed_out.is_set():
        raise TrainingError(f"training exceeded train.timeout_s={cfg.train.timeout_s} and was stopped")
    if proc.returncode != 0:
        raise TrainingError(f"torchrun exited with {proc.returncode}; last output:\n" + "\n".join(tail))

    metrics = json.loads((out_dir / "metrics.json").read_text())
    ranks = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank-*.json"))]
    checkpoint = out_dir / "model.pt"
    sha = sha256_file(checkpoint)
    if sha != metrics["checkpoint_sha256"]:
        raise TrainingError(f"checkpoint {checkpoint} changed after rank 0 wrote it (sha256 mismatch)")
    return TrainOutput(str(checkpoint), sha, device, len(ranks), metrics,
                       sum(r["samples_seen"] for r in ranks))
