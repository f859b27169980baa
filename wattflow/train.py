"""Per-rank training entry point; `wattflow.distributed.launch_training` starts it under torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 2 \\
        -m wattflow.train --job job.json                                       # one node
    python -m torch.distributed.run --nnodes 2 --node-rank 0 --nproc-per-node 1 --max-restarts 2 \\
        --rdzv-backend c10d --rdzv-endpoint host:29400 --rdzv-id run-1 -m wattflow.train --job job.json

One process per rank: NCCL and one GPU per rank where GPUs exist, Gloo CPU ranks otherwise.
Global rank 0 alone writes the results (progress lines, model.pt, metrics.json); every rank writes its
own `rank-<r>.json` so results never travel through shared stdout.

Elastic restarts: local rank 0 of every node writes `state.pt` (model, optimizer, LR schedule, epoch)
every `train.checkpoint_every_epochs`; when torchrun restarts the worker group after a rank died, every
rank loads it and resumes at the next epoch. A deterministic failure (a non-finite loss) is not retried:
the ranks write `fatal.json` with the reason, and a restarted group that finds it exits at once, so the
launcher reports the reason instead of burning every restart on it.

Fault injection, for tests and drills (both read from the ranks' environment):
    WATTFLOW_FAULT_KILL="rank=1,epoch=2[,step=3]"  global rank 1 sends itself SIGKILL right after step 3
        (1-based, default 1) of epoch 2 (1-based), on the first attempt only (TORCHELASTIC_RESTART_COUNT=0),
        so the restart resumes from the last state.pt and finishes.
    WATTFLOW_FAULT_NAN="epoch=2[,step=3]"  the loss of that step becomes NaN on every rank and attempt.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import pickle
import resource
import signal
import time
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler, Subset

from wattflow.config import DataConfig, PipelineConfig, TrainConfig
from wattflow.data import loader
from wattflow.distributed import FATAL_FILE, STATE_FILE, NonFiniteLossError, TrainingError, parse_fault
from wattflow.models import atomic_write, build_model, save_checkpoint
from wattflow.workloads import Workload, workload_for

# Fields that change what training computes: a state.pt written under other values cannot be resumed.
RESUME_KEY_FIELDS = ("model", "model_kwargs", "optimizer", "mlp_hidden", "cnn_channels", "cnn_hidden", "epochs",
                     "batch_size", "lr", "weight_decay", "warmup_epochs", "seed")


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def torch_predictor(model: nn.Module, device: torch.device | str = "cpu"):
    """numpy batch in, numpy scores out, in inference mode: what `Workload.score` takes."""
    dtype = next(model.parameters()).dtype

    def predict(x):
        with torch.inference_mode():
            xb = torch.from_numpy(x).to(device)
            return model(xb.to(dtype) if xb.is_floating_point() else xb).float().cpu().numpy()

    return predict


def primary_score(workload: Workload, model: nn.Module, dataset, device: torch.device | str = "cpu") -> float:
    was_training = model.training
    model.eval()
    value = workload.score(torch_predictor(model, device), dataset)[workload.primary_metric]
    model.train(was_training)
    return value


def sharded_score(workload: Workload, model: nn.Module, dataset, rank: int, world: int,
                  device: torch.device) -> float:
    """The primary metric over `dataset`, each rank scoring every world-th sample (a collective: every rank
    calls it), combined as the mean weighted by shard size: exact for per-sample means such as accuracy. Scoring
    on rank 0 alone would leave the other ranks idle at the next all-reduce."""
    shard = Subset(dataset, range(rank, len(dataset), world))
    value = primary_score(workload, model, shard, device) if len(shard) else 0.0
    total = torch.tensor([value * len(shard), len(shard)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))


def resume_key(cfg: TrainConfig, data_cfg: DataConfig, world_size: int) -> str:
    fields = cfg.model_dump(mode="json", include=set(RESUME_KEY_FIELDS))
    return json.dumps({"train": fields, "data": data_cfg.model_dump(mode="json"), "world_size": world_size},
                      sort_keys=True)


def save_training_state(path: Path, model: nn.Module, optimizer, scheduler, epoch: int, samples_seen: int,
                        key: str) -> None:
    """Only tensors, numbers, strings and containers of them, so it loads with weights_only=True."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "epoch": epoch, "samples_seen": samples_seen, "resume_key": key}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)

    atomic_write(path, write)


