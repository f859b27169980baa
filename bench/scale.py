"""Scale: training time and peak memory as an image folder grows 1x and 10x (the digits as RGB 32x32 PNG files,
plus shifted copies: wattflow.datasets.sample_images), same epochs, the CNN on 2 Gloo ranks. The images stream
from disk through DataLoaders, so a rank's memory must stay flat. Reports the time per sample and the peak RSS
of the 10x run against the 1x run (linear time: a ratio ~1; streaming memory: within 1.2x)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.machine import machine
from wattflow.datasets.sample_images import write_digit_images

# Runs launch_training in a fresh interpreter: RUSAGE_CHILDREN's ru_maxrss there is the peak RSS of the
# largest process it waited for (torchrun and its ranks), uncontaminated by earlier runs.
LAUNCH = """
import json, resource, sys, time
from wattflow.config import PipelineConfig
from wattflow.distributed import launch_training
cfg = PipelineConfig.model_validate(json.loads(sys.argv[1]))
started = time.perf_counter()
out = launch_training(cfg, sys.argv[2], lambda _: None)
wall = time.perf_counter() - started
print(json.dumps({"wall_s": wall, "train_duration_s": out.metrics["train_duration_s"], "checkpoint": out.checkpoint,
                  "samples_seen": out.samples_seen, "val_accuracy": out.metrics["val_accuracy"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def launch(cfg: dict, out_dir: Path) -> dict:
    """launch_training(cfg) in a fresh subprocess: wall time, rank 0's metrics, peak RSS of the ranks."""
    done = subprocess.run([sys.executable, "-c", LAUNCH, json.dumps(cfg), str(out_dir)], check=True,
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool, results: Path) -> list[dict]:
    factors = [1, 10]
    epochs = 1 if quick else 2
    order = factors if quick else [*factors, *reversed(factors)]  # 1-10-10-1: drift hits both alike
    runs: dict[int, list[dict]] = {f: [] for f in factors}
    with tempfile.TemporaryDirectory(prefix="wattflow-bench-scale-") as tmp:
        for factor in factors:
            write_digit_images(Path(tmp) / f"images-{factor}x", mode="RGB", size=32, copies=factor)
        for i, factor in enumerate(order):
            cfg = {"data": {"dataset": "image-folder", "path": str(Path(tmp) / f"images-{factor}x")},
                   "train": {"epochs": epochs, "cpu_ranks": 2}}
            r = launch(cfg, Path(tmp) / f"run-{i}")
            r["train_samples_s"] = r["samples_seen"] / r["train_duration_s"]
            r["train_s_per_1k_samples"] = 1e3 * r["train_duration_s"] / r["samples_seen"]
            runs[factor].append(r)
    med = {f: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "checkpoint"} for f, rs in runs.items()}
    top = factors[-1]
    time_ratio = med[top]["train_s_per_1k_samples"] / med[1]["train_s_per_1k_samples"]
    mem_ratio = med[top]["peak_rss_mb"] / med[1]["peak_rss_mb"]
    row = {
        "row": "scale", "machine": machine(), "factors": factors, "epochs": epochs, "order": order,
        "command": f"launch_training(default CNN on an RGB 32x32 image folder of f x 1,797 PNG files, "
                   f"epochs={epochs}, cpu_ranks=2) in a fresh subprocess per run",
        "memory_method": "resource.getrusage(RUSAGE_CHILDREN).ru_maxrss in the fresh subprocess that ran "
                         "launch_training: the peak RSS of the largest single process (a rank), not the sum",
        "time_method": "rank 0's train_duration_s (the epoch loop, incl. per-epoch validation) / samples seen by "
                       "all ranks; wall_s is the whole launch (torchrun start, rendezvous, imports)",
        "medians": med, "runs": {str(f): rs for f, rs in runs.items()},
        f"time_per_sample_ratio_{top}x_vs_1x": time_ratio, f"peak_rss_ratio_{top}x_vs_1x": mem_ratio,
    }
    (results / "scale.json").write_text(json.dumps(row, indent=2))
    spread = ", ".join(f"{f}x {med[f]['train_duration_s']:.1f}s/{med[f]['peak_rss_mb']:.0f}MB" for f in factors)
    return [{"row": f"scale: training time per sample, {top}x vs 1x data", "value": round(time_ratio, 2),
             "figure": f"train s per sample ratio, medians of {len(runs[1])} ({spread})",
             "target": "<= 1.2 (linear)", "met": time_ratio <= 1.2},
            {"row": f"scale: peak RSS of a rank, {top}x vs 1x data", "value": round(mem_ratio, 2),
             "figure": f"ru_maxrss ratio ({med[1]['peak_rss_mb']:.0f} -> {med[top]['peak_rss_mb']:.0f} MB)",
             "target": "<= 1.2 (streaming: flat)", "met": mem_ratio <= 1.2}]
