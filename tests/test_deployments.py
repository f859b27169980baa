"""deployments/prefect.yaml, for real: Prefect and MLflow servers on free loopback ports, the CLI deploy that
`make deploy` runs, a process worker, and an on-demand run whose MLflow runs are read back from the server."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools import validate
from servers import PROJECT, prefect_cli, process_worker, tail

from flows.multinode import train_node
from flows.pipeline import pipeline
from wattflow.config import PipelineConfig, load_config

PREFECT_YAML = PROJECT / "deployments" / "prefect.yaml"
ENTRYPOINTS = {"flows/pipeline.py:pipeline": pipeline, "flows/multinode.py:train_node": train_node}


def deployments() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}


def test_every_config_parameter_is_a_valid_pipeline_config():
    found = deployments()
    assert set(found) == {"nightly", "on-demand", "train-node"}
    for name, spec in found.items():
        flow_fn = ENTRYPOINTS[spec["entrypoint"]]
        assert spec["work_pool"]["name"] == "{{ $WATTFLOW_POOL }}", name
        params = spec.get("parameters", {})
        if "config" in params:
            PipelineConfig.model_validate(params["config"])  # raises, naming the field, when invalid
        # The server checks parameters against the flow's JSON schema: a pydantic-only form would be refused.
        schema = parameter_schema(flow_fn).model_dump_for_openapi()
        assert validate(params, schema, ignore_required=True) == [], name
    nightly = found["nightly"]
    assert nightly["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    assert nightly["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}


def tiny_parameters(work_dir: Path) -> dict:
    cfg = load_config(PROJECT / "deployments" / "recipes" / "tiny.yaml")
    cfg = cfg.model_copy(update={"work_dir": str(work_dir), "experiment": f"tiny-{uuid.uuid4().hex[:8]}"})
    return {"config": cfg.model_dump(mode="json")}


async def read_run(flow_run_id: uuid.UUID):
    async with get_client() as client:
        return await client.read_flow_run(flow_run_id)


async def read_deployments(pool: str):
    async with get_client() as client:
        return {d.name: d for d in await client.read_deployments() if d.work_pool_name == pool}


def wait_final(api_url: str, flow_run_id: uuid.UUID, timeout_s: float, worker_log: Path):
    deadline = time.monotonic() + timeout_s
    with temporary_settings({PREFECT_API_URL: api_url}):
        while time.monotonic() < deadline:
            run = asyncio.run(read_run(flow_run_id))
            if run.state and run.state.is_final():
                return run
            time.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout_s} s; worker log:\n{tail(worker_log)}")


@pytest.mark.integration
def test_deploy_run_on_demand_on_a_worker_and_read_mlflow(stack, tmp_path_factory):
    """On the session's stack (conftest.py): servers, pool and deployments made by the `make deploy` commands."""
    root = tmp_path_factory.mktemp("on-demand")
    with temporary_settings({PREFECT_API_URL: stack.prefect.api_url}):
        found = asyncio.run(read_deployments(stack.pool))
    assert set(found) == {"nightly", "on-demand", "train-node"}  # all on the pool named by WATTFLOW_POOL
    nightly = found["nightly"]
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.schedules[0].schedule.timezone == "UTC" and nightly.schedules[0].active
    assert nightly.global_concurrency_limit.limit == 1
    assert nightly.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert found["on-demand"].schedules == []

    worker_log = root / "worker.log"
    with process_worker(stack.worker_env, stack.pool, worker_log):
        out = prefect_cli(["deployment", "run", "wattflow-pipeline/on-demand", "--params",
                           json.dumps(tiny_parameters(root / "artifacts"))], stack.prefect.env)
        flow_run_id = uuid.UUID(re.search(r"UUID: ([0-9a-f-]{36})", out)[1])
        run = wait_final(stack.prefect.api_url, flow_run_id, 240, worker_log)
    assert run.state.is_completed(), f"{run.state}\n{tail(worker_log)}"

    client = MlflowClient(stack.mlflow_uri)
    parents = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    (parent,) = parents
    assert parent.info.status == "FINISHED" and parent.data.tags["wattflow.stage"] == "pipeline"
    assert parent.data.metrics["energy_j"] > 0
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.info.run_name for c in children} == {"train", "int8-weights"}
    for child in children:
        m = child.data.metrics
        assert child.info.status == "FINISHED", child.info.run_name
        assert 0 < m["accuracy"] <= 1 and m["size_bytes"] > 0 and m["energy_j"] > 0
        assert child.data.tags["energy.method"] in {"estimated:cpu-time", "measured:rapl"} or (
            "measured:nvml" in child.data.tags["energy.method"])
    # Artifacts went through the MLflow server's proxy into its --artifacts-destination.
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    assert any((stack.root / "mlflow" / "mlartifacts").rglob("*.json"))