def load_training_state(path: Path, key: str) -> dict | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        fail(path.parent, TrainingError, f"{path} cannot be read ({type(err).__name__}); delete it, or launch "
             "with resume=False to start over")
    if not isinstance(state, dict) or state.get("resume_key") != key:
        fail(path.parent, TrainingError, f"{path} was written by a run with another train/data configuration or "
             "world size; delete it, or launch with resume=False to start over")
    return state


def fail(out_dir: Path, error: type[TrainingError], message: str) -> NoReturn:
    """A deterministic failure, reached by every rank: a retry would fail the same way, so record the reason for
    the launcher and for restarted ranks (every rank writes the same file atomically: no rank waits on another,
    and the first to finish is enough), then raise."""
    write_json(out_dir / FATAL_FILE, {"error": error.__name__, "message": message})
    raise error(message)


def resume(out_dir: Path, key: str, model: nn.Module, optimizer, scheduler, device: torch.device
           ) -> tuple[int, int]:
    """Load out_dir/state.pt into model, optimizer and schedule if present: (epochs done, samples seen per rank)."""
    state = load_training_state(out_dir / STATE_FILE, key)
    start_epoch, samples_seen = 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, samples_seen = state["epoch"], state["samples_seen"]
    # Every node resumes from its own state.pt: they must agree, or the replicas would silently diverge.
    epochs_held = torch.tensor([start_epoch, -start_epoch], device=device)
    dist.all_reduce(epochs_held, op=dist.ReduceOp.MAX)
    if epochs_held[0].item() != -epochs_held[1].item():
        fail(out_dir, TrainingError, f"the nodes hold training states of different epochs "
             f"({-epochs_held[1].item()} to {epochs_held[0].item()}): a node died while writing {STATE_FILE}; "
             "delete it on every node, or launch with resume=False")
    return start_epoch, samples_seen


