"""Upload what a flow run journaled while MLflow was unreachable, into the right runs.

    python -m wattflow.sync <run_dir> [--tracking-uri URI]

Reads `<run_dir>/mlflow-journal.jsonl` (written by `Tracker(journal_dir=run_dir)`) and replays, in order,
every write MLflow has not acknowledged: writes to runs created before the outage go to those runs; runs
created offline (`offline-<key>` ids) are created now, with their parent links, and mapped to their new
ids. Runs end with the status they recorded. Each replayed write is acknowledged in the journal, so a
second sync uploads nothing twice; a sync cut short resumes where it stopped.
"""

from __future__ import annotations

import argparse
import collections
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from wattflow.preflight import ServiceUnreachable, bound_mlflow_retries, check_mlflow, mask_secrets
from wattflow.tracking import JOURNAL_NAME, OFFLINE_EXPERIMENT_PREFIX, OFFLINE_PREFIX, RUN_KEY_TAG, Journal, Tracker


class SyncError(RuntimeError):
    """The journal names a run that cannot be resolved; the message says which and why."""


@dataclass
class SyncReport:
    replayed: collections.Counter = field(default_factory=collections.Counter)  # op -> count
    runs_created: int = 0
    already_there: int = 0   # writes MLflow held already (a run or model found by its key)
    refused_before: int = 0  # writes MLflow refused for good at the time: not retried
    notes: list[str] = field(default_factory=list)  # what a replayed write could not do (aliases not moved)

    @property
    def total(self) -> int:
        return sum(self.replayed.values())


def journal_path(run_dir_or_journal: str | Path) -> Path:
    path = Path(run_dir_or_journal)
    return path / JOURNAL_NAME if path.is_dir() else path


def pending_writes(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, str], int]:
    """(op records without an ack, in journal order; placeholder -> run id known so far; count refused)."""
    acks = {r["ack"]: r for r in records if "ack" in r}
    mapping = {r["map"]: r["run_id"] for r in records if "map" in r}
    for r in records:
        if r.get("op") == "create_run" and acks.get(r["seq"], {}).get("run_id"):
            mapping[r["run"]] = acks[r["seq"]]["run_id"]
    pending = [r for r in records if "op" in r and r["seq"] not in acks]
    refused = sum(1 for a in acks.values() if "error" in a)
    return pending, mapping, refused


class Replayer:
    def __init__(self, tracker: Tracker, journal: Journal, mapping: dict[str, str], report: SyncReport):
        self.tracker, self.journal, self.mapping, self.report = tracker, journal, mapping, report

    def resolve(self, run: str) -> str:
        if not run.startswith(OFFLINE_PREFIX):
            return run
        if run not in self.mapping:
            raise SyncError(f"{self.journal.path}: a write to run {run} comes before (or without) its creation; "
                            "the journal is damaged")
        return self.mapping[run]

    def experiment_for(self, args: dict[str, Any]) -> str:
        exp = args["experiment_id"]
        if exp is None:  # created offline in a process that did not know the parent's experiment
            parent = args["tags"].get("mlflow.parentRunId")
            if parent is None:
                raise SyncError(f"{self.journal.path}: run {args['run_name']!r} has neither an experiment nor a "
                                "parent run; the journal is damaged")
            return self.tracker.client.get_run(self.resolve(parent)).info.experiment_id
        if exp.startswith(OFFLINE_EXPERIMENT_PREFIX):
            return self.tracker.experiment_id(exp.removeprefix(OFFLINE_EXPERIMENT_PREFIX))
        return exp

    def create_run(self, record: dict[str, Any]) -> str:
        """The run created at the time (the write may have reached MLflow before its ack was lost), or a new one."""
        args = dict(record["args"])
        args["experiment_id"] = self.experiment_for(args)
        args["tags"] = {k: self.resolve(v) if k == "mlflow.parentRunId" else v for k, v in args["tags"].items()}
        found = self.tracker.client.search_runs([args["experiment_id"]],
                                                filter_string=f"tags.`{RUN_KEY_TAG}` = '{args['key']}'")
        if found:
            self.report.already_there += 1
            run_id = found[0].info.run_id
        else:
            run_id = self.tracker.apply("create_run", record["run"], args)
            self.report.runs_created += 1
        self.mapping[record["run"]] = run_id
        self.journal.append({"map": record["run"], "run_id": run_id})
        return run_id

    def replay(self, record: dict[str, Any]) -> None:
        op = record["op"]
        if op == "create_run":
            run_id = self.create_run(record)
        else:
            run_id = self.resolve(record["run"])
            args = record["args"]
            if op == "register":  # the versions' runs may have been created offline too
                args = {**args, "entries": [{**e, "run_id": self.resolve(e["run_id"])} for e in args["entries"]]}
            if op == "log_model" and self.tracker.has_logged_model(run_id):
                self.report.already_there += 1
            else:
                result = self.tracker.apply(op, run_id, args)
                if op == "register" and result["refused"]:
                    self.report.notes.append(result["refused"])
        self.report.replayed[op] += 1
        self.journal.append({"ack": record["seq"], **({"run_id": run_id} if op == "create_run" else {})})


def sync(run_dir: str | Path, tracking_uri: str | None = None) -> SyncReport:
    """Replay the journal's unacknowledged writes into MLflow at `tracking_uri` (default: the current one)."""
    path = journal_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no journal at {path}: pass the run directory of a flow run "
                                "(.wattflow/artifacts/<flow-run-id>) or the journal file itself")
    uri = tracking_uri or mlflow.get_tracking_uri()
    check_mlflow(uri)  # in seconds, before touching anything
    journal = Journal(path)
    pending, mapping, refused = pending_writes(journal.records())
    report = SyncReport(refused_before=refused)
    replayer = Replayer(Tracker(uri), journal, mapping, report)  # no journal of its own: errors raise
    for record in pending:
        replayer.replay(record)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Upload a flow run's journaled MLflow writes.")
    parser.add_argument("run_dir", type=Path, help="the flow run's directory (holds mlflow-journal.jsonl)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    args = parser.parse_args(argv)
    bound_mlflow_retries()
    try:
        report = sync(args.run_dir, args.tracking_uri)
    except (ServiceUnreachable, FileNotFoundError, SyncError) as err:
        print(mask_secrets(str(err)), file=sys.stderr)
        return 3
    ops = ", ".join(f"{n} {op}" for op, n in sorted(report.replayed.items())) or "nothing pending"
    print(f"synced {report.total} write(s) ({ops}); {report.runs_created} run(s) created offline now exist; "
          f"{report.already_there} already in MLflow; {report.refused_before} refused by MLflow at the time "
          "(not retried)")
    for note in report.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
