"""bf16: a plain torch cast of every parameter; halves the file, fast only on CPUs with bf16 instructions."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from wattflow.compress.backends import Backend, QuantizedArtifact, register
from wattflow.models import load_checkpoint, save_checkpoint, sha256_file


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def available() -> tuple[bool, str]:
    return True, "native bf16 instructions" if _cpu_has_bf16() else "no native bf16 on this CPU: emulated, slow"


def quantize(ckpt_path: Path, out_path: Path, calibration_x, note: str) -> QuantizedArtifact:
    model, spec, meta = load_checkpoint(ckpt_path)
    meta = {**meta, "quantized": "bf16", "source_sha256": sha256_file(ckpt_path)}
    save_checkpoint(out_path, model.to(torch.bfloat16), spec, meta)
    return QuantizedArtifact(str(out_path), "torch", "bf16", note)


register(Backend("bf16", ".bf16.pt", available, quantize))
