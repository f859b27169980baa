"""`make bench` (BENCH=quick for a shorter run): runs each benchmark, which writes its own
bench/results/<name>.json; then writes bench/results/SUMMARY.md (with --only ROW: SUMMARY-ROW.md, leaving the full
run's summary alone) and prints the table.

Every figure is a ratio or a median measured in this one run: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import (
    compression,
    ddp_scaling,
    language_model,
    lm_int8,
    meter_overhead,
    orchestration,
    scale,
    speed,
    stability,
)
from bench.machine import machine

BENCHES = {"orchestration": orchestration.run, "ddp_scaling": ddp_scaling.run, "meter_overhead": meter_overhead.run,
           "speed": speed.run, "compression": compression.run, "scale": scale.run,
           "language_model": language_model.run, "lm_int8": lm_int8.run, "stability": stability.run}
RESULTS = Path(__file__).parent / "results"
COLUMNS = ("row", "figure", "value", "target", "met")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=sorted(BENCHES), action="append")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    host = machine()
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    summary = []
    for name in args.only or BENCHES:
        summary += BENCHES[name](args.quick, RESULTS)
    # --only re-runs some rows: their table goes beside the full run's SUMMARY.md, which keeps its rows and date.
    tag = f"-{'-'.join(args.only)}" if args.only else ""
    (RESULTS / f"machine{tag}.json").write_text(json.dumps({**host, "when": when, "quick": args.quick}, indent=2))
    table = Table(title=f"wattflow bench ({'quick' if args.quick else 'full'}), {when}")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for col in COLUMNS:
        table.add_column(col)
    for r in summary:
        cells = [str(r[c]) if c != "met" else ("yes" if r["met"] else "NO") for c in COLUMNS]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n{host['cpu_model']}, {host['cores']} cores; torch {host['torch']}, prefect "
                 f"{host['prefect']}, mlflow {host['mlflow']}; {when}{' (quick)' if args.quick else ''}.")
    (RESULTS / f"SUMMARY{tag}.md").write_text("\n".join(lines) + "\n")
    Console(width=max(Console().width, 140)).print(table)


if __name__ == "__main__":
    main()
