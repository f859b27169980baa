"""What a stage's output depends on, as stable hashes: the cache keys that let a re-run reuse a trained
checkpoint (or a compressed variant) instead of spending the energy again.

A key covers the configuration slice that can change the output (a user's data file by its content), the
input checkpoint's sha256, the code version (a hash of wattflow's own source) and the versions of the
libraries that compute the artifacts, so a change to any of them invalidates it."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

from wattflow.chains import PlannedStep
from wattflow.config import PipelineConfig
from wattflow.models import sha256_file

PACKAGE_DIR = Path(__file__).resolve().parent

# Fields that change how a stage runs, not what it produces.
_TRAIN_FIELDS_NOT_IN_KEY = {"timeout_s", "max_restarts", "checkpoint_every_epochs"}


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 over wattflow's Python sources (path and content), first 16 hex digits."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """An upgrade of what computes the artifacts invalidates them too."""
    return {name: version(name) for name in ("torch", "onnx", "onnxruntime", "torch-pruning", "torchao",
                                             "scikit-learn", "numpy")}


@lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def data_identity(cfg: PipelineConfig) -> dict:
    """The data settings, and for a user's file its content hash: the same path with new data is new data."""
    identity = cfg.data.model_dump()
    if cfg.data.path:
        stat = Path(cfg.data.path).stat()
        identity["content_sha256"] = _file_sha256(str(Path(cfg.data.path).resolve()), stat.st_size, stat.st_mtime_ns)
    return identity


def _key(kind: str, parts: dict) -> str:
    blob = json.dumps({"kind": kind, "code": code_version(), "libraries": library_versions(), **parts},
                      sort_keys=True, default=str)
    return f"wattflow-{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


def train_cache_key(cfg: PipelineConfig) -> str:
    train = cfg.train.model_dump(exclude=_TRAIN_FIELDS_NOT_IN_KEY)
    return _key("train", {"train": train, "data": data_identity(cfg)})


def step_cache_key(cfg: PipelineConfig, planned: PlannedStep, source_sha256: str) -> str:
    """One chain step on one input checkpoint, with the settings of every step kind (a superset: cheap to
    over-invalidate, wrong to under-invalidate)."""
    settings = {**cfg.model_dump(include={"prune", "quantize", "distill"}), "data": data_identity(cfg)}
    settings["train"] = {"batch_size": cfg.train.batch_size, "seed": cfg.train.seed}
    return _key(planned.step.kind, {"step": planned.step.model_dump(), "name": planned.name,
                                    "source_sha256": source_sha256, "settings": settings})
