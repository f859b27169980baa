"""Two flow runs at the same time: separate run directories keyed by flow-run id, their own MLflow parent
and child runs, and checkpoints that are each intact and each the one its runs point at."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_resume import quick_config

from flows.pipeline import pipeline
from wattflow.models import sha256_file

pytestmark = pytest.mark.integration


def test_two_concurrent_flow_runs_never_share_files_or_runs(prefect_server, mlflow_uri, tmp_path):
    # Different seeds: two different checkpoints, so that an overwrite could not go unnoticed.
    configs = [quick_config(tmp_path).model_copy(update={"train": quick_config(tmp_path).train.model_copy(
        update={"seed": seed})}) for seed in (1, 2)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(pipeline, configs))

    client = MlflowClient(mlflow_uri)
    parents = [client.get_run(r["mlflow_run_id"]) for r in results]
    flow_run_ids = [p.data.tags["prefect.flow_run_id"] for p in parents]
    assert len(set(flow_run_ids)) == 2 and all(p.info.status == "FINISHED" for p in parents)
    shas = []
    for parent, flow_run_id in zip(parents, flow_run_ids, strict=True):
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(c.info.run_name for c in children) == ["prune-0.5", "train"]
        train = next(c for c in children if c.info.run_name == "train")
        checkpoint = Path(configs[0].work_dir).resolve() / flow_run_id / "train" / "model.pt"
        assert checkpoint.is_file(), "each flow run writes under its own flow-run id"
        assert sha256_file(checkpoint) == train.data.tags["artifact.sha256"]
        shas.append(train.data.tags["artifact.sha256"])
    assert shas[0] != shas[1]
