"""Nothing is lost when MLflow goes away mid-flow: a real tracking server is killed while stages are logged,
the tracker carries on offline (journaling), the server comes back, `wattflow.sync` uploads every pending write
once into the right runs, and a second sync changes nothing."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from per_run import mlflow_store
from servers import free_port, start_mlflow_server

from wattflow.config import EnergyConfig
from wattflow.energy import DeviceEnergy, EnergyResult
from wattflow.models import build_model, default_spec, save_checkpoint
from wattflow.registry import registration
from wattflow.select import select_champion
from wattflow.stages import Artifact, StageResult, VariantFigures
from wattflow.sync import main as sync_main
from wattflow.sync import sync
from wattflow.tracking import (
    JOURNAL_NAME,
    OFFLINE_PREFIX,
    STAGE_TAG,
    Journal,
    Tracker,
    log_energy,
    record_evaluation,
    record_stage,
)


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group we started: the server and its workers
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def stage(name: str, checkpoint: Path, energy_j: float) -> StageResult:
    energy = EnergyResult(name, 0.5, (DeviceEnergy("cpu:process-tree", energy_j, "estimated:cpu-time"),))
    return StageResult(name=name, stage="prune", chain=["train", name], energy=energy.to_dict(),
                       params={"target_sparsity": 0.5}, metrics={"sparsity": 0.5},
                       artifact=Artifact(path=str(checkpoint), format="torch", sha256="0" * 64))


def failing_stage():
    raise RuntimeError("quantizer crashed")


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    spec = default_spec("mlp", mlp_hidden=[8])
    path = tmp_path / "run" / "prune" / "m.pt"
    save_checkpoint(path, build_model(spec), spec)
    return path


@pytest.mark.integration  # a real MLflow server, killed and restarted
def test_writes_during_an_outage_are_synced_once_into_the_right_runs(tmp_path, checkpoint, caplog, mlflow_db):
    store, run_dir, port = tmp_path / "store", tmp_path / "run", free_port()
    uri = f"http://127.0.0.1:{port}"
    energy_cfg = EnergyConfig()
    server = start_mlflow_server(store, port, mlflow_db)
    try:
        tracker = Tracker(uri, journal_dir=run_dir)
        exp = tracker.experiment_id("sync")
        parent = tracker.start_run(exp, "pipeline", tags={STAGE_TAG: "pipeline"}, params={"train": {"epochs": 1}})
        train = record_stage(tracker, parent, "train", "train", lambda: stage("train", checkpoint, 2.0), energy_cfg,
                             log_model=False)
        stop_server(server)  # the outage

        with caplog.at_level(logging.WARNING, logger="wattflow.tracking"):
            later = Tracker(uri, journal_dir=run_dir)  # a task's own tracker: offline too, once detected
            record_evaluation(later, train.mlflow_run_id, VariantFigures(scores={"accuracy": 0.91}, energy_method="x"))
            pruned = record_stage(later, parent, "prune-0.5", "prune", lambda: stage("prune-0.5", checkpoint, 1.0),
                                  energy_cfg, log_model=True)
            with pytest.raises(RuntimeError, match="quantizer crashed"):
                record_stage(later, parent, "bf16", "quantize", failing_stage, energy_cfg)
            # the registry write of `ship`, lost to the outage: journaled, registered by sync
            rows = [{"variant": "prune-0.5", "chain": "train -> prune-0.5", "accuracy": 0.9}]
            payload = registration(select_champion(rows), [pruned], rows, "sync-model", "flow-1",
                                   {"champion": "# sync-model v{version}"}, key="flow-1")
            assert later.register(parent, payload) is None
            pipeline_energy = EnergyResult("pipeline", 3.0, (DeviceEnergy("cpu", 9.0, "estimated:cpu-time"),))
            log_energy(tracker, parent, pipeline_energy, energy_cfg)
            tracker.end_run(parent, ok=True)
        assert tracker.offline and later.offline and pruned.mlflow_run_id.startswith(OFFLINE_PREFIX)
        warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(warnings) == 1 and uri in warnings[0] and f"python -m wattflow.sync {run_dir}" in warnings[0]

        server = start_mlflow_server(store, port)  # back, same store and port
        report = sync(run_dir, uri)
        assert report.runs_created == 2 and report.replayed["create_run"] == 2
        assert report.replayed["log_model"] == 1 and report.replayed["set_terminated"] == 3
        assert report.replayed["register"] == 1

        client = MlflowClient(uri)
        parent_run = client.get_run(parent)
        assert parent_run.info.status == "FINISHED" and parent_run.data.metrics["energy_j"] == 9.0
        assert parent_run.data.params == {"train.epochs": "1"}
        children = {r.info.run_name: r for r in client.search_runs(
            [exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")}
        assert set(children) == {"train", "prune-0.5", "bf16"}
        assert children["train"].info.run_id == train.mlflow_run_id  # created before the outage: same run
        assert children["train"].data.metrics["accuracy"] == 0.91 and children["train"].info.status == "FINISHED"
        prune = children["prune-0.5"]
        assert prune.info.status == "FINISHED" and prune.data.tags["energy.method"] == "estimated:cpu-time"
        assert prune.data.metrics["energy_j"] == 1.0 and prune.data.params["target_sparsity"] == "0.5"
        assert [a.path for a in client.list_artifacts(prune.info.run_id, "energy")] == ["energy/prune-0.5.json"]
        assert len(client.search_logged_models([exp], filter_string=f"source_run_id = '{prune.info.run_id}'")) == 1
        assert children["bf16"].info.status == "FAILED"
        assert children["bf16"].data.tags["error"] == "RuntimeError: quantizer crashed"

        def history() -> dict:
            runs = [parent_run, *children.values()]
            return {(r.info.run_name, k): len(client.get_metric_history(r.info.run_id, k))
                    for r in runs for k in client.get_run(r.info.run_id).data.metrics}

        before = history()
        assert set(before.values()) == {1}  # every metric point exactly once
        again = sync(run_dir, uri)
        assert again.total == 0 and history() == before
        assert len(client.search_runs([exp])) == 4
        assert len(client.search_logged_models([exp])) == 1
        # the registration: one version with both aliases, its card, from the run created during the outage
        (found,) = client.search_model_versions("name = 'sync-model'")
        version = client.get_model_version("sync-model", found.version)  # search results carry no aliases
        assert sorted(version.aliases) == ["baseline", "champion"] and version.run_id == prune.info.run_id
        assert version.description == f"# sync-model v{version.version}"
        # replayed once more (an ack lost after MLflow took it): the key finds the version, none is added
        Tracker(uri).apply("register", parent, {**payload, "entries": [
            {**e, "run_id": prune.info.run_id} for e in payload["entries"]]})
        assert len(client.search_model_versions("name = 'sync-model'")) == 1
    finally:
        stop_server(server)


def test_a_write_that_reached_mlflow_before_its_ack_is_not_duplicated(tmp_path):
    """A crash between MLflow taking a write and the journal's ack: sync finds the run by its key and the
    metric point by its timestamp, and adds nothing."""
    uri = mlflow_store(tmp_path)
    tracker = Tracker(uri, journal_dir=tmp_path / "run")
    run = tracker.start_run(tracker.experiment_id("crash"), "train")
    tracker.log_metrics(run, {"accuracy": 0.9})
    journal = tmp_path / "run" / JOURNAL_NAME
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(line for line in lines if '"ack"' not in line) + '\n{"seq": "torn')
    report = sync(tmp_path / "run", uri)
    assert report.replayed["create_run"] == 1 and report.already_there == 1 and report.runs_created == 0
    client = MlflowClient(uri)
    assert len(client.search_runs([tracker.experiment_id("crash")])) == 1
    assert len(client.get_metric_history(run, "accuracy")) == 1
    assert sync(tmp_path / "run", uri).total == 0
    assert all("seq" in r or "ack" in r or "map" in r for r in Journal(journal).records())


def test_sync_cli_names_a_missing_journal_and_a_dead_server(tmp_path, capsys):
    assert sync_main([str(tmp_path)]) == 3
    assert "no journal at" in capsys.readouterr().err
    Journal(tmp_path / JOURNAL_NAME).append({"seq": "1", "op": "log_batch", "run": "r", "args": {}})
    dead = f"http://127.0.0.1:{free_port()}"
    assert sync_main([str(tmp_path), "--tracking-uri", dead]) == 3
    err = capsys.readouterr().err
    assert dead in err and "make server" in err
