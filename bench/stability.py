"""Champion stability: the default pipeline run 5 times in a row on one machine (training and compression cached
after the first run, so every run re-measures the same variants), counting how often the same champion is
chosen or the run declares a tie that includes the most frequent champion. Without intervals the champion of the
default run used to flip between onnx-int8-static and prune-0.8+onnx-int8-static (0.0156 vs 0.0157 J per 1k).

Writes bench/results/stability.json.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.machine import machine
from wattflow.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
TIED = re.compile(r"Tied within noise on \S+ \(95% intervals overlap\) with ([^;]+);")


def run_once(recipe: Path, tmp: Path, i: int) -> dict:
    out = tmp / f"run-{i}.json"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "PREFECT_HOME": str(tmp / "prefect")}
    env.pop("PREFECT_API_URL", None)  # a bench run never writes into the user's servers
    subprocess.run([sys.executable, "-m", "flows.pipeline", "--config", str(recipe), "--json-out", str(out)],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    tied = TIED.search(result["reason"])
    return {"champion": result["champion"], "tied_with": [t.strip() for t in tied[1].split(",")] if tied else [],
            "reason": result["reason"]}


def run(quick: bool, results: Path) -> list[dict]:
    n = 3 if quick else 5
    with tempfile.TemporaryDirectory(prefix="wattflow-bench-stability-") as tmp:
        recipe = Path(tmp) / "default.yaml"
        recipe.write_text(yaml.safe_dump(PipelineConfig(work_dir=str(Path(tmp) / "artifacts")).model_dump(
            mode="json")))
        runs = [run_once(recipe, Path(tmp), i) for i in range(n)]
    counts = collections.Counter(r["champion"] for r in runs)
    top, same = counts.most_common(1)[0]
    consistent = sum(1 for r in runs if r["champion"] == top or top in r["tied_with"])
    (results / "stability.json").write_text(json.dumps({
        "row": "stability", "machine": machine(), "runs": runs, "champions": dict(counts),
        "most_frequent": top, "same_champion": same, "same_or_declared_tie": consistent}, indent=2))
    return [{"row": f"champion stability over {n} runs", "figure": f"same champion ({top}) or a declared tie "
             f"with it; same champion alone {same}/{n}", "value": f"{consistent}/{n}", "target": f"{n}/{n}",
             "met": consistent == n}]
