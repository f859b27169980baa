"""Models and checkpoints. Every model is built from a small JSON-able spec (a built-in of `wattflow.zoo`, or a
user's factory by import path), so a checkpoint is `{"spec": dict, "state_dict": tensors, "meta": dict}` and
loads with `torch.load(weights_only=True)`: no pickled code is ever executed.

A model takes a batch of the workload's samples, `[N, *input_shape]` (checkpoint meta "input_shape" and
"input_dtype"); the bundled digits are flat [N, 64] rows, which the built-in CNN reshapes to images itself.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wattflow.plugins import load_object
from wattflow.structure import apply_structure
from wattflow.zoo import MODELS
from wattflow.zoo.cnn import SmallCNN
from wattflow.zoo.mlp import MLP

# torch.export (used by the ONNX exporter and MLflow's pt2 model format) keeps global tracing state:
# two flow runs exporting at once in one process corrupt each other's trace.
TORCH_EXPORT_LOCK = threading.Lock()


def default_spec(kind: str, in_features: int = 64, num_classes: int = 10, *, mlp_hidden: list[int] | None = None,
                 cnn_channels: list[int] | None = None, cnn_hidden: int = 64) -> dict[str, Any]:
    """The spec of a built-in MLP or CNN on flat [in_features] samples (the bundled digits' layout)."""
    if kind == "mlp":
        return MLP.spec([in_features], num_classes, hidden=list(mlp_hidden or [128, 64]))
    if kind == "cnn":
        return SmallCNN.spec([in_features], num_classes, channels=list(cnn_channels or [16, 32]), hidden=cnn_hidden)
    raise ValueError(f"unknown model kind {kind!r}; allowed: mlp, cnn")


def build_model(spec: dict[str, Any]) -> nn.Module:
    """The model a spec describes, with fresh weights:
    - a built-in: {"kind": name, **its constructor's arguments} (wattflow.zoo);
    - a user's factory: {"factory": "pkg.module:fn", "kwargs": {...}, "path": a directory or None};
    either with "structure": the shapes structured pruning left (wattflow.structure), re-applied here."""
    if "factory" in spec:
        factory = load_object(spec["factory"], spec.get("path"), field="train.model.factory")
        model = factory(**spec.get("kwargs", {}))
        if not isinstance(model, nn.Module):
            raise TypeError(f"factory {spec['factory']!r} returned a {type(model).__name__}, not a torch.nn.Module")
    else:
        try:
            cls = MODELS.get(spec.get("kind"))
        except KeyError as err:
            raise ValueError(err.args[0]) from None
        model = cls(**{k: v for k, v in spec.items() if k not in ("kind", "structure")})
    if spec.get("structure"):
        apply_structure(model, spec["structure"])
    return model


def input_signature(spec: dict[str, Any], meta: dict[str, Any]) -> tuple[list[int], torch.dtype]:
    """(one sample's shape, dtype) that the model takes: recorded in meta by training; a checkpoint from before
    workloads had flat float32 rows of spec["in_features"]."""
    shape = meta.get("input_shape") or [int(spec["in_features"])]
    return [int(d) for d in shape], getattr(torch, str(meta.get("input_dtype", "float32")))


PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, "weight") for every Linear and Conv*: the tensors that pruning and int8 act on."""
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]


def output_layer(model: nn.Module, example: torch.Tensor) -> nn.Module | None:
    """The Linear/Conv layer whose output is the model's output (the classifier head), or, when the output is
    computed further, the last such layer to run that has the output's width; traced on `example`."""
    ran: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, _, out: ran.append((m, out))) for m in model.modules()
             if isinstance(m, PRUNABLE)]
    try:
        with torch.inference_mode():
            out = model(example)
    finally:
        for h in hooks:
            h.remove()
    for module, produced in reversed(ran):
        if produced is out:
            return module
    width = out.shape[-1] if isinstance(out, torch.Tensor) else None
    return next((m for m, produced in reversed(ran) if produced.shape[-1] == width), None)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(tmp_path)` then rename over `path`, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are shareable artifacts
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | os.PathLike, model: nn.Module, spec: dict[str, Any],
                    meta: dict[str, Any] | None = None) -> str:
    """Write the checkpoint atomically; return its sha256."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"spec": dict(spec), "state_dict": state, "meta": dict(meta or {})}
    # Through a file object: torch.save would otherwise name the zip's inner folder after the random
    # temp name, and identical weights would hash differently.
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(payload, f)

    atomic_write(path, write)
    return sha256_file(path)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file, the cause and the fix."""


RERUN = "re-run training (or the stage that wrote it) to write it again"


def _read_payload(path: str | os.PathLike) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; {RERUN}") from None
    except pickle.UnpicklingError as err:
        # torch's message suggests switching the safe loader off; keep only its reason, never that advice.
        reason = next((line.strip() for line in str(err).splitlines() if "nsupported" in line), "unreadable pickle")
        if "GLOBAL" in reason or "global" in reason:  # the safe unpickler met a class or function reference
            raise CheckpointError(
                f"checkpoint {path} was refused: it holds pickled objects other than tensors and plain values "
                f"({reason}), which could run code when loaded (only weights_only checkpoints are read). Do not "
                f"load files of unknown origin; {RERUN}") from None
        raise CheckpointError(f"checkpoint {path} is corrupt ({reason}); {RERUN}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); {RERUN}") from None
    if not (isinstance(payload, dict) and isinstance(payload.get("spec"), dict)
            and isinstance(payload.get("state_dict"), dict) and payload["state_dict"]):
        raise CheckpointError(f"checkpoint {path} is not a wattflow checkpoint (expected a mapping with 'spec', "
                              f"'state_dict' and 'meta'); {RERUN}")
    return payload


def load_checkpoint(path: str | os.PathLike, expected_sha256: str | None = None,
                    expected_spec: dict[str, Any] | None = None
                    ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Load (model, spec, meta). Raises CheckpointError for a missing, truncated, corrupt or non-weights-only
    file, a sha256 other than `expected_sha256`, or a spec other than `expected_spec` (another architecture)."""
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise CheckpointError(f"checkpoint {path} has sha256 {actual}, expected {expected_sha256}: it changed "
                                  f"since it was written; {RERUN}")
    payload = _read_payload(path)
    spec = payload["spec"]
    if expected_spec is not None and spec != expected_spec:
        raise CheckpointError(f"checkpoint {path} holds another architecture: spec {spec}, expected "
                              f"{expected_spec}; point at the matching checkpoint or {RERUN}")
    try:
        model = build_model(spec)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has an unusable spec {spec} ({err}); {RERUN}") from None
    state = payload["state_dict"]
    dtype = next(iter(state.values())).dtype
    try:
        model.to(dtype).load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path}: its weights do not fit its spec {spec} "
                              f"({str(err).splitlines()[0]}); {RERUN}") from None
    return model.eval(), spec, payload.get("meta", {})
