"""The real flow, end to end: the test run's Prefect server, a temporary MLflow SQLite store, two real
Gloo ranks under torchrun, real pruning, real ONNX Runtime int8. Then the store is read back."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from servers import model_server

from flows.pipeline import pipeline
from wattflow.config import PipelineConfig, load_config
from wattflow.data import first_samples
from wattflow.datasets.sample_images import write_digit_images
from wattflow.datasets.text import embedded_corpus
from wattflow.evaluate import load_predictor
from wattflow.workloads import workload_for

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bring-your-own"
RECIPES = Path(__file__).resolve().parents[1] / "deployments" / "recipes"

ENERGY_METHODS = {"estimated:cpu-time", "measured:rapl", "measured:nvml", "measured:nvml+measured:rapl",
                  "estimated:cpu-time+measured:nvml"}


def tiny_config(tmp_path, **train) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "work_dir": str(tmp_path / "artifacts"),
        "train": {"model": "cnn", "epochs": 8, "lr": 0.1, "cpu_ranks": 2, **train},
        "chains": ["prune:0.8", "onnx-int8-static", "bf16", "distill -> prune:0.9 -> kmeans-4bit", "channels:0.5"],
        "prune": {"fine_tune_epochs": 2, "schedule_steps": 2},
        "distill": {"epochs": 10},
        "eval": {"repeats": 3, "warmup": 1, "energy_inferences": 2000, "energy_min_window_s": 0.2},
    })


async def task_graph(flow_run_id: str) -> dict[str, set[str]]:
    """Task run name (its generated suffix cut) -> the names of the task runs Prefect links it to."""
    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)])))
    name = {r.id: r.name.rsplit("-", 1)[0] if r.name.startswith(("train-", "measure-", "select-", "ship-"))
            else r.name for r in runs}
    return {name[r.id]: {name[i.id] for inputs in r.task_inputs.values() for i in inputs
                         if getattr(i, "input_type", "") == "task_run"} for r in runs}


async def read_flow_run(flow_run_id: str):
    async with get_client() as client:
        run = await client.read_flow_run(uuid.UUID(flow_run_id))
        artifacts = await client.read_artifacts()
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    return run, artifacts, logs


def test_pipeline_logs_the_mlflow_contract(prefect_server, mlflow_uri, tmp_path, monkeypatch):
    # Secrets in the environment must never reach the Prefect logs (the MLflow side: tests/test_security.py).
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "s3cr3t-token-value")
    monkeypatch.setenv("WATTFLOW_TEST_DB_URL", "postgresql://wattflow:pa55w0rd-value@db:5432/mlflow")
    result = pipeline(tiny_config(tmp_path))

    client = MlflowClient(mlflow_uri)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.epochs"] == "8" and parent.data.params["train.cpu_ranks"] == "2"
    assert parent.data.tags["energy.method"] in ENERGY_METHODS and parent.data.metrics["energy_j"] > 0
    # carbon, as its own step, with every input beside it
    assert parent.data.metrics["co2e_g"] == pytest.approx(
        parent.data.metrics["energy_j"] / 3.6e6 * 481.0 * 1.0)
    assert parent.data.tags["carbon.intensity_g_per_kwh"] == "481.0" and "Ember" in parent.data.tags[
        "carbon.intensity_source"]

    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {c.info.run_name: c for c in children}
    train = by_name["train"].data.metrics
    assert set(by_name) == {"train", "prune-0.8", "onnx-int8-static", "bf16", "distill", "distill+prune-0.9",
                            "distill+prune-0.9+kmeans-4bit", "channels-0.5"}
    assert {c.data.tags["wattflow.stage"] for c in children} == {"train", "prune", "quantize", "distill"}
    assert by_name["distill+prune-0.9+kmeans-4bit"].data.tags["wattflow.chain"] == (
        "train -> distill -> prune-0.9 -> kmeans-4bit")
    for child in children:
        m = child.data.metrics
        assert child.info.status == "FINISHED"
        assert 0.0 < m["accuracy"] <= 1.0 and m["size_bytes"] > 0 and m["energy_j"] > 0
        assert child.data.tags["energy.method"] in ENERGY_METHODS and child.data.tags["energy.scope"]
        assert m["energy_cpu_j"] > 0 and m["power_avg_w"] == pytest.approx(m["energy_j"] / m["energy_duration_s"])
        (record_file,) = client.list_artifacts(child.info.run_id, "energy")
        record = mlflow.artifacts.load_dict(f"{child.info.artifact_uri}/{record_file.path}")
        assert record["energy_j"] == pytest.approx(m["energy_j"]) and record["devices"]
        assert m["latency_b1_s"] > 0 and m["latency_b256_s"] > 0 and m["energy_per_1k_inferences_j"] > 0
        assert m["inferences_measured"] >= 2000
        assert child.data.tags["eval.energy_per_1k_inferences.method"] in ENERGY_METHODS
        assert child.data.tags["eval.device"] == "cpu"   # every variant on one device: like with like
        assert m["param_count"] >= m["nonzero_params"] > 0 and m["size_lzma_bytes"] > 0 and m["dense_bytes"] > 0
        assert m["deployable_bytes"] > 0 and m["deployable_compression_ratio"] > 0
        assert m.get("deployable_identical", 1.0) == 1.0  # a packed artifact predicts exactly as its variant
        logged = mlflow.search_logged_models(experiment_ids=[parent.info.experiment_id],
                                             filter_string=f"source_run_id = '{child.info.run_id}'",
                                             output_format="list")
        # tracking.log_models: shipped (the default): only the champion and the baseline are MLflow models;
        # every variant keeps its deployable file on its run
        assert len(logged) == (1 if child.info.run_name in {result["champion"], "train"} else 0), child.info.run_name
        assert client.list_artifacts(child.info.run_id, "deployable"), child.info.run_name

    assert train["accuracy"] >= 0.95
    assert by_name["onnx-int8-static"].data.metrics["size_bytes"] <= 0.35 * train["size_bytes"]
    assert by_name["onnx-int8-static"].data.metrics["accuracy"] >= train["accuracy"] - 0.02
    assert by_name["prune-0.8"].data.metrics["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert by_name["prune-0.8"].data.metrics["nonzero_params"] < 0.3 * train["param_count"]

    # The Prefect side: the flow run the parent points at completed, and published its artifacts.
    flow_run, artifacts, logs = asyncio.run(read_flow_run(parent.data.tags["prefect.flow_run_id"]))
    assert flow_run.state.is_completed()
    assert len(logs) > 20 and any("epoch" in log.message for log in logs)  # rank 0's lines are there
    assert not [log.message for log in logs if "s3cr3t-token-value" in log.message or "pa55w0rd" in log.message]
    mine = {a.key: a for a in artifacts if a.flow_run_id == flow_run.id}
    assert {"wattflow-variants", "wattflow-report", "wattflow-training-progress"} <= set(mine)
    assert "onnx-int8-static" in str(mine["wattflow-variants"].data)
    assert mine["wattflow-training-progress"].type == "progress" and mine["wattflow-training-progress"].data == 100.0
    assert result["champion"] in mine["wattflow-report"].data and mine["wattflow-report"].type == "markdown"
    # The UI's graph: each step hangs off its input (through the input's fields Prefect may also link earlier
    # ancestors), never off an unrelated variant; each evaluation off its variant
    graph = asyncio.run(task_graph(str(flow_run.id)))
    assert graph["train"] == set()
    lineage = {"onnx-int8-static": ["train"], "distill": ["train"], "distill+prune-0.9": ["distill", "train"],
               "distill+prune-0.9+kmeans-4bit": ["distill+prune-0.9", "distill", "train"],
               "evaluate-channels-0.5": ["channels-0.5", "train"]}
    for task_name, ancestors in lineage.items():
        assert ancestors[0] in graph[task_name] and graph[task_name] <= set(ancestors), (task_name, graph[task_name])

    # The champion: registered under its alias, a child of this flow's parent run, and (from the MLflow
    # metrics alone) within the accuracy budget and the lowest energy per inference among those that are.
    registered = client.get_model_version_by_alias("wattflow-digits", "champion")
    champion_run = client.get_run(registered.run_id)
    assert champion_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert champion_run.info.run_name == result["champion"] == parent.data.tags["wattflow.champion"]
    budget = 0.5 / 100
    in_budget = [c for c in children if c.data.metrics["accuracy"] >= train["accuracy"] - budget - 1e-12]
    assert champion_run.info.run_id in {c.info.run_id for c in in_budget}
    assert champion_run.data.metrics["energy_per_1k_inferences_j"] == min(
        c.data.metrics["energy_per_1k_inferences_j"] for c in in_budget)
    baseline = client.get_model_version_by_alias("wattflow-digits", "baseline")
    assert client.get_run(baseline.run_id).info.run_name == "train"
    # each version's description is its model card: what, measured how, why chosen, from where, how to load
    card = registered.description
    assert card.startswith(f"# wattflow-digits v{registered.version}: `{result['champion']}`")
    for expected in ("**champion**", "within 0.5 accuracy points", result["reason"][:40], "energy per 1k inferences",
                     "| inference energy method | estimated:cpu-time |", str(parent.data.tags["prefect.flow_run_id"]),
                     'mlflow.pyfunc.load_model("models:/wattflow-digits@champion")'):
        assert expected in card, expected
    assert baseline.description.startswith(f"# wattflow-digits v{baseline.version}: `train`")

    # make serve: MLflow's model server on loopback answers with the evaluated variant's predictions
    champion_variant = next(r for r in children if r.info.run_name == result["champion"])
    deployable = champion_variant.data.tags["eval.deployable.path"]  # predicts exactly as the evaluated variant
    evaluated = load_predictor(deployable, champion_variant.data.tags["eval.deployable.runtime"])
    x = first_samples(workload_for(tiny_config(tmp_path)).splits.test, 8)
    with model_server("models:/wattflow-digits@champion", mlflow_uri, tmp_path / "serve.log") as url:
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps({"inputs": x.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = np.asarray(json.loads(response.read())["predictions"], dtype=np.float32)
    assert served.shape == (8, 10)
    np.testing.assert_allclose(served, evaluated(x), rtol=1e-5, atol=1e-5)
    selection_files = {f.path for f in client.list_artifacts(parent.info.run_id, "selection")}
    assert selection_files == {"selection/pareto.png", "selection/variants.csv", "selection/report.md"}
    assert [r["variant"] for r in result["rows"]] == ["train", "prune-0.8", "onnx-int8-static", "bf16", "distill",
                                                      "distill+prune-0.9", "distill+prune-0.9+kmeans-4bit",
                                                      "channels-0.5"]
    slim = by_name["channels-0.5"].data.metrics  # structured: the dense model itself got smaller
    assert slim["param_count"] < 0.5 * train["param_count"] and slim["size_bytes"] < 0.5 * train["size_bytes"]
    assert slim["width.features.0"] == 8
    smallest = by_name["distill+prune-0.9+kmeans-4bit"].data.metrics
    # tiny settings here: the quality of compression is the bench's job (make bench)
    assert smallest["deployable_compression_ratio"] > 20 and smallest["accuracy"] > 0.8


def test_a_failed_stage_leaves_its_runs_failed_not_running(prefect_server, mlflow_uri, tmp_path):
    cfg = tiny_config(tmp_path, epochs=1000, timeout_s=3)
    with pytest.raises(Exception, match="timeout_s"):
        pipeline(cfg)
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id])
    by_stage = {r.data.tags["wattflow.stage"]: r for r in runs}
    assert set(by_stage) == {"pipeline", "train"}
    assert by_stage["train"].info.status == "FAILED" and by_stage["pipeline"].info.status == "FAILED"
    assert "timeout_s" in by_stage["train"].data.tags["error"]


def test_bring_your_own_example_runs_every_chain_and_ships_a_usable_model(prefect_server, mlflow_uri, tmp_path):
    """examples/bring-your-own/recipe.yaml (the user's MyNet from its own file, an RGB image folder), small."""
    write_digit_images(tmp_path / "images", mode="RGB", size=16, per_class=20)
    recipe = load_config(EXAMPLE / "recipe.yaml").model_dump(mode="json")
    recipe["work_dir"] = str(tmp_path / "artifacts")
    recipe["data"].update(path=str(tmp_path / "images"), image_size=16)
    recipe["train"]["model"]["path"] = recipe["distill"]["student_model"]["path"] = str(EXAMPLE)
    recipe["train"].update(epochs=2, cpu_ranks=2)
    recipe["prune"].update(fine_tune_epochs=1, schedule_steps=1)
    recipe["distill"]["epochs"] = 1
    recipe["eval"].update(repeats=2, warmup=1, energy_inferences=256, energy_min_window_s=0.1)
    cfg = PipelineConfig.model_validate(recipe)
    result = pipeline(cfg)

    client = MlflowClient(mlflow_uri)
    parent, children = parent_and_children(client, result)
    by_name = {c.info.run_name: c for c in children}
    expected = {"train", *("+".join(c.labels) for c in cfg.chains)}
    skipped = {k.removeprefix("skipped.") for k in parent.data.tags if k.startswith("skipped.")}
    assert expected == set(by_name) | skipped and all(c.info.status == "FINISHED" for c in children)
    for run in children:
        assert {"accuracy", "size_bytes", "deployable_bytes"} <= set(run.data.metrics), run.info.run_name
    # the dataset the model was trained on, through MLflow's dataset tracking
    (dataset,) = by_name["train"].inputs.dataset_inputs
    assert dataset.dataset.name == "images" and '"shape": [-1, 3, 16, 16]' in dataset.dataset.schema
    # one registered model per dataset; the champion has a signature and returns class scores as an array
    name = "wattflow-bring-your-own-images"  # <experiment>-<dataset name>
    assert result["registered"] and client.get_registered_model(name)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert model.metadata.get_input_schema() is not None and model.metadata.get_output_schema() is not None
    x = first_samples(workload_for(cfg).splits.test, 5)
    scores = model.predict(x)
    assert isinstance(scores, np.ndarray) and scores.shape == (5, 10)


def test_the_gpt_recipe_runs_every_chain_and_ships_a_model_that_returns_next_token_logits(prefect_server, mlflow_uri,
                                                                                         tmp_path):
    """deployments/recipes/gpt-char.yaml, small: a tiny GPT on the start of the embedded corpus."""
    (tmp_path / "corpus.txt").write_text(embedded_corpus()[:40_000], encoding="utf-8")
    recipe = load_config(RECIPES / "gpt-char.yaml").model_dump(mode="json")
    recipe["work_dir"] = str(tmp_path / "artifacts")
    recipe["experiment"] = f"gpt-{uuid.uuid4().hex[:6]}"
    recipe["data"].update(path=str(tmp_path / "corpus.txt"), block_size=16, val_fraction=0.1, test_fraction=0.1)
    recipe["train"].update(epochs=1, cpu_ranks=2, model_kwargs={"n_layer": 2, "n_head": 4, "n_embd": 32})
    recipe["distill"].update(epochs=1, student_model_kwargs={"n_layer": 1, "n_head": 2, "n_embd": 16})
    recipe["prune"].update(fine_tune_epochs=1, schedule_steps=1)
    recipe["chains"] = ["wanda:0.5", "magnitude:2:4", "channels:0.5", "distill -> onnx-int8-dynamic", "kmeans-4bit"]
    recipe["eval"].update(repeats=2, warmup=1, energy_inferences=64, energy_min_window_s=0.1)
    cfg = PipelineConfig.model_validate(recipe)
    result = pipeline(cfg)

    client = MlflowClient(mlflow_uri)
    parent, children = parent_and_children(client, result)
    assert {c.info.run_name for c in children} == {"train", "wanda-0.5", "magnitude-2of4", "channels-0.5", "distill",
                                                   "distill+onnx-int8-dynamic", "kmeans-4bit"}
    for run in children:
        assert run.info.status == "FINISHED"
        assert {"accuracy", "perplexity", "size_bytes", "energy_j", "energy_per_1k_tokens_j"} <= set(run.data.metrics)
        assert run.data.tags["energy.method"]
    assert by_name_metric(children, "magnitude-2of4", "sparsity") == pytest.approx(0.5, abs=0.01)
    report = (Path(result["run_dir"]) / "selection" / "report.md").read_text()
    assert "perplexity" in report and "sample of the trained model" in report
    model = mlflow.pyfunc.load_model(f"models:/{cfg.experiment}-corpus@champion")
    tokens = first_samples(workload_for(cfg).splits.test, 3)
    logits = model.predict(tokens)
    vocab = workload_for(cfg).splits.num_classes
    assert tokens.dtype == np.int64 and np.asarray(logits).shape == (3, 16, vocab)


def parent_and_children(client: MlflowClient, result: dict):
    """The flow run's MLflow parent run and its child runs (one per stage and variant)."""
    parent = client.get_run(result["mlflow_run_id"])
    return parent, client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def by_name_metric(runs, name: str, metric: str) -> float:
    return next(r for r in runs if r.info.run_name == name).data.metrics[metric]
