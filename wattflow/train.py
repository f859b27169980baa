"""Per-rank training entry point; `wattflow.distributed.launch_training` starts it under torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m wattflow.train --job job.json

One process per rank: NCCL and one GPU per rank where GPUs exist, Gloo CPU ranks otherwise.
Rank 0 alone writes side effects (progress lines, checkpoint, metrics); every rank writes its own
`rank-<r>.json` so results never travel through shared stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from wattflow.config import DataConfig, TrainConfig
from wattflow.data import splits_for
from wattflow.models import atomic_write, build_model, save_checkpoint


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.inference_mode()
def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = (model(x).argmax(dim=1) == y).sum().item()
    model.train()
    return correct / len(y)


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    cfg = TrainConfig.model_validate(job["train"])
    data_cfg = DataConfig.model_validate(job["data"])
    out_dir = Path(job["out_dir"])
    use_cuda = job["device"] == "cuda"

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    master_process = rank == 0
    torch.set_num_threads(cfg.threads_per_rank)
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")

    splits = splits_for(data_cfg)
    train_ds = TensorDataset(torch.from_numpy(splits.train.x), torch.from_numpy(splits.train.y))
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler)
    x_val = torch.from_numpy(splits.val.x).to(device)
    y_val = torch.from_numpy(splits.val.y).to(device)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    spec = job["spec"]
    model = build_model(spec).to(device)
    ddp = DDP(model, device_ids=[local_rank] if use_cuda else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                                weight_decay=cfg.weight_decay)
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps))
    # bf16 autocast pays on GPUs with bf16 tensor cores; on CPU ranks it only slows these small models.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=use_cuda and torch.cuda.is_bf16_supported())
    loss_fn = nn.CrossEntropyLoss()

    started = time.perf_counter()
    samples_seen = 0
    val_accuracy = float("nan")
    for epoch in range(cfg.epochs):
        sampler.set_epoch(epoch)
        loss_sum = torch.zeros(2, device=device)  # (sum of losses, samples) on this rank
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            with autocast:
                loss = loss_fn(ddp(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += torch.stack([loss.detach().float() * len(yb), torch.tensor(len(yb), device=device)])
            samples_seen += len(yb)
        dist.all_reduce(loss_sum)
        if master_process:
            val_accuracy = evaluate_accuracy(model, x_val, y_val)
            line = {"epoch": epoch + 1, "epochs": cfg.epochs, "train_loss": (loss_sum[0] / loss_sum[1]).item(),
                    "val_accuracy": val_accuracy, "lr": scheduler.get_last_lr()[0],
                    "elapsed_s": time.perf_counter() - started}
            with open(out_dir / "progress.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
            print(f"epoch {epoch + 1}/{cfg.epochs} loss {line['train_loss']:.4f} "
                  f"val_acc {val_accuracy:.4f} lr {line['lr']:.4g}", flush=True)

    train_s = time.perf_counter() - started
    if master_process:
        meta = {"epochs": cfg.epochs, "world_size": world, "val_accuracy": val_accuracy}
        sha = save_checkpoint(out_dir / "model.pt", model, spec, meta)
        write_json(out_dir / "metrics.json", {
            "val_accuracy": val_accuracy, "train_duration_s": train_s, "world_size": world,
            "device": job["device"], "checkpoint_sha256": sha})
    usage = resource.getrusage(resource.RUSAGE_SELF)
    write_json(out_dir / f"rank-{rank}.json", {
        "rank": rank, "samples_seen": samples_seen, "train_duration_s": train_s,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        # Equal on every rank when DDP kept the replicas in sync.
        "param_checksum": float(sum(p.detach().double().sum() for p in model.parameters()))})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", required=True, help="JSON job file written by launch_training")
    main(parser.parse_args().job)
