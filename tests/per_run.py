"""What a test run makes once and its pytest-xdist workers share (they share the run's temporary root), and
the run's Hypothesis example budget. Imports nothing heavy: conftest.py loads it in pytest's main process too."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

RUN_DIR: Path | None = None  # the directory a run's pytest-xdist workers share (set by conftest.py)


def made_once_per_run(name: str, make: Callable[[Path], object]) -> Path:
    """`make(path)` once per test run, shared by pytest-xdist's workers; `make` writes `path` whole or not at all."""
    path = RUN_DIR / "templates" / name
    path.parent.mkdir(exist_ok=True)
    with FileLock(f"{path}.lock"):
        if not path.exists():
            make(path)
    return path


def examples(full: int) -> int:
    """A property's Hypothesis examples: `full` under the default profile (100 examples), scaled by the loaded
    profile's max_examples; `make test-fast` loads the "fast" profile (25: a quarter) for the inner loop."""
    from hypothesis import settings

    return max(10, round(full * settings().max_examples / 100))


def mlflow_template() -> Path:
    """An empty SQLite MLflow store made once per run (its migrations take ~1.5 s), to be copied, never written."""
    from mlflow.tracking import MlflowClient

    return made_once_per_run("mlflow.db", lambda path: MlflowClient(f"sqlite:///{path}").search_experiments())


def mlflow_store(directory: Path, name: str = "mlflow.db") -> str:
    """The URI of a fresh SQLite MLflow store in `directory`, copied from the run's template."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mlflow_template(), Path(directory, name))
    return f"sqlite:///{Path(directory, name)}"
