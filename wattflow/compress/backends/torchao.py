"""torchao backends (`wattflow.compress.torchao_backend` holds the configs and the runtime): the float32
checkpoint plus meta {"torchao": config}: a quantized torchao module holds tensor subclasses that only a pickle
of code could restore, so the config is re-applied at load time (`wattflow.evaluate.load_predictor`).
Quantizing here checks that it applies and measures agreement."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import numpy as np
import torch

from wattflow.compress import torchao_backend
from wattflow.compress.backends import Backend, QuantizedArtifact, register
from wattflow.models import load_checkpoint, save_checkpoint, sha256_file


def quantize(backend: str, ckpt_path: Path, out_path: Path, calibration_x: np.ndarray | None, where: str
             ) -> QuantizedArtifact:
    source, spec, meta = load_checkpoint(ckpt_path)
    source = source.float()
    entry = torchao_backend.TORCHAO_BACKENDS[backend]
    meta = {**meta, "quantized": backend, "torchao": entry.config, "source_sha256": sha256_file(ckpt_path)}
    save_checkpoint(out_path, source, spec, meta)
    quantized, layers = torchao_backend.quantize_model(copy.deepcopy(source), backend)
    note = (f"{entry.note}; {layers} Linear layer(s) quantized by torchao {entry.config} at load time "
            f"({where}); the file holds the fp32 weights, so its size figures are fp32 sizes")
    if calibration_x is not None:
        x = torch.from_numpy(np.ascontiguousarray(calibration_x))
        x = x.float() if x.is_floating_point() else x
        device = torchao_backend.device_for(backend)
        with torch.inference_mode():
            agree = source(x).argmax(-1) == quantized(x.to(device)).argmax(-1).cpu()
        note += f"; top-1 agreement with the source {float(agree.float().mean()):.4f} on {len(x)} samples (eager)"
    return QuantizedArtifact(str(out_path), "torch", backend, note)


for name, suffix in (("torchao-int8-dynamic", ".torchao-int8dyn.pt"),
                     ("torchao-int8-weight-only", ".torchao-int8wo.pt"), ("torchao-fp8", ".torchao-fp8.pt")):
    register(Backend(name, suffix, partial(torchao_backend.available, name), partial(quantize, name),
                     devices=("cuda",) if torchao_backend.TORCHAO_BACKENDS[name].needs_cuda else ("cpu", "cuda")))
