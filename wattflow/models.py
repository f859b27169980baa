"""The model zoo. Every model is built from a small JSON-able spec, so a checkpoint is
`{"spec": dict, "state_dict": tensors, "meta": dict}` and loads with `torch.load(weights_only=True)`:
no pickled code is ever executed.

Every model takes a flat float32 batch `[N, in_features]`; the CNN reshapes it to an image itself,
so every runtime (eager, bf16, ONNX Runtime) shares one input contract.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODEL_KINDS = ("mlp", "cnn")

# torch.export (used by the ONNX exporter and MLflow's pt2 model format) keeps global tracing state:
# two flow runs exporting at once in one process corrupt each other's trace.
TORCH_EXPORT_LOCK = threading.Lock()


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks and a 2-layer head, for small square single-channel images."""

    def __init__(self, in_features: int, channels: list[int], hidden: int, num_classes: int):
        super().__init__()
        side = math.isqrt(in_features)
        if side * side != in_features:
            raise ValueError(f"cnn needs a square image: in_features={in_features} is not a square")
        self.side = side
        convs: list[nn.Module] = []
        c_in = 1
        for c in channels:
            convs += [nn.Conv2d(c_in, c, kernel_size=3, padding=1), nn.ReLU()]
            c_in = c
        convs.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*convs)
        flat = c_in * (side // 2) ** 2
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, 1, self.side, self.side)))


def default_spec(kind: str, in_features: int = 64, num_classes: int = 10, *, mlp_hidden: list[int] | None = None,
                 cnn_channels: list[int] | None = None, cnn_hidden: int = 64) -> dict[str, Any]:
    if kind == "mlp":
        return {"kind": "mlp", "in_features": in_features, "hidden": list(mlp_hidden or [128, 64]),
                "num_classes": num_classes}
    if kind == "cnn":
        return {"kind": "cnn", "in_features": in_features, "channels": list(cnn_channels or [16, 32]),
                "hidden": cnn_hidden, "num_classes": num_classes}
    raise ValueError(f"unknown model kind {kind!r}; allowed: {', '.join(MODEL_KINDS)}")


def build_model(spec: dict[str, Any]) -> nn.Module:
    args = {k: v for k, v in spec.items() if k != "kind"}
    if spec.get("kind") == "mlp":
        return MLP(**args)
    if spec.get("kind") == "cnn":
        return SmallCNN(**args)
    raise ValueError(f"unknown model kind {spec.get('kind')!r}; allowed: {', '.join(MODEL_KINDS)}")


def prunable_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, "weight") for every Linear and Conv2d: the tensors that pruning and int8 act on."""
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


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
