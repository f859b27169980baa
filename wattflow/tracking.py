"""The MLflow adapter. Runs are addressed by explicit id through `MlflowClient` (MLflow's "active
run" is thread-local, and Prefect runs tasks in worker threads).

Contract: one parent run per flow run (configuration as params, tag `prefect.flow_run_id`); one
child run per stage and variant (tag `wattflow.stage`; metrics `accuracy`, `size_bytes`, `energy_j`;
tag `energy.method`); evaluation figures on the run of the variant they describe.

Nothing is lost when the tracking server goes away: given a `journal_dir` (the flow's run directory),
`Tracker` appends every write to `<journal_dir>/mlflow-journal.jsonl` before sending it and acknowledges
it after. When MLflow becomes unreachable, the tracker (every tracker on that journal, in this process)
goes offline: writes are only journaled, runs created meanwhile get an `offline-<key>` id, and
`python -m wattflow.sync <run_dir>` uploads what is pending later, into the right runs. Every string
written (params, tags, run names, dict artifacts, the journal) goes through `mask_secrets`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from wattflow.config import EnergyConfig
from wattflow.energy import EnergyResult, co2e_g
from wattflow.preflight import mask_secrets
from wattflow.runtimes import runtime

STAGE_TAG = "wattflow.stage"
RUN_KEY_TAG = "wattflow.run_key"  # a key chosen before creation, so a replayed create finds its run
JOURNAL_NAME = "mlflow-journal.jsonl"
OFFLINE_PREFIX = "offline-"
OFFLINE_EXPERIMENT_PREFIX = "offline-experiment:"
BATCH_LIMIT = 100  # MLflow's log_batch takes at most 100 params or tags per call

log = logging.getLogger(__name__)
# MLflow suggests type hints on a pyfunc's predict for automatic signatures; wattflow logs explicit signatures.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method")


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


def mask_value(value: Any) -> Any:
    """`mask_secrets` applied to every string inside a JSON-like value."""
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, dict):
        return {k: mask_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_value(v) for v in value]
    return value


def now_ms() -> int:
    return int(time.time() * 1000)


class Journal:
    """Append-only JSON lines: an op record before a write is sent, `{"ack": seq}` once MLflow took it
    (`"error"` beside it when MLflow refused it for good), `{"map": placeholder, "run_id": id}` when sync
    created an offline run. Each line is flushed and fsynced, so a crash loses at most the line being written;
    a torn last line is skipped when read."""

    _locks: dict[Path, threading.Lock] = {}
    _locks_guard = threading.Lock()

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        with self._locks_guard:
            self.lock = self._locks.setdefault(self.path, threading.Lock())

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(mask_value(record), separators=(",", ":"), default=str) + "\n"
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as f:
                if f.tell() > 0:  # after a crash mid-line, start on a fresh line
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
                f.write(line.encode())
                f.flush()
                os.fsync(f.fileno())

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping a torn line in %s", self.path)
        return out


class _Shared:
    """Process-wide state per journal: whether MLflow was found unreachable (then every tracker on the journal
    stays offline, so no task waits on a dead server again), and which experiment each run belongs to."""

    lock = threading.Lock()
    offline: dict[Path, str] = {}           # journal path -> the error that took it offline
    run_experiment: dict[str, str | None] = {}
    experiments: dict[tuple[str, str], str] = {}  # (tracking uri, name) -> id


CONNECTION_ERROR_TEXT = re.compile(r"max retries exceeded|connection refused|failed to establish|timed out|"
                                   r"remotedisconnected|connection aborted|too many \d+ error responses", re.I)


def is_unreachable(err: BaseException) -> bool:
    """A connection-level failure (MLflow down, network gone, the store's database unreachable), as opposed
    to MLflow refusing the write itself (an invalid value), which must still raise."""
    import requests
    import urllib3

    try:
        from sqlalchemy.exc import OperationalError
    except ImportError:  # pragma: no cover - sqlalchemy ships with mlflow
        OperationalError = ()  # noqa: N806
    kinds = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError,
             urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OperationalError)
    seen: BaseException | None = err
    for _ in range(10):  # MLflow re-raises as MlflowException, often without `from`: follow both links
        if seen is None:
            break
        if isinstance(seen, kinds):
            return True
        if isinstance(seen, mlflow.exceptions.MlflowException) and CONNECTION_ERROR_TEXT.search(str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class OfflineRunError(RuntimeError):
    """A run created while MLflow was unreachable, addressed by a tracker that has no journal."""


class Tracker:
    def __init__(self, tracking_uri: str | None = None, journal_dir: str | os.PathLike | None = None):
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        if self.tracking_uri.startswith(("http://", "https://")):
            # MLflow's default (7 retries, exponential back-off) blocks for minutes on a dead server.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        mlflow.set_tracking_uri(self.tracking_uri)  # for the model-logging helpers, which use fluent APIs
        self.client = MlflowClient(self.tracking_uri)  # reads; writes go through the methods below
        self.journal = Journal(Path(journal_dir) / JOURNAL_NAME) if journal_dir is not None else None

    # -- offline state -------------------------------------------------------------------------------------

    @property
    def offline(self) -> bool:
        return self.journal is not None and self.journal.path in _Shared.offline

    def sync_command(self) -> str:
        assert self.journal is not None
        return (f"python -m wattflow.sync {self.journal.path.parent} "
                f"--tracking-uri {mask_secrets(self.tracking_uri)}")

    def _go_offline(self, err: BaseException) -> None:
        with _Shared.lock:
            first = self.journal.path not in _Shared.offline
            _Shared.offline.setdefault(self.journal.path, f"{type(err).__name__}: {err}")
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
        elif op == "log_model":
            self._log_model_now(run_id, args["path"], args["fmt"])
        elif op == "log_input":
            self._log_input_now(run_id, args)
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
        cached = _Shared.experiments.get((self.tracking_uri, name))
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
        _Shared.experiments[(self.tracking_uri, name)] = exp_id
        return exp_id

    def experiment_of(self, run_id: str) -> str | None:
        """The run's experiment id; None when it cannot be known now (offline; sync takes the parent's)."""
        if run_id in _Shared.run_experiment:
            return _Shared.run_experiment[run_id]
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
        _Shared.run_experiment[run_id] = experiment_id
        if params:
            self.log_params(run_id, params)
        return run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = list(flatten(params).items())
        for i in range(0, len(items), BATCH_LIMIT):
            self._write("log_batch", run_id, {"params": dict(items[i:i + BATCH_LIMIT])})

    def log_metrics(self, run_id: str, metrics: dict[str, float | None], step: int = 0) -> None:
        """None means unknown: it is left out, never logged as 0. The timestamp is fixed here, so a replay
        by sync writes the very same point (MLflow drops exact duplicates)."""
        stamp = now_ms()
        points = [{"key": metric_key(k), "value": float(v), "timestamp_ms": stamp, "step": step}
                  for k, v in metrics.items() if v is not None]
        for i in range(0, len(points), BATCH_LIMIT):
            self._write("log_batch", run_id, {"metrics": points[i:i + BATCH_LIMIT]})

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        items = [(k, str(v)[:5000]) for k, v in tags.items()]  # MLflow's limit on a tag value
        for i in range(0, len(items), BATCH_LIMIT):
            self._write("log_batch", run_id, {"tags": dict(items[i:i + BATCH_LIMIT])})

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        self.set_tags(run_id, {key: value})

    def log_dict(self, run_id: str, data: dict[str, Any], artifact_file: str) -> None:
        self._write("log_dict", run_id, {"data": data, "artifact_file": artifact_file})

    def log_energy(self, run_id: str, energy: EnergyResult) -> None:
        """The stage's energy: totals per device kind, the method and scope as tags, and the full
        per-device record as a JSON artifact. Unknown figures are left out, never written as 0."""
        by_kind = energy.energy_by_kind()
        self.log_metrics(run_id, {
            "energy_j": energy.energy_j, "energy_gpu_j": by_kind.get("gpu"), "energy_cpu_j": by_kind.get("cpu"),
            "energy_dram_j": by_kind.get("dram"), "power_avg_w": energy.avg_power_w,
            "energy_duration_s": energy.duration_s})
        self.set_tags(run_id, {"energy.method": energy.method, "energy.scope": energy.scope,
                               "energy.node": energy.node, "energy.flags": ",".join(energy.flags) or "none"})
        self.log_dict(run_id, energy.to_dict(), f"energy/{metric_key(energy.name)}.json")

    def log_co2e(self, run_id: str, energy_j: float | None, cfg: EnergyConfig) -> None:
        """Carbon as its own explicit step: kWh x grid intensity x PUE, each input recorded beside it."""
        self.log_metrics(run_id, {"co2e_g": co2e_g(energy_j, cfg.carbon_intensity_g_per_kwh, cfg.pue)})
        self.set_tags(run_id, {"carbon.intensity_g_per_kwh": str(cfg.carbon_intensity_g_per_kwh),
                               "carbon.intensity_source": cfg.carbon_intensity_source, "carbon.pue": str(cfg.pue)})

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
        signature, an input example, and `predict` returning the scores as one array). MLflow's model logging
        needs the fluent active run, whose context ends the run: call this last."""
        self._write("log_model", run_id, {"path": str(Path(path).resolve()), "fmt": fmt})

    def _log_model_now(self, run_id: str, path: str, fmt: str) -> None:
        with mlflow.start_run(run_id=run_id):
            runtime(fmt).log_model(path)

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

    def _log_input_now(self, run_id: str, dataset: dict[str, Any]) -> None:
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.types import Schema, TensorSpec

        source = dataset["source"]
        with warnings.catch_warnings():  # a local path matches MLflow's local source twice; it takes the first
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            resolved = (resolve_dataset_source(source) if Path(source).exists()
                        else CodeDatasetSource({"source": source}))
        schema = Schema([TensorSpec(np.dtype(dataset["dtype"]), (-1, *dataset["shape"]), "x")])
        meta = MetaDataset(source=resolved, name=dataset["name"], digest=dataset["digest"], schema=schema)
        self.client.log_inputs(run_id, [DatasetInput(meta._to_mlflow_entity(),
                                                     tags=[InputTag("mlflow.data.context", dataset["context"])])])

    def has_logged_model(self, run_id: str) -> bool:
        experiment_id = self.client.get_run(run_id).info.experiment_id
        found = self.client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                                 max_results=1)
        return len(found) > 0


