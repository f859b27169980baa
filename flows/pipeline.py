"""The wattflow pipeline: train with DDP, prune, quantize, evaluate every variant, report.

    python -m flows [--config recipe.yaml]     (what `make run-flow` runs: this module's main, with Prefect's
                                               temporary server starting while it imports; flows/__main__.py)

The stages are the library's stage loop (`wattflow.stage_loop`), each a Prefect task inside its MLflow child
run (`tasks.stages.TrackedStages`). Measured stages run one at a time: energy counters (NVML, RAPL, process CPU
time) are device- or process-wide, so overlapping stages would be charged for each other's work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote
from rich.console import Console

from flows.terminal import progress_bars
from tasks.concurrency import flow_run_slots, reads_host_counters
from tasks.ship import previous_champion_row, select, ship
from tasks.stages import TrackedStages
from wattflow.config import ConfigError, PipelineConfig, load_config
from wattflow.data import DataError
from wattflow.distributed import DeviceUnavailableError, check_device
from wattflow.energy import make_meter
from wattflow.preflight import ServiceUnreachable, bound_mlflow_retries, configured_prefect_api_url, preflight
from wattflow.report import rich_table, summary_rows
from wattflow.stage_loop import run_stages
from wattflow.tracking import STAGE_TAG, Tracker, log_energy, record_ratios
from wattflow.workloads import WorkloadError, check_workload


@flow(name="wattflow-pipeline")
def pipeline(config: PipelineConfig = PipelineConfig()) -> dict:  # noqa: B008 (pydantic default, frozen)
    """Train, compress, evaluate and select; every stage logged to MLflow with accuracy, size and energy.

    Args:
        config: The whole recipe (the same shape as a YAML recipe under deployments/recipes): data, training,
            the compression chains, evaluation, energy, cache and selection settings.
    """
    logger = get_run_logger()
    workload = check_workload(config)  # a deployment's run skips main(): the same checks, before any work
    check_device(config)
    bound_mlflow_retries()
    preflight(mlflow.get_tracking_uri(), None)
    run_dir = str(Path(config.work_dir).resolve() / str(flow_run.id))
    # Every MLflow write is journaled in the run directory first: if the server goes away mid-flow, the
    # pipeline goes on and `python -m wattflow.sync <run_dir>` uploads the rest later.
    tracker = Tracker(journal_dir=run_dir)
    experiment_id = tracker.experiment_id(config.experiment)
    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name),
            STAGE_TAG: "pipeline"}
    with tracker.run(experiment_id, f"pipeline-{flow_run.name}", tags=tags,
                     params=config.model_dump()) as parent:
        meter = make_meter(config.energy)
        logger.info("MLflow parent run %s; energy method: %s", parent, meter.method_summary)
        for note in meter.notes:
            logger.info("energy: %s", note)
        for note in workload.splits.notes:
            logger.warning("data: %s", note)
        # With a Prefect server, this host's measured-stage limits are acquired once for the run's measured
        # stages, not once per stage (tasks/concurrency.py); a multi-node training's node runs need them free.
        host_wide = reads_host_counters(meter)  # RAPL: stages on other GPUs of this host would move it too
        with flow_run_slots(logger.info, host_wide=host_wide) if config.train.nnodes == 1 else nullcontext():
            variants, figures, total = run_stages(config, TrackedStages(config, parent, run_dir))
            log_energy(tracker, parent, total, config.energy)
            rows = summary_rows(variants, figures)
            record_ratios(tracker, variants, rows)
            create_table_artifact(table=rows, key="wattflow-variants",
                                  description=f"wattflow variants — MLflow parent run `{parent}`")
            # quote(): not another task's result, so Prefect's graph does not link through it (tasks/stages.py)
            selection = select(quote(config), quote(rows), figures)
            previous = previous_champion_row(quote(config), quote(run_dir))
        aliases, registry_note = ship(quote(config), quote(parent), quote(run_dir), quote(experiment_id), selection,
                                      variants, quote(rows), quote(total.to_dict()), previous)
    return {"mlflow_run_id": parent, "rows": rows, "champion": selection.champion, "reason": selection.reason,
            "registered": aliases, "registry_note": registry_note, "run_dir": run_dir,
            "sync_command": tracker.sync_command() if tracker.offline
            else None}


def main(argv: list[str] | None = None, server_ready: Callable[[], None] = lambda: None) -> int:
    """The command line. `server_ready`: waits for a temporary Prefect server started earlier
    (`flows.temporary_server`, as `python -m flows` does)."""
    parser = argparse.ArgumentParser(description="Run the wattflow pipeline once, here.")
    parser.add_argument("--config", default=os.environ.get("CONFIG") or None, help="YAML recipe")
    parser.add_argument("--json-out", type=Path, help="also write the summary rows here as JSON")
    args = parser.parse_args(argv)
    console = Console(width=max(Console().width, 160))  # piped output would otherwise fold the table at 80
    try:  # everything that can be checked before any work starts, and fails in seconds
        config = load_config(args.config)
        check_workload(config)
        check_device(config)
        preflight(mlflow.get_tracking_uri(), configured_prefect_api_url())
    except (ConfigError, DataError, WorkloadError, DeviceUnavailableError, ServiceUnreachable) as err:
        console.print(f"[red]{err}[/red]", highlight=False)
        return 2
    server_ready()
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
