"""Weight-only grids, deployed in wattflow's packed format: float32 checkpoints whose weights lie on a grid
recorded in meta, which `wattflow.compress.pack` stores as codes.

    int8-weights  per-channel symmetric int8 weights; biases fp32
    kmeans-4bit   Deep Compression's weight sharing: per layer 15 shared values + exact zero (4-bit codes)
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from wattflow.compress.backends import Backend, QuantizedArtifact, register
from wattflow.compress.weights import snap_int8, snap_kmeans
from wattflow.models import load_checkpoint, save_checkpoint, sha256_file


def snap_weights(snap, name: str, ckpt_path: Path, out_path: Path, calibration_x: np.ndarray | None,
                 note: str) -> QuantizedArtifact:
    source, spec, meta = load_checkpoint(ckpt_path)
    model = copy.deepcopy(source).float()  # the grids are float32 values, whatever the source dtype
    meta = {**meta, **snap(model), "quantized": name, "source_sha256": sha256_file(ckpt_path)}
    save_checkpoint(out_path, model, spec, meta)
    if calibration_x is not None:
        x = torch.from_numpy(np.ascontiguousarray(calibration_x))
        x = x.float() if x.is_floating_point() else x
        with torch.inference_mode():
            agree = (source(x.to(next(source.parameters()).dtype) if x.is_floating_point() else x).argmax(-1)
                     == model(x).argmax(-1))
        note += f"; top-1 agreement with the source {float(agree.float().mean()):.4f} on {len(x)} samples"
    return QuantizedArtifact(str(out_path), "torch", name, note)


def _plain_torch() -> tuple[bool, str]:
    return True, "plain torch"


def int8_weights(ckpt_path: Path, out_path: Path, calibration_x, _note: str) -> QuantizedArtifact:
    return snap_weights(snap_int8, "int8-weights", ckpt_path, out_path, calibration_x,
                        "per-channel symmetric int8 weights; biases fp32")


def kmeans_4bit(ckpt_path: Path, out_path: Path, calibration_x, _note: str) -> QuantizedArtifact:
    return snap_weights(lambda m: snap_kmeans(m, bits=4), "kmeans-4bit", ckpt_path, out_path, calibration_x,
                        "per-layer k-means weight sharing: 15 shared values + exact zero (4-bit codes), no "
                        "fine-tune; biases fp32")


register(Backend("int8-weights", ".int8w.pt", _plain_torch, int8_weights))
register(Backend("kmeans-4bit", ".kmeans4.pt", _plain_torch, kmeans_4bit))
