"""A wattflow checkpoint run in torch eager mode (format "torch"); it ships packed (.wfp, see `packed`). A
checkpoint whose meta names a torchao config runs with that quantization re-applied (compiled), on CUDA for
the CUDA-only torchao backends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wattflow.models import TORCH_EXPORT_LOCK, input_signature, load_checkpoint
from wattflow.runtimes import RUNTIMES, Param, Predictor, Runtime, pip_requirements


class Float32IO(nn.Module):
    """float32 in and out whatever the model's dtype, so every logged variant (bf16 too) takes the same input
    as the others."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.dtype = next(model.parameters()).dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype) if x.is_floating_point() else x).float()


def module_predictor(model: nn.Module, spec: dict[str, Any], meta: dict[str, Any], threads: int,
                     compile: bool, device: str = "cpu") -> Predictor:
    """Scores from a loaded module on `device` ("cpu" or "cuda": cuda:0), through the torchao runtime its meta
    names if any. Raises `wattflow.compress.quantize.BackendUnavailable` when it cannot run there."""
    torch.set_num_threads(threads)  # process-wide: torch has no per-model thread pool
    dtype = next(model.parameters()).dtype
    if meta.get("torchao"):
        from wattflow.compress.torchao_backend import runtime

        shape, input_dtype = input_signature(spec, meta)
        model, where = runtime(model, str(meta["torchao"]), shape, compile=compile, device=device,
                               input_dtype=input_dtype)
        dtype = torch.float32
    else:
        where = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        if where.type == "cuda" and not torch.cuda.is_available():
            from wattflow.compress.quantize import BackendUnavailable
            raise BackendUnavailable("device 'cuda' requested but torch sees no CUDA GPU")
        model = model.to(where)
    device = where

    def predict(x: np.ndarray) -> np.ndarray:
        xb = torch.from_numpy(np.ascontiguousarray(x))
        with torch.inference_mode():
            logits = model(xb.to(device, dtype) if xb.is_floating_point() else xb.to(device))
        return logits.float().cpu().numpy()

    return predict


def state_params(state: dict[str, torch.Tensor]) -> list[Param]:
    # float() is exact for bf16/fp16 (numpy has no bf16) and keeps -0.0 counted as zero.
    return [(t.float().numpy() if t.is_floating_point() else t.numpy(), 0, t.numel() * t.element_size())
            for t in state.values()]


def log_module(model: nn.Module, spec: dict[str, Any], meta: dict[str, Any]) -> None:
    """MLflow's default 'pt2' format: a graph traced on the input example (no pickled code)."""
    import mlflow
    from mlflow.models import infer_signature

    shape, dtype = input_signature(spec, meta)
    example = torch.zeros(2, *shape, dtype=dtype).numpy()
    wrapped = Float32IO(model)
    with torch.inference_mode():
        output = wrapped(torch.from_numpy(example)).numpy()
    with TORCH_EXPORT_LOCK:
        mlflow.pytorch.log_model(wrapped, name="model", input_example=example,
                                 signature=infer_signature(example, output),
                                 pip_requirements=pip_requirements("torch"))


@RUNTIMES.register("torch")
class TorchEager(Runtime):
    """Ships packed: the .wfp holds only what inference needs, and must predict exactly the same."""

    def predictor(self, path, threads: int = 1, compile: bool = True, device: str = "cpu") -> Predictor:
        return module_predictor(*load_checkpoint(path), threads, compile, device)

    def params(self, path) -> list[Param]:
        return state_params(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])

    def deployable(self, path, out_dir: Path) -> tuple[str, str] | None:
        from wattflow.compress.pack import pack_checkpoint

        out_path = Path(out_dir) / (Path(path).stem + ".wfp")
        pack_checkpoint(path, out_path)
        return str(out_path), "packed"

    def log_model(self, path) -> None:
        log_module(*load_checkpoint(path))
