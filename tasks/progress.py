"""Progress of the running pipeline, for two audiences: the Prefect UI (a keyed progress artifact that
moves per training epoch) and, when the flow runs in this process (`make run-flow`), a terminal bar.

Tasks call `report(...)`; listeners registered by the terminal front end receive the same events. On a
worker there are no listeners and only the artifacts move."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from prefect.artifacts import create_progress_artifact, update_progress_artifact

TRAINING_ARTIFACT_KEY = "wattflow-training-progress"
ARTIFACT_UPDATE_EVERY_S = 5.0  # the UI's bar moves at most this often (each move is an API call); the end always

# (bar, completed, total, description): bar is "train" or "variants".
Listener = Callable[[str, float, float, str], None]
_listeners: list[Listener] = []


def add_listener(listener: Listener) -> Callable[[], None]:
    """Register a listener; returns the function that removes it."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def report(bar: str, completed: float, total: float, description: str) -> None:
    for listener in list(_listeners):
        listener(bar, completed, total, description)


def last_progress_line(progress_file: Path) -> dict | None:
    """Rank 0's newest `progress.jsonl` line, or None before the first epoch ends."""
    try:
        lines = progress_file.read_text().splitlines()
    except FileNotFoundError:
        return None
    return json.loads(lines[-1]) if lines else None


class TrainingProgress:
    """Follows rank 0's progress file: call `poll()` whenever the ranks print something."""

    def __init__(self, progress_file: Path, epochs: int):
        self.progress_file = progress_file
        self.epochs = epochs
        self.epoch = 0
        self.updated_at = time.monotonic()
        self.artifact_id = create_progress_artifact(
            0.0, key=TRAINING_ARTIFACT_KEY, description=f"training: 0/{epochs} epochs")
        report("train", 0, epochs, "training")

    def poll(self) -> None:
        line = last_progress_line(self.progress_file)
        if line is None or line["epoch"] == self.epoch:
            return
        self.epoch = line["epoch"]
        text = f"training: epoch {self.epoch}/{self.epochs}, val accuracy {line['val_accuracy']:.4f}"
        report("train", self.epoch, self.epochs, text)
        if self.epoch == self.epochs or time.monotonic() - self.updated_at >= ARTIFACT_UPDATE_EVERY_S:
            update_progress_artifact(self.artifact_id, 100.0 * self.epoch / self.epochs, description=text)
            self.updated_at = time.monotonic()


def training_reused(produced_by_flow_run: str) -> None:
    """A cached training still reports complete progress, saying where the epochs were run."""
    create_progress_artifact(100.0, key=TRAINING_ARTIFACT_KEY,
                             description=f"training reused (cached) from flow run {produced_by_flow_run}")
    report("train", 1, 1, "training: reused (cached)")
