"""The registry against a real MLflow SQLite store: a torch and an ONNX variant logged on child runs, as the
flow logs them, then registered and loaded back by alias."""

import shutil

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from per_run import mlflow_store

from wattflow.compress.quantize import quantize_checkpoint
from wattflow.data import load_splits
from wattflow.energy import DeviceEnergy, EnergyResult
from wattflow.evaluate import load_predictor
from wattflow.models import build_model, default_spec, save_checkpoint, sha256_file
from wattflow.promotion import previous_champion
from wattflow.registry import (
    AliasRefused,
    RegistryError,
    apply_registration,
    load_alias,
    register_variants,
    registration,
)
from wattflow.select import select_champion
from wattflow.stages import Artifact, StageResult
from wattflow.tracking import STAGE_TAG, Tracker

FLOW_RUN_ID = "00000000-0000-4000-8000-000000000005"


def stage_result(name: str, chain: list[str], path: str, fmt: str, run_id: str) -> StageResult:
    energy = EnergyResult(name, 1.0, (DeviceEnergy("cpu:process-tree", 2.0, "estimated:cpu-time"),))
    return StageResult(name=name, stage="train" if name == "train" else "quantize", chain=chain,
                       artifact=Artifact(path=path, format=fmt, sha256=sha256_file(path)),
                       energy=energy.to_dict(), mlflow_run_id=run_id)


def summary_row(variant: StageResult, accuracy: float, energy: float, deploy_bytes: int) -> dict:
    return {"variant": variant.name, "chain": " -> ".join(variant.chain), "accuracy": accuracy,
            "delta_accuracy_points": 0.0, "energy_per_1k_inferences_j": energy,
            "inference_energy_method": "estimated:cpu-time", "deployable_bytes": deploy_bytes,
            "latency_b1_ms": 0.05}


@pytest.fixture(scope="module")
def logged(tmp_path_factory, checkpoints):
    """A parent run with two child runs: the trained MLP (torch) and its static int8 ONNX variant."""
    root = tmp_path_factory.mktemp("registry")
    tracker = Tracker(mlflow_store(root))
    splits = load_splits()
    ckpt = root / "mlp.pt"
    shutil.copyfile(checkpoints["mlp"], ckpt)
    onnx = quantize_checkpoint(ckpt, "onnx-int8-static", root, splits.train.x[:256])
    exp = tracker.experiment_id("registry-test")
    parent = tracker.start_run(exp, "pipeline", tags={STAGE_TAG: "pipeline"})
    variants, labels = [], {}
    for name, chain, path, fmt in (("train", ["train"], str(ckpt), "torch"),
                                   ("onnx-int8-static", ["train", "onnx-int8-static"], onnx.path, "onnx")):
        run_id = tracker.start_run(exp, name, parent_run_id=parent)
        tracker.log_model(run_id, path, fmt)
        variants.append(stage_result(name, chain, path, fmt, run_id))
        labels[name] = load_predictor(path, fmt).__call__(splits.test.x).argmax(axis=1)
    accuracy = {n: float((lab == splits.test.y).mean()) for n, lab in labels.items()}
    return tracker, parent, variants, labels, accuracy, splits.test.x


def test_champion_and_baseline_are_registered_with_lineage_tags_and_predict_like_the_variant(logged):
    tracker, parent, variants, labels, accuracy, x_test = logged
    train, int8 = variants
    rows = [summary_row(train, accuracy["train"], 0.07, 130_000),
            summary_row(int8, accuracy["onnx-int8-static"], 0.016, 42_000)]
    selection = select_champion(rows, accuracy_budget_points=2.0)
    assert selection.champion == "onnx-int8-static"

    aliases = register_variants(tracker, selection, variants, rows, "digits-test", FLOW_RUN_ID)
    client = MlflowClient(tracker.tracking_uri)
    champion = client.get_model_version_by_alias("digits-test", "champion")
    baseline = client.get_model_version_by_alias("digits-test", "baseline")
    assert aliases == {"champion": str(champion.version), "baseline": str(baseline.version)}
    assert champion.version != baseline.version
    assert champion.run_id == int8.mlflow_run_id and baseline.run_id == train.mlflow_run_id
    assert client.get_run(champion.run_id).data.tags["mlflow.parentRunId"] == parent
    tags = champion.tags
    assert tags["prefect.flow_run_id"] == FLOW_RUN_ID and tags["wattflow.chain"] == "train -> onnx-int8-static"
    assert tags["energy_per_1k_inferences_j"] == "0.016"
    assert tags["energy_per_1k_inferences.method"] == "estimated:cpu-time"
    assert tags["deployable_bytes"] == "42000" and float(tags["accuracy"]) == accuracy["onnx-int8-static"]

    for alias, name in (("champion", "onnx-int8-static"), ("baseline", "train")):
        logits = load_alias("digits-test", alias, tracker.tracking_uri)(x_test)
        assert logits.shape == (len(x_test), 10) and logits.dtype == np.float32
        np.testing.assert_array_equal(logits.argmax(axis=1), labels[name])


