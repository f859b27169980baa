"""What a stage's output depends on, as stable hashes: the cache keys that let a re-run reuse a trained
checkpoint (or a compressed variant) instead of spending the energy again.

A key covers the configuration slice that can change the output (a user's data file by its content), the
input checkpoint's sha256, the code version (a hash of wattflow's own source) and the versions of the
libraries that compute the artifacts, so a change to any of them invalidates it."""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

from wattflow.chains import PlannedStep
from wattflow.config import FactoryRef, PipelineConfig
from wattflow.models import sha256_file
from wattflow.workloads import workload_for

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
    """The data settings and the data's own digest (a file's content, a folder's listing): the same path with
    new data is new data."""
    return {**cfg.data.model_dump(), "digest": workload_for(cfg).splits.identity.get("digest")}


def code_identity(*refs) -> dict[str, str]:
    """The source of the user's own factories (model, student, dataset): changed code is a new model."""
    found = {}
    for ref in refs:
        if isinstance(ref, FactoryRef):
            module = ref.factory.partition(":")[0]
            where = Path(ref.path).resolve() if ref.path else None
            where = where.parent if where is not None and where.suffix == ".py" else where
            spec = importlib.machinery.PathFinder.find_spec(module.split(".")[0], [str(where)] if where else None)
            origin = spec.origin if spec is not None and spec.origin else None
            if origin and Path(origin).is_file():
                stat = Path(origin).stat()
                found[ref.factory] = _file_sha256(origin, stat.st_size, stat.st_mtime_ns)
            else:
                found[ref.factory] = "unknown"
    return found


def _key(kind: str, parts: dict) -> str:
    blob = json.dumps({"kind": kind, "code": code_version(), "libraries": library_versions(), **parts},
                      sort_keys=True, default=str)
    return f"wattflow-{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


def train_cache_key(cfg: PipelineConfig) -> str:
    train = cfg.train.model_dump(exclude=_TRAIN_FIELDS_NOT_IN_KEY)
    return _key("train", {"train": train, "data": data_identity(cfg), "workload": cfg.workload,
                          "user_code": code_identity(cfg.train.model, cfg.data.dataset)})


def step_cache_key(cfg: PipelineConfig, planned: PlannedStep, source_sha256: str) -> str:
    """One chain step on one input checkpoint: the step, the settings its kind says its output depends on, the
    data and the user's code."""
    settings = {**planned.step.settings(cfg), "data": data_identity(cfg),
                "user_code": code_identity(cfg.distill.student_model, cfg.data.dataset)}
    return _key(planned.step.kind, {"step": planned.step.model_dump(), "name": planned.name,
                                    "source_sha256": source_sha256, "settings": settings})
