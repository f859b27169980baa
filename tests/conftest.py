"""Hermetic settings for every test: no analytics or telemetry, and no user state touched."""

import os

import pytest
from helpers import train_briefly

from wattflow.models import default_spec, save_checkpoint

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> fp32 checkpoint path of a briefly trained CNN and MLP."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for kind in ("cnn", "mlp"):
        paths[kind] = root / f"{kind}.pt"
        save_checkpoint(paths[kind], train_briefly(kind), default_spec(kind))
    return paths
