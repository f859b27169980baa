"""GPU energy check: does NVML's energy counter agree with the integral of instantaneous power over the
same windows? Run it on a machine with an NVIDIA GPU:

    make gpu-check                       (python -m wattflow.gpu_check)
    python -m wattflow.gpu_check --fake  (a simulated GPU, to try the script anywhere; labelled simulated)

Windows: brief DDP training (torchrun, one rank per GPU), evaluation of the trained model, and a steady
bf16 matmul load. Prints one row per window and GPU, writes bench/results/gpu_check.json, and exits 1 when
a window with both readings disagrees by more than --tolerance (default 5%), 2 when there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from wattflow.config import PipelineConfig
from wattflow.distributed import launch_training
from wattflow.energy import EnergyUnavailableError, FakeNvml, NvmlBackend
from wattflow.models import input_signature, load_checkpoint

RESULTS = Path("bench/results/gpu_check.json")


def measure(backend: NvmlBackend, name: str, work: Callable[[], None]) -> list[dict]:
    backend.acquire()  # starts the power sampler, as a meter window would
    try:
        start = backend.snapshot()
        started = time.perf_counter()
        work()
        end = backend.snapshot()
        duration_s = time.perf_counter() - started
    finally:
        backend.release()
    rows = []
    for device, counter_j, integral_j in backend.both_readings(start, end):
        diff = None if counter_j in (None, 0) or integral_j is None else (integral_j - counter_j) / counter_j
        rows.append({"window": name, "device": device, "duration_s": duration_s, "counter_j": counter_j,
                     "power_integral_j": integral_j, "relative_difference": diff,
                     "avg_power_w": None if counter_j is None else counter_j / duration_s})
    return rows


def matmul_load(device: str, seconds: float) -> Callable[[], None]:
    def work() -> None:
        n = 8192 if device == "cuda" else 512
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            a = (a @ a).clamp_(-1, 1)
        if device == "cuda":
            torch.cuda.synchronize()
    return work


def evaluation_load(checkpoint: str, device: str, seconds: float) -> Callable[[], None]:
    def work() -> None:
        model, spec, meta = load_checkpoint(checkpoint)
        model = model.to(device)
        x = torch.rand(4096, *input_signature(spec, meta)[0], device=device)
        deadline = time.perf_counter() + seconds
        with torch.inference_mode():
            while time.perf_counter() < deadline:
                model(x)
        if device == "cuda":
            torch.cuda.synchronize()
    return work


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fake", action="store_true", help="simulated GPU (FakeNvml); figures say simulated")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the evaluation and matmul windows")
    parser.add_argument("--tolerance", type=float, default=0.05)
    args = parser.parse_args(argv)
    console = Console(width=max(Console().width, 120))
    try:
        backend = NvmlBackend(FakeNvml(power_w=120.0), simulated=True) if args.fake else NvmlBackend()
    except EnergyUnavailableError as e:
        console.print(f"[red]no NVML: {e}[/red]")
        return 2
    if not backend.devices:
        console.print("[red]NVML sees no GPU (check CUDA_VISIBLE_DEVICES)[/red]")
        return 2
    device = "cuda" if torch.cuda.is_available() and not args.fake else "cpu"
    cfg = PipelineConfig.model_validate({"train": {"epochs": 30 if device == "cuda" else 2}})
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="wattflow-gpu-check-") as tmp:
        out: dict = {}
        rows += measure(backend, "train", lambda: out.update(ckpt=launch_training(cfg, tmp, lambda _: None)))
        rows += measure(backend, "evaluate", evaluation_load(out["ckpt"].checkpoint, device, args.seconds))
        rows += measure(backend, "matmul-bf16", matmul_load(device, args.seconds))
    method = "simulated:nvml" if args.fake else "measured:nvml"
    table = Table(title=f"GPU energy check ({method}): counter vs power integral, {device} workload")
    for col in ("window", "device", "duration_s", "counter_j", "power_integral_j", "difference", "avg_power_w"):
        table.add_column(col, justify="left" if col in ("window", "device") else "right")
    bad = False
    for r in rows:
        diff = r["relative_difference"]
        bad |= diff is not None and abs(diff) > args.tolerance
        table.add_row(r["window"], r["device"], f"{r['duration_s']:.2f}", _num(r["counter_j"]),
                      _num(r["power_integral_j"]), "unknown" if diff is None else f"{diff:+.2%}",
                      _num(r["avg_power_w"]))
    console.print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"method": method, "workload_device": device, "rows": rows,
                                   "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                                   if device == "cuda" else []}, indent=2))
    console.print(f"written to {RESULTS}")
    return 1 if bad else 0


def _num(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    sys.exit(main())