def record_stage(tracker: Tracker, parent_run_id: str, name: str, stage: str, work, energy_cfg: EnergyConfig,
                 log_model: bool = True):
    """Run `work()` (which returns a StageResult) inside a child run of `parent_run_id`, log the
    stage contract (params, metrics, `energy_j` + `energy.method`, `size_bytes`, the model) and
    return the result with its run id. The child run ends FAILED if anything raises."""
    experiment_id = tracker.experiment_of(parent_run_id)
    with tracker.run(experiment_id, name, parent_run_id, tags={STAGE_TAG: stage}) as run_id:
        result = work()
        tracker.set_tag(run_id, "wattflow.chain", " -> ".join(result.chain))
        tracker.log_params(run_id, result.params)
        tracker.log_metrics(run_id, {**result.metrics, "size_bytes": Path(result.artifact.path).stat().st_size})
        if getattr(result, "cached", False):
            log_reused_energy(tracker, run_id, result, energy_cfg)
        else:
            tracker.log_energy(run_id, result.energy_result)
            tracker.log_co2e(run_id, result.energy_result.energy_j, energy_cfg)
        tracker.set_tag(run_id, "artifact.sha256", result.artifact.sha256)
        if log_model:
            tracker.log_model(run_id, result.artifact.path, result.artifact.format)
    return result.model_copy(update={"mlflow_run_id": run_id})


