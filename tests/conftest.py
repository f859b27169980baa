"""Hermetic settings for every test: no analytics or telemetry, and no user state touched."""

import os

import mlflow
import pytest
from helpers import train_briefly
from servers import deployed_stack

from wattflow.models import default_spec, save_checkpoint

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """kind -> fp32 checkpoint path of a briefly trained CNN and MLP."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for kind in ("cnn", "mlp"):
        paths[kind] = root / f"{kind}.pt"
        save_checkpoint(paths[kind], train_briefly(kind), default_spec(kind))
    return paths


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """One Prefect server, one MLflow server, a process pool and every deployment of deployments/prefect.yaml
    (created by the CLI commands `make deploy` runs), shared by the tests that need workers."""
    with deployed_stack(tmp_path_factory.mktemp("stack"), pool="test-pool") as shared:
        yield shared


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """Prefect's test harness (a temporary server, in its own PREFECT_HOME), one for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store for the test, as MLFLOW_TRACKING_URI and the process's tracking URI."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(previous)
