"""Hermetic settings for every test: no analytics or telemetry, and no user state touched."""

import os
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from filelock import FileLock
from helpers import train_briefly
from mlflow.tracking import MlflowClient
from servers import deployed_stack, migrated_prefect_db, prefect_server_process

from wattflow.models import default_spec, save_checkpoint

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
# One compute thread per test process (and its subprocesses): `make test` runs two pytest-xdist workers on 2
# cores, and two threads per worker spin against each other (one test took 168 s instead of 21 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """kind -> fp32 checkpoint path of a briefly trained CNN and MLP."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for kind in ("cnn", "mlp"):
        paths[kind] = root / f"{kind}.pt"
        save_checkpoint(paths[kind], train_briefly(kind), default_spec(kind))
    return paths


def made_once_per_run(tmp_path_factory, name: str, make) -> Path:
    """`make(path)` once per test run, shared by pytest-xdist's workers (they share the run's temporary root)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / "templates" / name
    path.parent.mkdir(exist_ok=True)
    with FileLock(f"{path}.lock"):
        if not path.exists():
            make(path)
    return path


@pytest.fixture(scope="session")
def prefect_db(tmp_path_factory):
    """A Prefect database migrated once per run; each Prefect server starts on a copy (~13 s less each)."""
    return made_once_per_run(tmp_path_factory, "prefect.db", migrated_prefect_db)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory, prefect_db):
    """The session's one Prefect server (`prefect server start`, API and services)."""
    with prefect_server_process(tmp_path_factory.mktemp("prefect"), prefect_db) as server:
        yield server


@pytest.fixture(scope="session")
def prefect_server(prefect_api):
    """Flows run in this process against the session's Prefect server, set up as Prefect's test harness does
    (its settings also seen by threads that copied their context before), so with no server of their own."""
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with pytest.MonkeyPatch.context() as mp, temporary_settings(updates={PREFECT_API_URL: prefect_api.api_url}):
        for name in ("PREFECT_HOME", "PREFECT_API_URL"):   # for subprocesses
            mp.setenv(name, prefect_api.env[name])
        with _temporary_global_settings_context(get_settings_context()):
            yield prefect_api


@pytest.fixture(scope="session")
def stack(tmp_path_factory, prefect_api, mlflow_db):
    """The session's Prefect server with an MLflow server, a process pool and every deployment of
    deployments/prefect.yaml (created by the CLI commands `make deploy` runs), shared by the tests that need
    workers."""
    with deployed_stack(tmp_path_factory.mktemp("stack"), prefect_api, pool="test-pool",
                        mlflow_db=mlflow_db) as shared:
        yield shared


@pytest.fixture(scope="session")
def mlflow_db(tmp_path_factory):
    """An MLflow SQLite store created once per run (its migrations take ~1.5 s); each test gets a copy."""
    return made_once_per_run(tmp_path_factory, "mlflow.db",
                             lambda path: MlflowClient(f"sqlite:///{path}").search_experiments())


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch, mlflow_db):
    """A fresh SQLite MLflow store for the test, as MLFLOW_TRACKING_URI and the process's tracking URI."""
    shutil.copyfile(mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(previous)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """Under pytest-xdist (make test runs two workers), tests that share an expensive fixture share a worker, so
    that it is made once: those on the deployed stack, and those of a module with a module-scoped fixture (a
    trained model, quantized files)."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        if "stack" in info.names_closure:
            item.add_marker(pytest.mark.xdist_group("stack"))
        elif any(defs[-1].scope == "module" for defs in info.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
