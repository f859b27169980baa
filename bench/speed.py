"""Speed of compressed variants of the default CNN at batch 256, 1 thread, against fp32 eager torch, measured
alternately in one process (median over rounds of the latency ratio): ONNX Runtime static int8 (target >= 2,
aim 3) and structured channel pruning (half the channels removed, fine-tuned; target: faster)."""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from wattflow.compress.prune import prune_checkpoint
from wattflow.compress.quantize import quantize_checkpoint
from wattflow.config import PipelineConfig
from wattflow.data import load_splits
from wattflow.distributed import launch_training
from wattflow.evaluate import load_predictor, median_latency_s

BATCH = 256


def run(quick: bool, results: Path) -> list[dict]:
    cfg = PipelineConfig()  # the default CNN, as `make run-flow` trains it
    x = load_splits().train.x
    rounds = 5 if quick else 15
    with tempfile.TemporaryDirectory(prefix="wattflow-bench-int8-") as tmp:
        trained = launch_training(cfg, tmp, lambda _: None)
        int8 = quantize_checkpoint(trained.checkpoint, "onnx-int8-static", tmp, x[:256])
        split = load_splits().train
        slim = prune_checkpoint(trained.checkpoint, Path(tmp) / "channels.pt", 0.5, split, fine_tune_epochs=4,
                                lr=0.01, method="structured", schedule_steps=2)
        fp32_eager = load_predictor(trained.checkpoint, "torch", threads=1)
        ort_int8 = load_predictor(int8.path, "onnx", threads=1)
        slim_eager = load_predictor(slim.checkpoint, "torch", threads=1)
        fp32_ms, int8_ms, slim_ms = [], [], []
        for _ in range(rounds):  # alternate, so drift in machine load hits all three
            fp32_ms.append(1e3 * median_latency_s(fp32_eager, x, BATCH, repeats=10, warmup=2))
            int8_ms.append(1e3 * median_latency_s(ort_int8, x, BATCH, repeats=10, warmup=2))
            slim_ms.append(1e3 * median_latency_s(slim_eager, x, BATCH, repeats=10, warmup=2))
    ratios = [f / i for f, i in zip(fp32_ms, int8_ms, strict=True)]
    slim_ratios = [f / s for f, s in zip(fp32_ms, slim_ms, strict=True)]
    row = {"row": "speed", "model": "default CNN (conv 16-32, fc 64)", "batch": BATCH, "threads": 1,
           "rounds": rounds, "int8": int8.note, "median_fp32_eager_ms": statistics.median(fp32_ms),
           "median_onnx_int8_ms": statistics.median(int8_ms), "median_speedup": statistics.median(ratios),
           "min_speedup": min(ratios), "max_speedup": max(ratios),
           "structured": {"widths": slim.layer_width, "params_before": slim.params_before,
                          "params_after": slim.params_after, "median_eager_ms": statistics.median(slim_ms),
                          "median_speedup": statistics.median(slim_ratios), "min_speedup": min(slim_ratios),
                          "max_speedup": max(slim_ratios)}}
    (results / "speed.json").write_text(json.dumps(row, indent=2))
    return [{"row": "int8 speed (default CNN, b256, 1 thread)",
             "figure": f"fp32 eager / ONNX Runtime int8 latency, median of {rounds} rounds (spread "
                       f"{row['min_speedup']:.2f}-{row['max_speedup']:.2f})",
             "value": round(row["median_speedup"], 2), "target": ">= 2 (aim 3)", "met": row["median_speedup"] >= 2},
            {"row": "structured pruning speed (default CNN, b256, 1 thread)",
             "figure": f"fp32 eager / channels-0.5 eager latency ({slim.params_before} -> {slim.params_after} "
                       f"params), median of {rounds} rounds (spread {min(slim_ratios):.2f}-{max(slim_ratios):.2f})",
             "value": round(statistics.median(slim_ratios), 2), "target": "> 1",
             "met": statistics.median(slim_ratios) > 1}]
