"""Launch DDP training as a `torchrun` subprocess and collect its per-rank result files.

`torchrun` (python -m torch.distributed.run) rather than mp.spawn: it runs cleanly under a Prefect
worker thread, it owns rank supervision and elastic restarts (`--max-restarts`), and the same command
scales to several nodes: pass a `Rendezvous` to every node's `launch_training` (same endpoint and run_id).
The ranks' side (checkpoints, resume, fault injection) is in `wattflow.train`.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from wattflow.config import FactoryRef, PipelineConfig
from wattflow.data import SPLIT_INDICES_ENV, save_split_indices
from wattflow.models import sha256_file
from wattflow.workloads import workload_for


class TrainingError(RuntimeError):
    """Training failed; the message says why (a rank's recorded reason, or the tail of the ranks' output)."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or inf: deterministic, so it is reported instead of retried."""


class DeviceUnavailableError(TrainingError):
    """train.device asks for hardware this machine does not have."""


@dataclass(frozen=True)
class Rendezvous:
    """One node's part in a multi-node launch (torchrun c10d rendezvous); every node gets the same endpoint and
    run_id. Which node holds global rank 0 is decided by the rendezvous, not by node_rank."""

    nnodes: int
    node_rank: int
    endpoint: str  # "host:port" every node can reach; the node on that host serves the rendezvous store
    run_id: str

    @property
    def on_loopback(self) -> bool:
        """Every node is this host (tests, one-box drills)."""
        return self.endpoint.rsplit(":", 1)[0] in ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class TrainOutput:
    checkpoint: str | None  # model.pt; None on a node that does not hold global rank 0
    sha256: str | None
    device: str       # "cuda" or "cpu"
    world_size: int   # all ranks of all nodes
    metrics: dict     # rank 0's metrics.json; {} on a node without rank 0
    samples_seen: int  # summed over all ranks of all nodes, of the attempt that finished
    restarts: int      # worker-group restarts torchrun made (TORCHELASTIC_RESTART_COUNT of the last attempt)
    holds_rank0: bool = True
    node_rank: int = 0


FATAL_FILE = "fatal.json"  # written by ranks that failed deterministically (see wattflow.train)
STATE_FILE = "state.pt"    # the resumable training state
SPLIT_INDICES_FILE = "split-indices.npz"  # the launcher's stratified splits, read by the ranks
# Fault-injection switches read by the ranks, with their required keys.
FAULT_SWITCHES = {"WATTFLOW_FAULT_KILL": ("rank", "epoch"), "WATTFLOW_FAULT_NAN": ("epoch",)}
_FATAL_ERRORS = {cls.__name__: cls for cls in (TrainingError, NonFiniteLossError)}


def parse_fault(env_name: str) -> dict[str, int] | None:
    """The fault-injection switch `env_name` (see wattflow.train), e.g. "rank=1,epoch=2,step=3" ->
    {"rank": 1, "epoch": 2, "step": 3}; step defaults to 1. None when unset."""
    value = os.environ.get(env_name, "").strip()
    if not value:
        return None
    required = FAULT_SWITCHES[env_name]
    try:
        fault = {k.strip(): int(v) for k, v in (part.split("=") for part in value.split(","))}
    except ValueError:
        raise ValueError(f"{env_name}={value!r} is malformed; expected e.g. "
                         f"{','.join(f'{k}=1' for k in required)}[,step=1]") from None
    missing = [k for k in required if k not in fault]
    if missing:
        raise ValueError(f"{env_name}={value!r} lacks {', '.join(missing)}")
    return {"step": 1, **fault}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may still take it before it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _no_cuda(field: str, instead: str) -> DeviceUnavailableError:
    why = ("this torch build has no CUDA support" if torch.version.cuda is None
           else f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}")
    return DeviceUnavailableError(f"{field}='cuda' but no CUDA GPU is visible on {socket.gethostname()} ({why}; "
                                  f"torch {torch.__version__}); set {field} to {instead}, or run on a GPU worker")


def check_device(cfg: PipelineConfig) -> str:
    """The device training will use ("cuda" or "cpu"); raises DeviceUnavailableError for train.device or
    eval.device "cuda" where no GPU is visible. Cheap: call it in a preflight, before any expensive work."""
    requested = cfg.train.device
    if requested == "cuda" and cuda_device_count() == 0:
        raise _no_cuda("train.device", "'auto' (GPUs where present, else train.cpu_ranks Gloo CPU ranks) or 'cpu'")
    if cfg.eval.device == "cuda" and cuda_device_count() == 0:
        raise _no_cuda("eval.device", "'cpu'")
    if requested == "cpu":
        return "cpu"
    return "cuda" if cuda_device_count() > 0 else "cpu"


