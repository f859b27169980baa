"""Hermetic settings for every test: no analytics or telemetry, and no user state touched."""

import os
from pathlib import Path

import per_run
import pytest
from hypothesis import settings
from per_run import made_once_per_run, mlflow_store, mlflow_template
from servers import deployed_stack, migrated_prefect_db, prefect_server_process

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
# One compute thread per test process (and its subprocesses): `make test` runs two pytest-xdist workers on 2
# cores, and two threads per worker spin against each other (one test took 168 s instead of 21 s).
# Set here, before any test module imports torch; pytest's main process (pytest-xdist's controller) imports
# nothing heavy from here, so the workers start sooner.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# `make test-fast` (the inner loop) runs each property on a quarter of its examples: per_run.examples.
settings.register_profile("fast", max_examples=25)


@pytest.fixture(scope="session", autouse=True)
def run_dir(tmp_path_factory) -> Path:
    """The run's temporary root, which pytest-xdist's workers share: what is made once per run lives there."""
    root = tmp_path_factory.getbasetemp()
    per_run.RUN_DIR = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    return per_run.RUN_DIR


@pytest.fixture(scope="session", autouse=True)
def own_slot_dir(tmp_path_factory) -> Path:
    """Measured-stage slots are host-wide lock files (tasks/concurrency.py): each pytest-xdist worker, with what it
    starts, gets its own directory, so that no test takes a slot from a wattflow run outside the suite, and the two
    workers' flows do not queue for each other's measured stages (here every figure is the CPU time of the
    stage's own process tree, which the other worker does not change)."""
    os.environ["WATTFLOW_SLOT_DIR"] = str(tmp_path_factory.mktemp("slots"))
    return Path(os.environ["WATTFLOW_SLOT_DIR"])


@pytest.fixture(scope="session")
def checkpoints(sgd_trained):
    """kind -> fp32 checkpoint path of the run's trained CNN and MLP (tests only read them)."""
    return {kind: path for kind, (path, _) in sgd_trained.items()}


@pytest.fixture(scope="session")
def sgd_trained():
    """kind -> (path, sha256) of a CNN and an MLP (default specs) after 15 epochs of plain single-process SGD:
    > 95 % test accuracy. Made once per run and shared by every test that needs a trained model; tests only
    read them."""
    import torch
    from helpers import model_accuracy

    from wattflow.compress.prune import fine_tune
    from wattflow.data import load_splits
    from wattflow.models import build_model, default_spec, save_checkpoint, sha256_file

    def train(path: Path, kind: str) -> None:
        splits = load_splits()
        torch.manual_seed(0)
        model = build_model(default_spec(kind))
        fine_tune(model, splits.train, epochs=15, lr=0.05, batch_size=32, seed=0)
        assert model_accuracy(model, splits.test) > 0.95
        save_checkpoint(path, model, default_spec(kind))

    paths = {kind: made_once_per_run(f"sgd-{kind}.pt", lambda path, kind=kind: train(path, kind))
             for kind in ("cnn", "mlp")}
    return {kind: (path, sha256_file(path)) for kind, path in paths.items()}


@pytest.fixture(scope="session")
def prefect_db():
    """A Prefect database migrated once per run; each Prefect server starts on a copy (~13 s less each)."""
    return made_once_per_run("prefect.db", migrated_prefect_db)


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
def mlflow_db() -> Path:
    return mlflow_template()


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store for the test, as MLFLOW_TRACKING_URI and the process's tracking URI."""
    import mlflow

    uri = mlflow_store(tmp_path)
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
