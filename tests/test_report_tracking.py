import os

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from per_run import mlflow_store

from wattflow.config import EnergyConfig
from wattflow.energy import DeviceEnergy, EnergyResult
from wattflow.report import rich_table, sig, summary_rows
from wattflow.stages import Artifact, StageResult, VariantFigures
from wattflow.tracking import Tracker, flatten, record_stage


def variant(name: str, energy_j: float | None) -> StageResult:
    method = "unavailable" if energy_j is None else "estimated:cpu-time"
    energy = EnergyResult(name, 0.003, (DeviceEnergy("cpu:process-tree", energy_j, method),))
    return StageResult(name=name, stage="train", chain=[name], energy=energy.to_dict(),
                       artifact=Artifact(path="/nonexistent", format="torch", sha256="0" * 64))


FIGURES = {"scores": {"accuracy": 0.97}, "size_bytes": 1000, "size_lzma_bytes": 800, "nonzero_params": 10,
           "deployable_bytes": 900, "latency_s": {1: 2e-5, 256: 1e-3}, "energy_method": "estimated:cpu-time"}


def test_small_figures_keep_their_digits_and_unknown_is_never_zero():
    assert sig(0.0123456) == 0.01235 and sig(None) == "unknown"
    second = {**FIGURES, "size_bytes": 500, "deployable_bytes": 300}
    rows = summary_rows([variant("train", 0.004), variant("bf16", None)],
                        [VariantFigures(**FIGURES, energy_per_1k_inferences_j=1e-3), VariantFigures(**second)])
    assert rows[0]["stage_energy_j"] == 0.004 and rows[0]["energy_per_1k_inferences_j"] == 0.001
    assert rows[1]["stage_energy_j"] == "unknown" and rows[1]["stage_energy_method"] == "unavailable"
    assert rows[1]["energy_per_1k_inferences_j"] == "unknown" and rows[1]["size_vs_train_file"] == 0.5
    assert rows[0]["latency_b1_ms"] == 0.02 and rows[1]["deployable_compression_ratio"] == 3.0
    assert rich_table(rows).row_count == 2
    assert [c.header for c in rich_table(rows).columns][6:8] == ["b1 ms", "b256 ms"]  # one per batch size


def test_variant_figures_log_known_values_as_metrics_and_labels_as_tags():
    f = VariantFigures(**FIGURES, deployable_identical=True, energy_flags=("below_resolution",))
    metrics, tags = f.mlflow_metrics(), f.mlflow_tags()
    assert metrics["accuracy"] == 0.97 and metrics["latency_b256_s"] == 1e-3 and metrics["deployable_identical"] == 1.0
    assert "energy_per_1k_inferences_j" not in metrics and "param_count" not in metrics  # unknown: left out, not 0
    assert tags == {"eval.energy_per_1k_inferences.method": "estimated:cpu-time",
                    "eval.energy_per_1k_inferences.flags": "below_resolution"}


@pytest.fixture
def tracker(tmp_path):
    return Tracker(mlflow_store(tmp_path))


def test_a_stage_that_raises_leaves_its_run_failed_with_the_error(tracker):
    exp = tracker.experiment_id("t")
    parent = tracker.start_run(exp, "pipeline")

    def boom():
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        record_stage(tracker, parent, "prune-0.5", "prune", boom, EnergyConfig())
    (child,) = MlflowClient(tracker.tracking_uri).search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert child.info.status == "FAILED" and child.data.tags["error"] == "RuntimeError: disk full"
    assert child.data.tags["wattflow.stage"] == "prune"


def test_a_tracker_changes_no_process_wide_state(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    before = mlflow.get_tracking_uri()
    for uri in (mlflow_store(tmp_path, "other.db"), "http://127.0.0.1:9"):
        Tracker(uri, journal_dir=tmp_path / "run")
    assert mlflow.get_tracking_uri() == before and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_a_model_logged_through_a_tracker_goes_to_its_store_not_the_process_default(tmp_path, checkpoints):
    tracker = Tracker(mlflow_store(tmp_path, "mine.db"))
    before = mlflow.get_tracking_uri()
    run = tracker.start_run(tracker.experiment_id("t"), "r")
    tracker.log_model(run, str(checkpoints["mlp"]), "torch")
    assert tracker.has_logged_model(run) and mlflow.get_tracking_uri() == before


def test_unknown_metrics_are_left_out_not_logged_as_zero(tracker):
    run = tracker.start_run(tracker.experiment_id("t"), "r")
    tracker.log_metrics(run, {"energy_j": None, "accuracy": 0.9})
    assert tracker.client.get_run(run).data.metrics == {"accuracy": 0.9}


def test_sqlite_store_keeps_artifacts_beside_the_database(tracker, tmp_path):
    exp = tracker.client.get_experiment(tracker.experiment_id("t"))
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()


def test_config_is_flattened_into_dotted_params():
    assert flatten({"train": {"epochs": 3, "lr": 0.1}, "experiment": "x"}) == {
        "train.epochs": "3", "train.lr": "0.1", "experiment": "x"}


def test_a_refused_write_raises_and_is_not_mistaken_for_an_outage(tmp_path):
    """MLflow refusing a write (a param changed) is an error to fix, not a reason to go offline; sync does not
    retry it."""
    from mlflow.exceptions import MlflowException

    from wattflow.sync import sync

    tracker = Tracker(mlflow_store(tmp_path), journal_dir=tmp_path / "run")
    run = tracker.start_run(tracker.experiment_id("t"), "r", params={"a": 1})
    with pytest.raises(MlflowException):
        tracker.log_params(run, {"a": 2})
    assert not tracker.offline
    report = sync(tmp_path / "run", tracker.tracking_uri)
    assert report.total == 0 and report.refused_before == 1


def test_an_offline_run_id_needs_the_journal_that_holds_it(tmp_path):
    from wattflow.tracking import OfflineRunError

    with pytest.raises(OfflineRunError, match="same journal_dir"):
        Tracker(mlflow_store(tmp_path)).set_tag("offline-0123", "k", "v")
