"""`make bench` (BENCH=quick for a shorter run): runs each benchmark row, writes
bench/results/<row>.json and bench/results/SUMMARY.md, and prints the table.

Every figure is a ratio or a median measured in this one run: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import meter_overhead
from bench.machine import machine

ROWS = {"meter_overhead": meter_overhead.run}
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=sorted(ROWS), action="append")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    host = machine()
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    results = []
    for name in args.only or ROWS:
        row = {**ROWS[name](args.quick), "quick": args.quick, "when": when, "machine": host}
        (RESULTS / f"{name}.json").write_text(json.dumps(row, indent=2))
        results.append(row)
    table = Table(title=f"wattflow bench ({'quick' if args.quick else 'full'}), {when}")
    for col in ("row", "median_ratio", "min_ratio", "max_ratio", "target", "blocks"):
        table.add_column(col)
    lines = ["| row | median ratio | min | max | target | blocks |", "|---|---|---|---|---|---|"]
    for r in results:
        cells = [r["row"], f"{r['median_ratio']:.4f}", f"{r['min_ratio']:.4f}", f"{r['max_ratio']:.4f}",
                 r["target"], str(r["blocks"])]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n{host['cpu_model']}, {host['cores']} cores; torch {host['torch']}, prefect "
                 f"{host['prefect']}, mlflow {host['mlflow']}; {when}.")
    (RESULTS / "SUMMARY.md").write_text("\n".join(lines) + "\n")
    Console().print(table)


if __name__ == "__main__":
    main()
