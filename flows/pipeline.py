"""The wattflow pipeline: train with DDP, prune, quantize, evaluate every variant, report.

    python -m flows.pipeline [--config recipe.yaml]     (what `make run-flow` runs)

Measured stages run one at a time (`max_workers=1`): energy counters (NVML, RAPL, process CPU
time) are device- or process-wide, so overlapping stages would be charged for each other's work.
The variants still fan out as futures, so the DAG is what the Prefect UI shows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from rich.console import Console

from flows.terminal import progress_bars
from tasks.progress import report
from tasks.ship import previous_champion_row, select, ship
from tasks.stages import compress, evaluate, measure, train
from wattflow.chains import plan
from wattflow.config import ConfigError, PipelineConfig, load_config
from wattflow.data import DataError
from wattflow.distributed import DeviceUnavailableError, check_device
from wattflow.energy import make_meter
from wattflow.preflight import ServiceUnreachable, preflight
from wattflow.report import rich_table, summary_rows
from wattflow.tracking import STAGE_TAG, Tracker, record_ratios
from wattflow.workloads import WorkloadError, check_workload


@flow(name="wattflow-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=1))
def pipeline(config: PipelineConfig = PipelineConfig()) -> dict:  # noqa: B008 (pydantic default, frozen)
    """Train, compress, evaluate and select; every stage logged to MLflow with accuracy, size and energy.

    Args:
        config: The whole recipe (the same shape as a YAML recipe under deployments/recipes): data, training,
            the compression chains, evaluation, energy, cache and selection settings.
    """
    logger = get_run_logger()
    workload = check_workload(config)  # a deployment's run skips main(): the same checks, before any work
    check_device(config)
    preflight(mlflow.get_tracking_uri(), None)
    run_dir = str(Path(config.work_dir).resolve() / str(flow_run.id))
    # Every MLflow write is journaled in the run directory first: if the server goes away mid-flow, the
    # pipeline goes on and `python -m wattflow.sync <run_dir>` uploads the rest later.
    tracker = Tracker(journal_dir=run_dir)
    experiment_id = tracker.experiment_id(config.experiment)
    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name),
            STAGE_TAG: "pipeline"}
    meter = make_meter(config.energy)
    with tracker.run(experiment_id, f"pipeline-{flow_run.name}", tags=tags,
                     params=config.model_dump()) as parent:
        logger.info("MLflow parent run %s; energy method: %s", parent, meter.method_summary)
        for note in meter.notes:
            logger.info("energy: %s", note)
        for note in workload.splits.notes:
            logger.warning("data: %s", note)
        with meter.window("pipeline") as total:
            trained = train(config, parent, run_dir)
            # Each step waits on its input's future, so chains sharing a prefix fan out from one result.
            outputs = {(): trained}
            for planned in plan(config.chains):
                outputs[planned.key] = compress.submit(config, parent, run_dir, outputs[planned.parent], planned)
            total_steps = 2 * len(outputs) - 1  # every step, then every variant's evaluation
            steps = []
            for done, key in enumerate(list(outputs)[1:], start=1):
                steps.append(outputs[key].result())
                report("variants", done, total_steps, f"variants: built {'+'.join(key)}")
            variants = [trained, *(v for v in steps if v is not None)]  # None: skipped, reason logged
            futures = [evaluate.submit(config, run_dir, v) for v in variants]
            figures = []
            for future, variant in zip(futures, variants, strict=True):
                figures.append(future.result())
                report("variants", len(steps) + len(figures), len(steps) + len(variants),
                       f"variants: evaluated {variant.name}")
            # Latency and energy round-robin across the variants, so drift hits all of them alike.
            figures = measure(config, run_dir, variants, figures)
        tracker.log_energy(parent, total.result)
        tracker.log_co2e(parent, total.result.energy_j, config.energy)
        rows = summary_rows(variants, figures)
        record_ratios(tracker, variants, rows)
        create_table_artifact(table=rows, key="wattflow-variants",
                              description=f"wattflow variants — MLflow parent run `{parent}`")
        selection = select(config, rows, figures)
        previous = previous_champion_row(config, run_dir)
        aliases, registry_note = ship(config, parent, run_dir, experiment_id, selection, variants, rows,
                                      total.result.to_dict(), previous)
    return {"mlflow_run_id": parent, "rows": rows, "champion": selection.champion, "reason": selection.reason,
            "registered": aliases, "registry_note": registry_note, "run_dir": run_dir,
            "sync_command": tracker.sync_command() if tracker.offline
            else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the wattflow pipeline once, here.")
    parser.add_argument("--config", default=os.environ.get("CONFIG") or None, help="YAML recipe")
    parser.add_argument("--json-out", type=Path, help="also write the summary rows here as JSON")
    args = parser.parse_args(argv)
    console = Console(width=max(Console().width, 160))  # piped output would otherwise fold the table at 80
    try:  # everything that can be checked before any work starts, and fails in seconds
        config = load_config(args.config)
        check_workload(config)
        check_device(config)
        preflight(mlflow.get_tracking_uri(), os.environ.get("PREFECT_API_URL"))
    except (ConfigError, DataError, WorkloadError, DeviceUnavailableError, ServiceUnreachable) as err:
        console.print(f"[red]{err}[/red]", highlight=False)
        return 2
    with progress_bars(console):
        result = pipeline(config)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    console.print(rich_table(result["rows"], champion=result["champion"]))
    registered = ", ".join(f"{alias} = v{v}" for alias, v in result["registered"].items())
    console.print(f"Champion: {result['champion']} ({result['reason']}); "
                  + (f"registered as {registered}" if registered else "aliases not moved"))
    if result["registry_note"]:
        console.print(f"[yellow]{result['registry_note']}[/yellow]", highlight=False)
    console.print(f"MLflow parent run: {result['mlflow_run_id']} (store: {Tracker().tracking_uri})")
    if result["sync_command"]:
        console.print(f"[yellow]MLflow was unreachable during the run: the writes wait in {result['run_dir']}; "
                      f"upload them with: {result['sync_command']}[/yellow]", highlight=False)
    console.print("Look at it:  make mlflow-ui   -> http://127.0.0.1:5000\n"
                  "             make prefect-ui  -> http://127.0.0.1:4200")
    return 0


if __name__ == "__main__":
    sys.exit(main())
