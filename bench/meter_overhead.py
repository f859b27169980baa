"""Meter overhead: the same training stage (2 Gloo ranks under torchrun) with and without the energy
meter's window around it, interleaved pairs, median wall-time ratio. Target: <= 1.01."""

from __future__ import annotations

import statistics
import tempfile
import time

from wattflow.config import PipelineConfig
from wattflow.distributed import launch_training
from wattflow.energy import make_meter


def run(quick: bool) -> dict:
    cfg = PipelineConfig.model_validate({"train": {"epochs": 3 if quick else 10, "cpu_ranks": 2}})
    meter = make_meter(cfg.energy)
    pairs = 3 if quick else 5
    bare_s, metered_s = [], []
    with tempfile.TemporaryDirectory(prefix="wattflow-bench-") as tmp:
        for i in range(pairs):
            # Alternate which goes first, so a drift in machine load does not favour one side.
            for metered in ((False, True) if i % 2 == 0 else (True, False)):
                started = time.perf_counter()
                if metered:
                    with meter.window("train"):
                        launch_training(cfg, tmp, lambda _: None)
                    metered_s.append(time.perf_counter() - started)
                else:
                    launch_training(cfg, tmp, lambda _: None)
                    bare_s.append(time.perf_counter() - started)
    ratios = [m / b for m, b in zip(metered_s, bare_s, strict=True)]
    return {
        "row": "meter_overhead", "target": "<= 1.01", "pairs": pairs, "energy_method": meter.method_summary,
        "command": f"launch_training(epochs={cfg.train.epochs}, cpu_ranks=2) with/without meter.window",
        "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
        "median_bare_s": statistics.median(bare_s), "median_metered_s": statistics.median(metered_s),
    }
