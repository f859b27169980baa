"""The write-ahead journal of MLflow writes: every write is appended here before it is sent, and
acknowledged after, so that nothing is lost while MLflow is unreachable (`wattflow.sync` replays the rest)."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from wattflow.preflight import mask_secrets

JOURNAL_NAME = "mlflow-journal.jsonl"

log = logging.getLogger(__name__)


def mask_value(value: Any) -> Any:
    """`mask_secrets` applied to every string inside a JSON-like value."""
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, dict):
        return {k: mask_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_value(v) for v in value]
    return value


class Journal:
    """Append-only JSON lines: an op record before a write is sent, `{"ack": seq}` once MLflow took it
    (`"error"` beside it when MLflow refused it for good), `{"map": placeholder, "run_id": id}` when sync
    created an offline run. Each line is flushed and fsynced, so a crash loses at most the line being written;
    a torn last line is skipped when read."""

    _locks: dict[Path, threading.Lock] = {}
    _locks_guard = threading.Lock()

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        with self._locks_guard:
            self.lock = self._locks.setdefault(self.path, threading.Lock())

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(mask_value(record), separators=(",", ":"), default=str) + "\n"
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as f:
                if f.tell() > 0:  # after a crash mid-line, start on a fresh line
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
                f.write(line.encode())
                f.flush()
                os.fsync(f.fileno())

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping a torn line in %s", self.path)
        return out
