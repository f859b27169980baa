"""Choose and ship the winner: selection, the registry aliases, and the report in both UIs.

MLflow's parent run gets the Pareto plot, the comparison CSV and the markdown report; Prefect gets the
same report as a keyed markdown artifact, so its history across runs shows on the Artifacts page."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from tasks.concurrency import measured_slot, reads_host_counters
from wattflow.card import model_card
from wattflow.config import PipelineConfig
from wattflow.energy import make_meter
from wattflow.figures import comparison_csv, markdown_report, pareto_png
from wattflow.promotion import previous_champion, promotion_decision, reevaluate
from wattflow.registry import VERSION_PLACEHOLDER, registration
from wattflow.select import Selection, select_for
from wattflow.stages import StageResult, VariantFigures, metered_gpus
from wattflow.tracking import Tracker
from wattflow.workloads import workload_for

REPORT_ARTIFACT_KEY = "wattflow-report"


@task(name="select", cache_policy=NO_CACHE)
def select(cfg: PipelineConfig, rows: list[dict], figures: list[VariantFigures]) -> Selection:
    """On the exact figures (the rows are rounded for display), as MLflow holds them."""
    selection = select_for(cfg, rows, figures, workload_for(cfg).budget_metric)
    get_run_logger().info("champion: %s (%s)", selection.champion, selection.reason)
    return selection


def mlflow_link(tracker: Tracker, experiment_id: str, run_id: str) -> str:
    path = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracker.tracking_uri.startswith("http"):
        return f"{tracker.tracking_uri.rstrip('/')}/{path}"
    return f"http://127.0.0.1:5000/{path} (after `make mlflow-ui`)"


@task(name="previous-champion", cache_policy=NO_CACHE)
def previous_champion_row(cfg: PipelineConfig, run_dir: str) -> tuple[dict | None, str]:
    """The current `champion` version of this run's registered model, re-evaluated here beside the new variants
    (same machine, same measurement), as a summary row; (None, why) when there is none or it cannot be."""
    if cfg.select.promote == "always":
        return None, "select.promote is always"
    tracker = Tracker(journal_dir=run_dir)
    if tracker.offline:
        return None, "MLflow is unreachable"
    previous = previous_champion(tracker.client, workload_for(cfg).registered_model_name)
    if previous is None or previous.path is None:
        return None, "no current champion" if previous is None else previous.note
    try:
        meter = make_meter(cfg.energy, metered_gpus(cfg, "evaluate"))
        with measured_slot(get_run_logger().info, host_wide=reads_host_counters(meter)):
            row = reevaluate(cfg, previous, Path(run_dir) / "previous", meter)
    except Exception as err:  # another workload's model, an unreadable file: it cannot be compared here
        return None, (f"the current champion v{previous.version} cannot be re-evaluated here "
                      f"({type(err).__name__}: {err})")
    return row, f"re-evaluated v{previous.version}"


@task(name="ship", cache_policy=NO_CACHE)
def ship(cfg: PipelineConfig, parent_run_id: str, run_dir: str, experiment_id: str, selection: Selection,
         variants: list[StageResult], rows: list[dict], pipeline_energy: dict,
         previous: tuple[dict | None, str] = (None, "")) -> tuple[dict[str, str], str | None]:
    """Register champion and baseline, and publish the plot, CSV and report. Returns (alias -> version, a note
    when the registry was not updated as asked, else None)."""
    tracker = Tracker(journal_dir=run_dir)
    workload = workload_for(cfg)
    model_name = workload.registered_model_name
    sample = workload.sample(variants[0].artifact.path)
    data = workload.splits.identity.get("source")
    by_variant = {v.name: v for v in variants}
    row_of = {r["variant"]: r for r in rows}
    cards = {alias: model_card(row_of[name], selection, {  # each version's description is its model card
        "workload": workload.name, "data": data, "model_name": model_name, "version": VERSION_PLACEHOLDER,
        "alias": alias, "flow_run": f"{flow_run.name} ({flow_run.id})",
        "mlflow_run": mlflow_link(tracker, experiment_id, by_variant[name].mlflow_run_id), "sample": sample})
        for alias, name in (("champion", selection.champion), ("baseline", selection.baseline))}
    # The promotion guard: the new champion against the current one, both measured in this run.
    promote, why = promotion_decision(row_of[selection.champion], previous[0], selection.objective,
                                      cfg.select.promote)
    if previous[0] is None and cfg.select.promote != "always":
        why = f"{why} ({previous[1]})"
    get_run_logger().info("promotion: %s", why)
    hold = None if promote else f"the aliases stay: {why} (select.promote: if-better)"
    if cfg.tracking.log_models == "shipped":  # with "all", every stage logged its model already
        for name in dict.fromkeys((selection.champion, selection.baseline)):
            variant = by_variant[name]
            tracker.log_model(variant.mlflow_run_id, variant.artifact.path, variant.artifact.format)
    # Journaled like every write: while MLflow is unreachable the registration waits for `make sync`.
    registered = tracker.register(parent_run_id, registration(selection, variants, rows, model_name,
                                                              str(flow_run.id), cards, key=str(flow_run.id),
                                                              hold_aliases=hold))
    if registered is None:
        aliases, registry_note = {}, (f"MLflow is unreachable: the champion ({selection.champion}) will be "
                                      f"registered by {tracker.sync_command()}")
    else:
        aliases, registry_note = registered["aliases"], registered["refused"]
    if registry_note:
        get_run_logger().warning("registry: %s", registry_note)
    summary = {"workload": workload.name, "data": data,
               "model": cfg.train.model if isinstance(cfg.train.model, str) else cfg.train.model.factory,
               "epochs": cfg.train.epochs, "chains": [" -> ".join(c.labels) for c in cfg.chains],
               "select": cfg.select.model_dump(), "energy backend": cfg.energy.backend,
               "registered": {alias: f"{model_name} v{v}" for alias, v in aliases.items()} or registry_note,
               "promotion": why}
    if sample is not None:
        summary["sample of the trained model (prompt▌greedy continuation)"] = repr(sample)
    report = markdown_report(summary, rows, selection, [*(v.energy for v in variants), pipeline_energy],
                             mlflow_link(tracker, experiment_id, parent_run_id))
    selection_dir = Path(run_dir) / "selection"  # kept beside the checkpoints, whatever MLflow's state
    selection_dir.mkdir(parents=True, exist_ok=True)
    files = [pareto_png(rows, selection, selection_dir / "pareto.png"),
             comparison_csv(rows, selection, selection_dir / "variants.csv")]
    (selection_dir / "report.md").write_text(report)
    if not tracker.offline:
        for path in [*files, selection_dir / "report.md"]:
            tracker.client.log_artifact(parent_run_id, str(path), "selection")
    tracker.set_tags(parent_run_id, {"wattflow.champion": selection.champion,
                                     "wattflow.champion_reason": selection.reason[:5000]})
    create_markdown_artifact(report, key=REPORT_ARTIFACT_KEY,
                             description=f"wattflow: champion {selection.champion}")
    return aliases, registry_note