def test_a_baseline_champion_is_one_version_with_both_aliases(logged):
    tracker, _, variants, _, accuracy, _ = logged
    train, int8 = variants
    rows = [summary_row(train, accuracy["train"], 0.07, 130_000),
            summary_row(int8, accuracy["train"] - 0.2, 0.016, 42_000)]  # 20 points worse: out of budget
    selection = select_champion(rows)
    aliases = register_variants(tracker.client, selection, variants, rows, "digits-baseline", FLOW_RUN_ID)
    assert aliases["champion"] == aliases["baseline"] == "1"
    version = tracker.client.get_model_version_by_alias("digits-baseline", "champion")
    assert sorted(version.aliases) == ["baseline", "champion"] and version.run_id == train.mlflow_run_id


def test_a_variant_without_a_run_is_refused_by_name(logged):
    tracker, _, variants, _, accuracy, _ = logged
    train, int8 = variants
    rows = [summary_row(train, accuracy["train"], 0.07, 130_000),
            summary_row(int8, accuracy["train"], 0.016, 42_000)]
    orphan = int8.model_copy(update={"mlflow_run_id": None})
    with pytest.raises(RegistryError, match="champion 'onnx-int8-static' has no MLflow run"):
        register_variants(tracker, select_champion(rows), [train, orphan], rows, "digits-orphan", FLOW_RUN_ID)


def test_a_model_with_other_inputs_never_moves_the_aliases_of_a_registered_model(logged, tmp_path):
    """A run on 28x28 images registering into the digits' model name: its versions are kept, the aliases stay
    on the model that takes 64 features, and the error says why and what to set."""
    tracker, parent, variants, _, accuracy, _ = logged
    train, int8 = variants
    rows = [summary_row(train, accuracy["train"], 0.07, 130_000), summary_row(int8, accuracy["train"], 0.016, 42_000)]
    before = register_variants(tracker, select_champion(rows), variants, rows, "digits-shared", FLOW_RUN_ID)

    spec = {**default_spec("mlp"), "in_features": 784}
    ckpt = tmp_path / "mlp784.pt"
    save_checkpoint(ckpt, build_model(spec), spec, {"input_shape": [784], "input_dtype": "float32"})
    run_id = tracker.start_run(tracker.experiment_id("registry-test"), "train", parent_run_id=parent)
    tracker.log_model(run_id, str(ckpt), "torch")
    other = stage_result("train", ["train"], str(ckpt), "torch", run_id)
    other_rows = [summary_row(other, 0.9, 0.05, 100_000)]
    with pytest.raises(AliasRefused, match=r"takes inputs .*784.* the aliases stay on v1.*select.model_name") as err:
        register_variants(tracker, select_champion(other_rows), [other], other_rows, "digits-shared", FLOW_RUN_ID)
    assert err.value.versions == {"train": "3"}  # registered, kept, not aliased
    client = tracker.client
    assert str(client.get_model_version_by_alias("digits-shared", "champion").version) == before["champion"]
    assert str(client.get_model_version_by_alias("digits-shared", "baseline").version) == before["baseline"]


def test_the_current_champion_is_found_and_says_when_its_file_is_not_here(logged):
    tracker, _, variants, _, accuracy, _ = logged
    train, int8 = variants
    rows = [summary_row(train, accuracy["train"], 0.07, 130_000), summary_row(int8, accuracy["train"], 0.016, 42_000)]
    assert previous_champion(tracker.client, "digits-promotion") is None  # no model yet
    register_variants(tracker, select_champion(rows), variants, rows, "digits-promotion", FLOW_RUN_ID)
    found = previous_champion(tracker.client, "digits-promotion")
    assert found.variant == "onnx-int8-static" and found.run_id == int8.mlflow_run_id
    assert found.path is None and "not on this machine" in found.note  # these runs were never evaluated
    tracker.set_tag(int8.mlflow_run_id, "eval.deployable.path", int8.artifact.path)
    found = previous_champion(tracker.client, "digits-promotion")
    assert found.path is None and found.note == "its runtime was not recorded"
    tracker.set_tag(int8.mlflow_run_id, "eval.deployable.runtime", "onnx")
    found = previous_champion(tracker.client, "digits-promotion")
    assert (found.path, found.runtime) == (int8.artifact.path, "onnx")


def test_held_aliases_stay_and_the_versions_are_kept(logged):
    tracker, _, variants, _, accuracy, _ = logged
    train, int8 = variants
    rows = [summary_row(train, accuracy["train"], 0.07, 130_000), summary_row(int8, accuracy["train"], 0.016, 42_000)]
    first = register_variants(tracker, select_champion(rows), variants, rows, "digits-held", FLOW_RUN_ID)
    payload = registration(select_champion(rows), variants, rows, "digits-held", FLOW_RUN_ID,
                           hold_aliases="the aliases stay: worse beyond noise")
    result = apply_registration(tracker.client, payload)
    assert result["aliases"] == {} and result["refused"] == "the aliases stay: worse beyond noise"
    assert len(result["versions"]) == 2 and set(result["versions"].values()).isdisjoint(first.values())
    champion = tracker.client.get_model_version_by_alias("digits-held", "champion")
    assert str(champion.version) == first["champion"]
