"""Extension points: one registry each, one entry per file.

    MODELS = Registry("model")              # wattflow.models
    @MODELS.register("resnet")              # in wattflow/zoo/resnet.py
    def resnet(...): ...
    MODELS.get("resnet")                    # KeyError-free lookup with the allowed names in the error

A user's own code is named by import path instead ("mypkg.module:function", with an optional directory to
put on sys.path): `load_object` imports it. Importing a user's module runs the user's code, by design; loading
a checkpoint never does (checkpoints are weights_only).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (models, dataset formats, workloads); entries register themselves."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


class ImportPathError(ValueError):
    """A "module:attribute" reference that does not import or is not callable; the message says which."""


def is_import_path(ref: str) -> bool:
    return ":" in ref


def load_object(ref: str, path: str | None = None, field: str = "factory") -> Callable[..., Any]:
    """The callable named by `ref` ("pkg.module:function"); `path` (a directory, or a .py file whose directory
    is used) is put first on sys.path. `field` names the configuration field in errors."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ImportPathError(f"{field} {ref!r} is not an import path; write 'package.module:function'")
    if path is not None:
        where = Path(path).resolve()
        where = where.parent if where.suffix == ".py" else where
        if not where.is_dir():
            raise ImportPathError(f"{field}: path {path} is not a directory or a .py file")
        if str(where) not in sys.path:
            sys.path.insert(0, str(where))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        hint = (f" (looked in {path} and on sys.path)" if path
                else " (put its directory on PYTHONPATH or name it as path)")
        raise ImportPathError(f"{field} {ref!r}: module {module_name!r} does not import: {err}{hint}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportPathError(f"{field} {ref!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ImportPathError(f"{field} {ref!r} is a {type(obj).__name__}, not a callable")
    return obj
