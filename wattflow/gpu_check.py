"""GPU energy check: does NVML's energy counter agree with the integral of instantaneous power over the
same windows? Run it on a machine with an NVIDIA GPU:

    make gpu-check                       (python -m wattflow.gpu_check)
    python -m wattflow.gpu_check --fake  (a simulated GPU, to try the script anywhere; labelled simulated)

Windows: brief DDP training (torchrun, one rank per GPU), evaluation of the trained model, and a steady
bf16 matmul load; then the language model (wattflow.zoo.gpt on the embedded corpus): DDP training (NCCL on
GPUs), KV-cache generation at batch 1, the scoring pass with torchao int8 and int4 weight-only, and with 2:4
sparse kernels (torchao semi-structured, compute capability >= 8.0). Then a smoke test of wattflow's own
torchao CUDA backends (quantize, load as evaluation does, twice). A window whose runtime cannot run here is
listed with the reason instead. Prints one row per window and GPU, writes bench/results/gpu_check.json, and
exits 1 when a window with both readings disagrees by more than --tolerance (default 5%) or a torchao backend
disagrees with fp32 (top-1 < 0.9) or with itself across loads, 2 when there is no GPU.
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


LM_CONFIG = {"workload": "language-model", "data": {"dataset": "text", "val_fraction": 0.05, "test_fraction": 0.05},
             "train": {"model": "gpt", "model_kwargs": {"n_layer": 4, "n_head": 4, "n_embd": 128},
                       "optimizer": "adamw", "lr": 0.002, "epochs": 1, "batch_size": 64}}


def lm_generation_load(checkpoint: str, device: str, seconds: float) -> Callable[[], None]:
    def work() -> None:
        model = load_checkpoint(checkpoint)[0].to(device).eval()
        prompt = torch.zeros(1, 8, dtype=torch.int64, device=device)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            model.generate(prompt, 56)
        if device == "cuda":
            torch.cuda.synchronize()
    return work


def lm_scoring_load(checkpoint: str, device: str, seconds: float, variant: str) -> Callable[[], None]:
    """The scoring pass at batch 64 under `variant`: "torchao-int8-weight-only", "torchao-int4-weight-only" or
    "sparse-2:4" (magnitude 2:4 masks, then torchao's semi-structured sparse kernels). Raises RuntimeError with
    the reason when that runtime cannot run here."""
    model, spec, meta = load_checkpoint(checkpoint)
    if device != "cuda":
        raise RuntimeError(f"{variant} runs on CUDA only (here: {device})")
    model = model.to(device).eval()
    if variant == "sparse-2:4":
        from torchao.sparsity import semi_sparse_weight, sparsify_

        if torch.cuda.get_device_capability() < (8, 0):
            raise RuntimeError("2:4 sparse kernels need compute capability >= 8.0")
        from wattflow.compress.wanda import nm_mask

        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Linear) and m is not model.lm_head:
                    m.weight.mul_(nm_mask(m.weight.abs(), 2, 4))
        model = model.half()
        sparsify_(model, semi_sparse_weight(), lambda m, name: isinstance(m, torch.nn.Linear) and
                  name != "lm_head")
    else:
        from torchao import quantization as tq

        config = (tq.Int8WeightOnlyConfig() if variant == "torchao-int8-weight-only"
                  else tq.Int4WeightOnlyConfig(group_size=32))
        model = model.to(torch.bfloat16)
        tq.quantize_(model, config)
    x = torch.randint(0, spec["vocab_size"], (64, spec["block_size"]), device=device)

    def work() -> None:
        deadline = time.perf_counter() + seconds
        with torch.inference_mode():
            while time.perf_counter() < deadline:
                model(x)
        torch.cuda.synchronize()
    return work


def lm_windows(backend: NvmlBackend, device: str, tmp: str, seconds: float) -> tuple[list[dict], list[str]]:
    """The language-model windows; the second list says which could not run here and why."""
    small = {"model_kwargs": {"n_layer": 2, "n_head": 2, "n_embd": 32}, "cpu_ranks": 1} \
        if device != "cuda" else {}  # CPU (a simulated GPU): a try, one rank as for one GPU
    cfg = PipelineConfig.model_validate({**LM_CONFIG, "train": {**LM_CONFIG["train"], **small}})
    out: dict = {}
    rows = measure(backend, "lm-train", lambda: out.update(ckpt=launch_training(cfg, f"{tmp}/lm", lambda _: None)))
    ckpt = out["ckpt"].checkpoint
    rows += measure(backend, "lm-generate-kv-cache", lm_generation_load(ckpt, device, seconds))
    skipped = []
    for variant in ("torchao-int8-weight-only", "torchao-int4-weight-only", "sparse-2:4"):
        try:
            work = lm_scoring_load(ckpt, device, seconds, variant)
        except Exception as err:  # an optional runtime: say why, keep the other windows
            skipped.append(f"lm-score-{variant}: {type(err).__name__}: {err}")
            continue
        rows += measure(backend, f"lm-score-{variant}", work)
    return rows, skipped


def torchao_cuda_smoke(checkpoint: str, out_dir: str, device: str) -> tuple[list[dict], list[str]]:
    """wattflow's own torchao CUDA backends end to end on the trained model: quantize (as a chain's last step
    does), load through the runtime on `device` as evaluation does (re-quantized, compiled), and compare top-1
    with the fp32 model; a second load must agree with the first within the stated tolerance (torch.compile may
    pick other kernels). The second list says which backends could not run here and why."""
    import numpy as np

    from wattflow.compress.quantize import quantize_checkpoint
    from wattflow.compress.torchao_backend import TORCHAO_BACKENDS
    from wattflow.evaluate import load_predictor
    from wattflow.stages import TORCHAO_CUDA_TOLERANCE

    _, spec, meta = load_checkpoint(checkpoint)
    x = np.random.default_rng(0).random((512, *input_signature(spec, meta)[0]), dtype=np.float32)
    reference = load_predictor(checkpoint, "torch")(x).argmax(-1)
    rows, skipped = [], []
    for backend in (b for b, spec in TORCHAO_BACKENDS.items() if spec.needs_cuda):
        try:
            out = quantize_checkpoint(checkpoint, backend, out_dir, x[:64])
            first = load_predictor(out.path, out.format, device=device)(x)
            second = load_predictor(out.path, out.format, device=device)(x)
        except Exception as err:  # an optional runtime: say why, keep the others
            skipped.append(f"{backend}: {type(err).__name__}: {err}")
            continue
        rtol, atol = TORCHAO_CUDA_TOLERANCE
        rows.append({"backend": backend, "top1_agreement_with_fp32": float((first.argmax(-1) == reference).mean()),
                     "second_load_within_tolerance": bool(np.allclose(first, second, rtol=rtol, atol=atol)),
                     "second_load_max_abs_difference": float(np.abs(first - second).max())})
    return rows, skipped


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
    if not args.fake and not torch.cuda.is_available():
        # The workload would run on the CPU while the counters read idle GPUs: they would agree, and prove nothing.
        console.print(f"[red]NVML sees {len(backend.devices)} GPU(s) but torch {torch.__version__} has no CUDA here "
                      "(a CPU build, or no usable driver): run the check with a CUDA build of torch[/red]")
        return 2
    device = "cuda" if torch.cuda.is_available() and not args.fake else "cpu"
    # cpu_ranks=1: the simulated GPU is one GPU, so its CPU stand-in is one rank, as a real GPU would get
    cfg = PipelineConfig.model_validate({"train": {"epochs": 30 if device == "cuda" else 2, "cpu_ranks": 1}})
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="wattflow-gpu-check-") as tmp:
        out: dict = {}
        rows += measure(backend, "train", lambda: out.update(ckpt=launch_training(cfg, tmp, lambda _: None)))
        rows += measure(backend, "evaluate", evaluation_load(out["ckpt"].checkpoint, device, args.seconds))
        rows += measure(backend, "matmul-bf16", matmul_load(device, args.seconds))
        lm_rows, skipped = lm_windows(backend, device, tmp, args.seconds)
        rows += lm_rows
        smoke, smoke_skipped = torchao_cuda_smoke(out["ckpt"].checkpoint, tmp, device)
        skipped += smoke_skipped
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
    for r in smoke:
        bad |= r["top1_agreement_with_fp32"] < 0.9 or not r["second_load_within_tolerance"]
        console.print(f"torchao {r['backend']} on {device}: top-1 agreement with fp32 "
                      f"{r['top1_agreement_with_fp32']:.3f}; a second load within tolerance: "
                      f"{r['second_load_within_tolerance']} (max |diff| {r['second_load_max_abs_difference']:.2e})")
    for line in skipped:
        console.print(f"[yellow]not run here: {line}[/yellow]")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"method": method, "workload_device": device, "rows": rows, "not_run": skipped,
                                   "torchao_cuda_smoke": smoke,
                                   "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                                   if device == "cuda" else []}, indent=2))
    console.print(f"written to {RESULTS}")
    return 1 if bad else 0


def _num(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    sys.exit(main())