def die_with_parent() -> None:
    """SIGKILL this rank when torchrun dies (Linux): torchrun puts each rank in a session of its own, so a
    torchrun killed outright would otherwise leave its ranks training (and holding a GPU) forever."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the launcher still kills ranks by their pid files
    if os.getppid() != parent:  # torchrun died before the death signal was armed
        os._exit(1)


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    pipeline_cfg = PipelineConfig.model_validate(job["config"])
    cfg, data_cfg = pipeline_cfg.train, pipeline_cfg.data
    out_dir = Path(job["out_dir"])
    use_cuda = job["device"] == "cuda"

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    die_with_parent()
    (out_dir / f"rank-{rank}.pid").write_text(str(os.getpid()))  # lets the launcher stop orphans
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    master_process = rank == 0
    if restarts > 0 and (out_dir / FATAL_FILE).exists():
        # An earlier attempt failed deterministically: end this one cleanly so the launcher reports why.
        print(f"rank {rank}: not retrying: {json.loads((out_dir / FATAL_FILE).read_text())['message']}", flush=True)
        return
    kill_at = parse_fault("WATTFLOW_FAULT_KILL")
    nan_at = parse_fault("WATTFLOW_FAULT_NAN")
    torch.set_num_threads(cfg.threads_per_rank)
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")

    workload = workload_for(pipeline_cfg)
    splits = workload.splits
    # Each rank reads only its shard of the training samples, batch by batch.
    sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    # Pinned host memory: only then is a non_blocking copy to the GPU asynchronous.
    train_loader = loader(splits.train, cfg.batch_size, sampler=sampler, num_workers=data_cfg.num_workers,
                          pin_memory=use_cuda)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    spec = job["spec"]
    model = build_model(spec).to(device)
    optimizer = make_optimizer(cfg.optimizer, model, cfg.lr, cfg.weight_decay)
    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps))

    key = resume_key(cfg, data_cfg, world)
    start_epoch, samples_seen = resume(out_dir, key, model, optimizer, scheduler, device)
    if start_epoch and master_process:
        print(f"resuming after epoch {start_epoch}/{cfg.epochs} from {out_dir / STATE_FILE} "
              f"(restart {restarts})", flush=True)

    ddp = DDP(model, device_ids=[local_rank] if use_cuda else None)
    # bf16 autocast pays on GPUs with bf16 tensor cores; on CPU ranks it only slows these small models.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=use_cuda and torch.cuda.is_bf16_supported())
    loss_fn = workload.loss

    started = time.perf_counter()
    val_accuracy = float("nan")
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        # Per step nothing goes between host and device but the batch: the loss sum and the first step with a
        # non-finite loss stay on the device, the sample count on the host (a per-step torch.tensor(..., device)
        # would be a copy, and a sync on CUDA).
        loss_sum = torch.zeros((), device=device)
        epoch_samples = 0
        first_bad_step = torch.full((), steps_per_epoch + 1, device=device)
        for step, (xb, yb) in enumerate(train_loader, start=1):
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            with autocast:
                loss = loss_fn(ddp(xb), yb)
            if nan_at and nan_at["epoch"] == epoch + 1 and nan_at["step"] == step:
                loss = loss * float("nan")
            first_bad_step = torch.where(torch.isfinite(loss.detach()), first_bad_step, first_bad_step.clamp(max=step))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().float() * len(yb)
            epoch_samples += len(yb)
            samples_seen += len(yb)
            if kill_at and restarts == 0 and (rank, epoch + 1, step) == (kill_at["rank"], kill_at["epoch"],
                                                                         kill_at["step"]):
                print(f"rank {rank}: WATTFLOW_FAULT_KILL: SIGKILL at epoch {epoch + 1} step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        totals = torch.stack([loss_sum, torch.tensor(float(epoch_samples), device=device)])  # once per epoch
        dist.all_reduce(totals)  # a NaN on any rank makes the sum NaN on every rank: all stop together
        if not torch.isfinite(totals).all():
            dist.all_reduce(first_bad_step, op=dist.ReduceOp.MIN)
            step = int(first_bad_step.item())
            where = f"step {step}/{steps_per_epoch}" if step <= steps_per_epoch else "(loss sum overflowed)"
            fail(out_dir, NonFiniteLossError, f"non-finite loss (NaN or inf) at epoch {epoch + 1} {where}; lower "
                 f"train.lr (now {cfg.lr:g}) or raise train.warmup_epochs (now {cfg.warmup_epochs:g}), and check "
                 "the data for NaN/inf values")
        val_accuracy = sharded_score(workload, model, splits.val, rank, world, device)
        if master_process:
            line = {"epoch": epoch + 1, "epochs": cfg.epochs, "train_loss": (totals[0] / totals[1]).item(),
                    "val_accuracy": val_accuracy, "lr": scheduler.get_last_lr()[0],
                    "elapsed_s": time.perf_counter() - started, "restarts": restarts}
            with open(out_dir / "progress.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
            print(f"epoch {epoch + 1}/{cfg.epochs} loss {line['train_loss']:.4f} "
                  f"val_acc {val_accuracy:.4f} lr {line['lr']:.4g}", flush=True)
        # Local rank 0 of every node: each node resumes from its own disk (nodes need not share one).
        if local_rank == 0 and ((epoch + 1) % cfg.checkpoint_every_epochs == 0 or epoch + 1 == cfg.epochs):
            save_training_state(out_dir / STATE_FILE, model, optimizer, scheduler, epoch + 1, samples_seen, key)

    train_s = time.perf_counter() - started
    if math.isnan(val_accuracy):  # resumed after the last epoch: nothing trained in this attempt
        val_accuracy = sharded_score(workload, model, splits.val, rank, world, device)
    if master_process:
        meta = {**workload.meta(), "epochs": cfg.epochs, "world_size": world, "val_accuracy": val_accuracy}
        sha = save_checkpoint(out_dir / "model.pt", model, spec, meta)
        write_json(out_dir / "metrics.json", {
            "val_accuracy": val_accuracy, "world_size": world, "device": job["device"], "checkpoint_sha256": sha,
            "epochs": cfg.epochs, "restarts": restarts, "resumed_from_epoch": start_epoch or None,
            # Of the last attempt only: the time of epochs lost to a dead rank is not in it.
            "train_duration_s": train_s})
    samples_total = torch.tensor([samples_seen], device=device)
    dist.all_reduce(samples_total)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    write_json(out_dir / f"rank-{rank}.json", {
        "rank": rank, "world_size": world, "local_rank": local_rank, "restarts": restarts,
        "samples_seen": samples_seen, "samples_seen_all_ranks": int(samples_total.item()),
        "train_duration_s": train_s, "cpu_s": usage.ru_utime + usage.ru_stime,
        # Equal on every rank when DDP kept the replicas in sync.
        "param_checksum": float(sum(p.detach().double().sum() for p in model.parameters()))})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", required=True, help="JSON job file written by launch_training")
    main(parser.parse_args().job)