def plan_ranks(cfg: PipelineConfig) -> tuple[str, int]:
    """(device, ranks on this node): one rank per visible GPU, or train.cpu_ranks Gloo ranks."""
    device = check_device(cfg)
    return device, cuda_device_count() if device == "cuda" else cfg.train.cpu_ranks


def torchrun_command(job_path: Path, nproc: int, *, max_restarts: int = 0,
                     rendezvous: Rendezvous | None = None) -> list[str]:
    if rendezvous is None:
        nodes = ["--standalone"]
    else:
        nodes = [f"--nnodes={rendezvous.nnodes}", f"--node-rank={rendezvous.node_rank}", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint={rendezvous.endpoint}", f"--rdzv-id={rendezvous.run_id}"]
        if rendezvous.on_loopback:  # else the ranks would advertise this host's FQDN, which may not be loopback
            nodes.append("--local-addr=127.0.0.1")
    return [sys.executable, "-m", "torch.distributed.run", *nodes, f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "wattflow.train", "--job", str(job_path)]


def rank_pids(out_dir: Path) -> list[int]:
    """The ranks still alive among those that recorded their pid (rank-<r>.pid), checked by command line so
    that a recycled pid is never signalled."""
    alive = []
    for pid_file in out_dir.glob("rank-*.pid"):
        try:
            pid = int(pid_file.read_text())
            if b"wattflow.train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                alive.append(pid)
        except (OSError, ValueError):
            continue
    return alive


def stop_process_group(proc: subprocess.Popen, out_dir: Path | None = None, grace_s: float = 10.0) -> None:
    """SIGTERM torchrun's group, SIGKILL it after `grace_s`; then SIGKILL any rank left (torchrun starts
    each rank in a session of its own, so a torchrun killed before it forwards the signal orphans them)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace_s)
            break
        except subprocess.TimeoutExpired:
            continue
    for pid in rank_pids(out_dir) if out_dir else []:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def clear_stale_outputs(out_dir: Path, resume: bool) -> None:
    """A fresh launch starts clean; resume=True keeps state.pt (and the progress lines it continues)."""
    stale = [*out_dir.glob("rank-*.json"), *out_dir.glob("rank-*.pid"), out_dir / "metrics.json",
             out_dir / FATAL_FILE, out_dir / "model.pt"]
    if not resume:
        stale += [out_dir / STATE_FILE, out_dir / "progress.jsonl"]
    for path in stale:
        path.unlink(missing_ok=True)


def loopback_gloo_env(rendezvous: Rendezvous | None) -> dict[str, str]:
    """Gloo binds to the interface its hostname resolves to; when every node is this host (tests, one-box
    drills), pin it to loopback so that no firewall or missing route stands between the ranks."""
    if rendezvous is None or not rendezvous.on_loopback:
        return {}
    return {"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}


def run_torchrun(cmd: list[str], env: dict[str, str], cwd: Path, timeout_s: float,
                 log: Callable[[str], None]) -> tuple[int, list[str], bool]:
    """(exit code, last 40 lines, timed out); streams every line to `log`.

    The output is read in a thread and the wait is on torchrun itself: ranks that outlive torchrun would
    otherwise hold the pipe open and the launch would never return. They are killed by their pid files."""
    tail: collections.deque[str] = collections.deque(maxlen=40)

    def read(stream) -> None:
        for line in stream:
            line = line.rstrip()
            tail.append(line)
            log(line)

    # Own process group, so that a timeout stops torchrun (and, through it, its ranks).
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=cwd, start_new_session=True) as proc:
        timed_out = threading.Event()
        watchdog = threading.Timer(timeout_s, lambda: (timed_out.set(), stop_process_group(proc, cwd)))
        reader = threading.Thread(target=read, args=(proc.stdout,), name="torchrun-output", daemon=True)
        watchdog.start()
        reader.start()
        try:
            proc.wait()
        finally:
            watchdog.cancel()
            # Interrupted, or torchrun gone with ranks left behind: leave no orphaned ranks.
            stop_process_group(proc, cwd, grace_s=10.0 if proc.poll() is None else 0.0)
            reader.join(timeout=10.0)
    return proc.returncode, list(tail), timed_out.is_set()


def absolute_paths(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` with its data paths made absolute: the ranks run in their own directory, not the caller's."""
    data = cfg.data
    update = {"path": str(Path(data.path).resolve())} if data.path else {}
    if isinstance(data.dataset, FactoryRef) and data.dataset.path:
        update["dataset"] = data.dataset.model_copy(update={"path": str(Path(data.dataset.path).resolve())})
    return cfg.model_copy(update={"data": data.model_copy(update=update)}) if update else cfg


def launch_training(cfg: PipelineConfig, out_dir: str | Path, log: Callable[[str], None] = print, *,
                    rendezvous: Rendezvous | None = None, resume: bool = False) -> TrainOutput:
    """Train under torchrun on this node; with `rendezvous`, as one node of a multi-node run.
    resume=True continues from out_dir/state.pt left by an earlier, interrupted launch."""
    out_dir = Path(out_dir).resolve()
    device, nproc = plan_ranks(cfg)  # before anything is written or launched
    for switch in FAULT_SWITCHES:  # a typo here would otherwise fail every rank on every restart
        parse_fault(switch)
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_stale_outputs(out_dir, resume)
    job = {"config": absolute_paths(cfg).model_dump(mode="json"), "out_dir": str(out_dir), "device": device,
           "spec": workload_for(cfg).model_spec()}
    job_path = out_dir / "job.json"
    job_path.write_text(json.dumps(job, indent=2))
    save_split_indices(out_dir / SPLIT_INDICES_FILE)  # the ranks split as this process did, without scikit-learn

    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.train.threads_per_rank), "PYTHONUNBUFFERED": "1",
           # The agent's shared TCPStore keeps the dead attempt's keys: a restarted rank may read a dead peer's
           # address and fail to connect (pytorch/pytorch#135712). A fresh store per attempt avoids that.
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **loopback_gloo_env(rendezvous),
           # CUDA numbers GPUs fastest first, NVML (the meter, the slots) in PCI order: on a host with mixed GPUs
           # the ranks would run on other GPUs than the ones measured. One order for both, unless the user set one.
           "CUDA_DEVICE_ORDER": os.environ.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID"),
           SPLIT_INDICES_ENV: str(out_dir / SPLIT_INDICES_FILE)}
    cmd = torchrun_command(job_path, nproc, max_restarts=cfg.train.max_restarts, rendezvous=rendezvous)
    log(f"launching {nproc} {device} rank(s): {' '.join(cmd)}")
    returncode, tail, timed_out = run_torchrun(cmd, env, out_dir, cfg.train.timeout_s, log)
    if timed_out:
        raise TrainingError(f"training exceeded train.timeout_s={cfg.train.timeout_s} and was stopped")
    if (out_dir / FATAL_FILE).exists():  # a reason recorded by the ranks beats the tail of their output
        fatal = json.loads((out_dir / FATAL_FILE).read_text())
        raise _FATAL_ERRORS.get(fatal["error"], TrainingError)(fatal["message"])
    if returncode != 0:
        kept = (f"; the training state of the last finished checkpoint is kept in {out_dir / STATE_FILE}: "
                "launch again with resume=True to continue from it") if (out_dir / STATE_FILE).exists() else ""
        raise TrainingError(f"torchrun exited with {returncode}: a rank failed and train.max_restarts="
                            f"{cfg.train.max_restarts} restart(s) did not recover it{kept}; last output:\n"
                            + "\n".join(tail))
    return collect_results(out_dir, device, rendezvous)


def collect_results(out_dir: Path, device: str, rendezvous: Rendezvous | None) -> TrainOutput:
    ranks = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank-*.json"))]
    if not ranks:
        raise TrainingError(f"torchrun succeeded but no rank wrote a rank-*.json into {out_dir}")
    common = {"device": device, "world_size": ranks[0]["world_size"],
              "samples_seen": ranks[0]["samples_seen_all_ranks"], "restarts": max(r["restarts"] for r in ranks),
              "node_rank": rendezvous.node_rank if rendezvous else 0}
    if not any(r["rank"] == 0 for r in ranks):
        return TrainOutput(checkpoint=None, sha256=None, metrics={}, holds_rank0=False, **common)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    checkpoint = out_dir / "model.pt"
    sha = sha256_file(checkpoint)
    if sha != metrics["checkpoint_sha256"]:
        raise TrainingError(f"checkpoint {checkpoint} changed after rank 0 wrote it (sha256 mismatch)")
    return TrainOutput(checkpoint=str(checkpoint), sha256=sha, metrics=metrics, holds_rank0=True, **common)
