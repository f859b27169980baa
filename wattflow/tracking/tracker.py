"""`Tracker`: every MLflow write wattflow makes, by explicit run id through `MlflowClient` (MLflow's "active
run" is thread-local, and Prefect runs tasks in worker threads).

Nothing is lost when the tracking server goes away: given a `journal_dir` (the flow's run directory), every
write is appended to `<journal_dir>/mlflow-journal.jsonl` before it is sent and acknowledged after. When MLflow
becomes unreachable, the tracker (every tracker on that journal, in this process) goes offline: writes are
only journaled, runs created meanwhile get an `offline-<key>` id, and `python -m wattflow.sync <run_dir>`
uploads what is pending later, into the right runs. Every string written goes through `mask_secrets`.
Constructing a Tracker changes no process-wide state (not MLflow's tracking URI, not the environment).
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from wattflow.preflight import mask_secrets
from wattflow.tracking.exports import log_input_now, log_model_now
from wattflow.tracking.journal import JOURNAL_NAME, Journal, mask_value
from wattflow.tracking.reachability import OfflineRunError, OfflineState, is_unreachable

RUN_KEY_TAG = "wattflow.run_key"  # a key chosen before creation, so a replayed create finds its run
OFFLINE_PREFIX = "offline-"
OFFLINE_EXPERIMENT_PREFIX = "offline-experiment:"
BATCH_LIMIT = 100  # MLflow's log_batch takes at most 100 params or tags per call

log = logging.getLogger(__name__)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def metric_key(name: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and space."""
    return re.sub(r"[^\w\-./ ]", "_", name)


