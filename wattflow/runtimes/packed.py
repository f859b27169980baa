"""wattflow's packed deployable (.wfp, `wattflow.compress.pack`), unpacked and run in torch eager mode."""

from __future__ import annotations

from wattflow.compress.pack import load_packed, read_packed
from wattflow.runtimes import RUNTIMES, Param, Predictor, Runtime
from wattflow.runtimes.torch_eager import log_module, module_predictor, state_params


@RUNTIMES.register("packed")
class Packed(Runtime):
    def predictor(self, path, threads: int = 1, compile: bool = True, device: str = "cpu") -> Predictor:
        return module_predictor(*load_packed(path), threads, compile, device)

    def params(self, path) -> list[Param]:
        # The tensors as they load, at the source dtype: a grid-coded float32 weight counts 4 bytes dense.
        return state_params(read_packed(path)[2])

    def log_model(self, path) -> None:
        log_module(*load_packed(path))
