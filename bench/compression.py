"""The Deep Compression table (Han et al., ICLR 2016) on the bundled digits.

Runs the two recipes in deployments/recipes/ through the real pipeline (torchrun training, Prefect, MLflow in
a temporary store), then compares deployable artifacts: ratio = the trained model's deployable bytes / the
variant's (one definition, wattflow's packed format or the ONNX file). Writes bench/results/compression.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"LeNet-300-100 shape (MLP 64-300-100-10)": "deep-compression-mlp.yaml",
           "LeNet-5-like CNN (conv 6-16, fc 84)": "deep-compression-cnn.yaml"}
PAPER = [  # Han et al. 2016, Table 1 (MNIST): top-1 error before -> after, compression ratio
    {"model": "LeNet-300-100 (paper, MNIST)", "variant": "pruned + quantized + Huffman", "error_pct": 1.58,
     "baseline_error_pct": 1.64, "ratio": 40.0},
    {"model": "LeNet-5 (paper, MNIST)", "variant": "pruned + quantized + Huffman", "error_pct": 0.74,
     "baseline_error_pct": 0.80, "ratio": 39.0},
]
MAX_LOSS_POINTS = 0.5


def run_recipe(recipe: Path, tmp: Path) -> list[dict]:
    out = tmp / f"{recipe.stem}.json"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "PREFECT_HOME": str(tmp / "prefect")}
    env.pop("PREFECT_API_URL", None)  # a bench run never writes into the user's servers
    cmd = [sys.executable, "-m", "flows.pipeline", "--config", str(recipe), "--json-out", str(out)]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["rows"]


def run(quick: bool, results: Path) -> list[dict]:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="wattflow-bench-compression-") as tmp:
        # quick: the MLP recipe alone (the CNN one doubles the time)
        for model, recipe in list(RECIPES.items())[: 1 if quick else None]:
            variants = run_recipe(ROOT / "deployments/recipes" / recipe, Path(tmp))
            base = variants[0]
            for v in variants:
                rows.append({"model": model, "variant": v["chain"], "accuracy": v["accuracy"],
                             "error_pct": round(100 * (1 - v["accuracy"]), 2),
                             "accuracy_loss_points": round(100 * (base["accuracy"] - v["accuracy"]), 2),
                             "deployable_bytes": v["deployable_bytes"], "ratio": v["deployable_compression_ratio"],
                             "latency_b256_ms": v["latency_b256_ms"]})
    (results / "compression.json").write_text(json.dumps(rows + PAPER, indent=2))

    summary = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ok = [r for r in rows if r["model"] == model and r["accuracy_loss_points"] <= MAX_LOSS_POINTS]
        best = max(ok, key=lambda r: r["ratio"])
        summary.append({"row": f"compression: {model}", "figure": f"best ratio within {MAX_LOSS_POINTS} pt "
                        f"({best['variant']}, acc {best['accuracy']:.4f})", "value": best["ratio"],
                        "target": ">= 40 (aim 100)", "met": best["ratio"] >= 40})
    return summary