def log_reused_energy(tracker: Tracker, run_id: str, result, energy_cfg: EnergyConfig) -> None:
    """A cached stage spent (almost) nothing in this flow run: its original cost is logged as *reused*, never
    as this run's `energy_j`, so summing `energy_j` over runs counts every joule once."""
    energy = result.energy_result
    tracker.log_metrics(run_id, {"energy_reused_j": energy.energy_j,
                                 "co2e_reused_g": co2e_g(energy.energy_j, energy_cfg.carbon_intensity_g_per_kwh,
                                                         energy_cfg.pue)})
    producer = result.params.get("produced_by_flow_run", "an earlier flow run")
    tracker.set_tags(run_id, {"energy.method": energy.method, "energy.flags": "cached",
                              "energy.scope": f"reused: spent by flow run {producer}, not this one"})


def record_evaluation(tracker: Tracker, run_id: str, figures) -> None:
    """Evaluation figures (a `wattflow.stages.VariantFigures`) go on the run of the variant they describe
    (logging to a finished run is allowed); unknown figures are left out, never logged as 0."""
    tracker.log_metrics(run_id, figures.mlflow_metrics())
    tracker.set_tags(run_id, figures.mlflow_tags())


def record_ratios(tracker: Tracker, variants, rows: list[dict]) -> None:
    """Ratios need every variant's figures, so they are logged once all are evaluated."""
    for variant, row in zip(variants, rows, strict=True):
        tracker.log_metrics(variant.mlflow_run_id, {
            "deployable_compression_ratio": row["deployable_compression_ratio"],
            "size_ratio_vs_train_file": row["size_vs_train_file"]})