def now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    def __init__(self, tracking_uri: str | None = None, journal_dir: str | os.PathLike | None = None):
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.client = MlflowClient(self.tracking_uri)  # reads; writes go through the methods below
        self.journal = Journal(Path(journal_dir) / JOURNAL_NAME) if journal_dir is not None else None

    # -- offline state -------------------------------------------------------------------------------------

    @property
    def offline(self) -> bool:
        return self.journal is not None and self.journal.path in OfflineState.offline

    def sync_command(self) -> str:
        assert self.journal is not None
        return (f"python -m wattflow.sync {self.journal.path.parent} "
                f"--tracking-uri {mask_secrets(self.tracking_uri)}")

    def _go_offline(self, err: BaseException) -> None:
        with OfflineState.lock:
            first = self.journal.path not in OfflineState.offline
            OfflineState.offline.setdefault(self.journal.path, f"{type(err).__name__}: {err}")
        if first:
            log.warning("MLflow at %s is unreachable (%s); continuing offline: every write is kept in %s. "
                        "Upload them once MLflow is back with:  %s", mask_secrets(self.tracking_uri),
                        mask_secrets(str(err).splitlines()[0] if str(err) else type(err).__name__),
                        self.journal.path, self.sync_command())

    # -- the one path every write takes --------------------------------------------------------------------

    def _write(self, op: str, run_id: str, args: dict[str, Any]) -> Any:
        """Journal (when a journal is set), then send unless offline; acknowledge what MLflow took."""
        args = mask_value(args)
        # A create_run is addressed by its own placeholder; what it must not reference is an offline parent.
        target = args["tags"].get("mlflow.parentRunId", "") if op == "create_run" else run_id
        only_journaled = target.startswith(OFFLINE_PREFIX)
        if only_journaled and self.journal is None:
            raise OfflineRunError(f"run {target} was created while MLflow was unreachable and exists only in a "
                                  "journal; write to it through a Tracker given the same journal_dir")
        if self.journal is None:
            return self.apply(op, run_id, args)
        seq = uuid.uuid4().hex
        self.journal.append({"seq": seq, "op": op, "run": run_id, "args": args})
        if self.offline or only_journaled:
            return None
        try:
            result = self.apply(op, run_id, args)
        except Exception as err:
            if is_unreachable(err):
                self._go_offline(err)
                return None
            self.journal.append({"ack": seq, "error": f"{type(err).__name__}: {err}"[:2000]})
            raise
        self.journal.append({"ack": seq, **({"run_id": result} if op == "create_run" else {})})
        return result

    def apply(self, op: str, run_id: str, args: dict[str, Any]) -> Any:
        """Send one journaled write to MLflow now (also what `wattflow.sync` replays)."""
        if op == "create_run":
            tags = {**args["tags"], RUN_KEY_TAG: args["key"]}
            return self.client.create_run(args["experiment_id"], start_time=args["start_time_ms"], tags=tags,
                                          run_name=args["run_name"]).info.run_id
        if op == "log_batch":
            metrics = [Metric(m["key"], m["value"], m["timestamp_ms"], m["step"]) for m in args.get("metrics", [])]
            params = [Param(k, v) for k, v in args.get("params", {}).items()]
            tags = [RunTag(k, v) for k, v in args.get("tags", {}).items()]
            self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        elif op == "log_dict":
            self.client.log_dict(run_id, args["data"], args["artifact_file"])
        elif op == "log_artifact":
            self.client.log_artifact(run_id, args["path"], args.get("artifact_path"))
        elif op == "log_model":
            log_model_now(self.tracking_uri, run_id, args["path"], args["fmt"])
        elif op == "log_input":
            log_input_now(self.client, run_id, args)
        elif op == "set_terminated":
            self.client.set_terminated(run_id, args["status"], args["end_time_ms"])
        elif op == "register":
            from wattflow.registry import apply_registration

            return apply_registration(self.client, args)
        else:
            raise ValueError(f"unknown journal op {op!r}")
        return None

    # -- experiments and runs ------------------------------------------------------------------------------

    def experiment_id(self, name: str) -> str:
        cached = OfflineState.experiments.get((self.tracking_uri, name))
        if cached:
            return cached
        if self.offline:
            return OFFLINE_EXPERIMENT_PREFIX + name
        try:
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
                name, artifact_location=self._local_artifact_root())
        except Exception as err:
            if self.journal is None or not is_unreachable(err):
                raise
            self._go_offline(err)
            return OFFLINE_EXPERIMENT_PREFIX + name
        OfflineState.experiments[(self.tracking_uri, name)] = exp_id
        return exp_id

    def experiment_of(self, run_id: str) -> str | None:
        """The run's experiment id; None when it cannot be known now (offline; sync takes the parent's)."""
        if run_id in OfflineState.run_experiment:
            return OfflineState.run_experiment[run_id]
        if self.offline or run_id.startswith(OFFLINE_PREFIX):
            return None
        try:
            return self.client.get_run(run_id).info.experiment_id
        except Exception as err:
            if self.journal is None or not is_unreachable(err):
                raise
            self._go_offline(err)
            return None

    def _local_artifact_root(self) -> str | None:
        """Beside a SQLite store, keep artifacts next to the database rather than in ./mlruns of the cwd."""
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri.removeprefix("sqlite:///"))
            return (db.parent / "mlartifacts").resolve().as_uri()
        return None

    def start_run(self, experiment_id: str | None, run_name: str, parent_run_id: str | None = None,
                  tags: dict[str, str] | None = None, params: dict[str, Any] | None = None) -> str:
        """Create a run; offline, an `offline-<key>` placeholder id that `wattflow.sync` maps to the real run."""
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        key = uuid.uuid4().hex
        args = {"experiment_id": experiment_id, "run_name": run_name, "tags": all_tags, "key": key,
                "start_time_ms": now_ms()}
        if experiment_id is None or experiment_id.startswith(OFFLINE_EXPERIMENT_PREFIX):
            if self.journal is None:
                raise OfflineRunError(f"experiment {experiment_id!r} is not known to MLflow; pass a real id")
            self._go_offline(RuntimeError("experiment unknown while MLflow is unreachable"))
        run_id = self._write("create_run", OFFLINE_PREFIX + key, args) or OFFLINE_PREFIX + key
        OfflineState.run_experiment[run_id] = experiment_id
        if params:
            self.log_params(run_id, params)
        return run_id

    def log_batch(self, run_id: str, metrics: dict[str, float | None] | None = None,
                  params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None, step: int = 0) -> None:
        """Metrics, params and tags in as few writes as MLflow allows (100 params and 100 tags per call).
        A metric of None means unknown: it is left out, never logged as 0. The timestamp is fixed here, so a
        replay by sync writes the very same point (MLflow drops exact duplicates)."""
        stamp = now_ms()
        points = [{"key": metric_key(k), "value": float(v), "timestamp_ms": stamp, "step": step}
                  for k, v in (metrics or {}).items() if v is not None]
        params_items = list(flatten(params or {}).items())
        tag_items = [(k, str(v)[:5000]) for k, v in (tags or {}).items()]  # MLflow's limit on a tag value
        for i in range(0, max(len(points), len(params_items), len(tag_items)), BATCH_LIMIT):
            chunk = {"metrics": points[i:i + BATCH_LIMIT], "params": dict(params_items[i:i + BATCH_LIMIT]),
                     "tags": dict(tag_items[i:i + BATCH_LIMIT])}
            self._write("log_batch", run_id, {k: v for k, v in chunk.items() if v})

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        self.log_batch(run_id, params=params)

    def log_metrics(self, run_id: str, metrics: dict[str, float | None], step: int = 0) -> None:
        self.log_batch(run_id, metrics=metrics, step=step)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.log_batch(run_id, tags=tags)

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        self.set_tags(run_id, {key: value})

    def log_dict(self, run_id: str, data: dict[str, Any], artifact_file: str) -> None:
        self._write("log_dict", run_id, {"data": data, "artifact_file": artifact_file})

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        """A file as a plain artifact of the run (copied to the artifact store; replayed by sync if offline)."""
        self._write("log_artifact", run_id, {"path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def end_run(self, run_id: str, ok: bool) -> None:
        status = RunStatus.FINISHED if ok else RunStatus.FAILED
        self._write("set_terminated", run_id, {"status": RunStatus.to_string(status), "end_time_ms": now_ms()})

    @contextmanager
    def run(self, experiment_id: str | None, run_name: str, parent_run_id: str | None = None,
            tags: dict[str, str] | None = None, params: dict[str, Any] | None = None) -> Iterator[str]:
        """A run that ends FINISHED, or FAILED (with the error as a tag) when the body raises."""
        run_id = self.start_run(experiment_id, run_name, parent_run_id, tags, params)
        try:
            yield run_id
        except BaseException as err:
            self.set_tag(run_id, "error", f"{type(err).__name__}: {err}")
            self.end_run(run_id, ok=False)
            raise
        self.end_run(run_id, ok=True)

    def log_model(self, run_id: str, path: str, fmt: str) -> None:
        """Log the variant as an MLflow model on its run, in its runtime's flavour (`wattflow.runtimes`: a
        signature, an input example, and `predict` returning the scores as one array)."""
        self._write("log_model", run_id, {"path": str(Path(path).resolve()), "fmt": fmt})

    def register(self, parent_run_id: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        """Register versions and move aliases (`wattflow.registry.registration` / `apply_registration`),
        journaled like every other write: while MLflow is unreachable it waits for `wattflow.sync`, which
        registers it once (the payload's key finds versions already made). Returns the result, or None when
        the write is only journaled."""
        return self._write("register", parent_run_id, payload)

    def log_input(self, run_id: str, dataset: dict[str, Any]) -> None:
        """The dataset a run trained on, through MLflow's dataset tracking (the UI's Dataset column and
        lineage): `dataset` holds name, digest, source, input shape and dtype, context."""
        self._write("log_input", run_id, dataset)

    def has_logged_model(self, run_id: str) -> bool:
        experiment_id = self.client.get_run(run_id).info.experiment_id
        found = self.client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                                 max_results=1)
        return len(found) > 0
