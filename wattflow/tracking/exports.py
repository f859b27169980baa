"""What MLflow's fluent and dataset APIs write for a run: a variant as an MLflow model in its runtime's
flavour, and the dataset a run trained on. Called by `Tracker.apply` (now, or when `wattflow.sync` replays)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from wattflow.runtimes import runtime

# MLflow suggests type hints on a pyfunc's predict for automatic signatures; wattflow logs explicit signatures.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method")


@contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent APIs (model logging, `models:/` URIs) read the process-wide tracking URI: set it for the
    block only, so that a Tracker never changes it for anyone else."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def log_model_now(tracking_uri: str, run_id: str, path: str, fmt: str) -> None:
    """The file at `path` as an MLflow model (artifact "model") on `run_id`, through its runtime's flavour."""
    with using_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        runtime(fmt).log_model(path)


def log_input_now(client: MlflowClient, run_id: str, dataset: dict[str, Any]) -> None:
    """`dataset` (name, digest, source, shape, dtype, context) through MLflow's dataset tracking."""
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
    client.log_inputs(run_id, [DatasetInput(meta._to_mlflow_entity(),
                                            tags=[InputTag("mlflow.data.context", dataset["context"])])])
