"""A quantize backend by name (the registry `wattflow.compress.backends`: onnx-int8-static, bf16, kmeans-4bit,
...), calibrated on training batches; last step of a chain only. A backend that cannot run on this machine is
skipped with its reason."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from wattflow.steps import STEPS, Step


def _registered_backend(v: str) -> str:
    from wattflow.compress.backends import QUANT_BACKENDS  # the registry (each backend registers itself)

    if v not in QUANT_BACKENDS:
        raise ValueError(f"unknown quantization backend {v!r}; allowed: "
                         + ", ".join(repr(n) for n in QUANT_BACKENDS.names()))
    return v


QuantBackend = Annotated[str, AfterValidator(_registered_backend)]


@STEPS.register("quantize")
class QuantizeStep(Step):
    kind: Literal["quantize"] = "quantize"
    backend: QuantBackend = Field(description="onnx-*: ONNX Runtime; bf16: a torch cast; int8-weights / "
                                  "kmeans-4bit: packed weights; torchao-*: torchao (some need CUDA).")
    position = "last"

    @classmethod
    def claims(cls, name: str) -> bool:
        from wattflow.compress.backends import QUANT_BACKENDS

        return name in QUANT_BACKENDS

    @classmethod
    def from_token(cls, name: str, arg: str) -> dict[str, Any]:
        return {"backend": name}

    def label(self) -> str:
        return self.backend

    def compact(self) -> str:
        return self.backend

    def settings(self, cfg) -> dict[str, Any]:
        return {"quantize": cfg.quantize.model_dump()}

    def available(self, cfg) -> tuple[bool, str]:
        from wattflow.compress.backends import QUANT_BACKENDS
        from wattflow.compress.quantize import backend_available

        devices = QUANT_BACKENDS.get(self.backend).devices
        if cfg.eval.device not in devices:  # a variant measured elsewhere would compare devices, not compression
            return False, (f"{self.backend} runs on {' or '.join(devices)} only, and every variant is evaluated on "
                           f"eval.device={cfg.eval.device!r}: set eval.device to compare it like with like")
        return backend_available(self.backend)

    def uses_cuda(self) -> bool:
        from wattflow.compress.backends import QUANT_BACKENDS

        return QUANT_BACKENDS.get(self.backend).devices == ("cuda",)  # quantized, and checked, on cuda:0

    def run(self, cfg, source, out_dir: Path, name: str):
        from wattflow.compress.quantize import quantize_checkpoint
        from wattflow.data import first_samples
        from wattflow.models import sha256_file
        from wattflow.stages import Artifact
        from wattflow.workloads import workload_for

        calibration = first_samples(workload_for(cfg).splits.train, cfg.quantize.calibration_samples)
        out = quantize_checkpoint(source.artifact.path, self.backend, out_dir / name, calibration)
        params = {"backend": self.backend, "calibration_samples": cfg.quantize.calibration_samples, "note": out.note}
        return Artifact(path=out.path, format=out.format, sha256=sha256_file(out.path)), params, {}
