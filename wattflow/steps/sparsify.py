"""One-shot row-wise sparsity without retraining (`wattflow.compress.wanda`), the large-model methods:

    wanda:0.5      Wanda scores |W|*||X|| from calibration batches, half of every row's weights removed
    magnitude:0.5  the same by |W| alone (the baseline the Wanda paper compares with)
    wanda:2:4      semi-structured: the 2 best of every 4 consecutive weights of a row kept (sparse tensor cores)
    wanda:0.5,ft=1 then a short fine-tune of 1 epoch (`prune.lr`, SGD) with the masks held: zeros stay zero

Every Linear layer is sparsified except the kept ones (the LM / classifier head). The dense file does not
shrink; the packed deployable stores the zeros compactly. A 2:4 model runs dense here (torch eager, ONNX
Runtime): sparse kernels need CUDA with compute capability >= 8.0."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from wattflow.steps import STEPS, Step

_PATTERN = re.compile(r"^(\d+):(\d+)$")


@STEPS.register("sparsify")
class SparsifyStep(Step):
    kind: Literal["sparsify"] = "sparsify"
    score: Literal["wanda", "magnitude"] = Field(
        description="wanda: |weight| x L2 norm of its input over calibration batches; magnitude: |weight|.")
    sparsity: float | None = Field(None, gt=0.0, lt=1.0, description="Share of each row's weights removed.")
    pattern: str | None = Field(None, description="n:m semi-structured sparsity instead (2:4: keep 2 of every 4).")
    fine_tune_epochs: int = Field(0, ge=0, le=100, description="An optional short fine-tune after the one-shot "
                                  "sparsity (prune.lr), with the masks held so the pattern survives.")

    @model_validator(mode="after")
    def _one_of(self) -> SparsifyStep:
        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError(f"{self.score}: give a sparsity ({self.score}:0.5) or an n:m pattern ({self.score}:2:4)")
        if self.pattern is not None:
            n, m = self.nm()
            if not 0 < n < m:
                raise ValueError(f"{self.score}:{self.pattern}: an n:m pattern keeps n < m weights of every m")
        return self

    def nm(self) -> tuple[int, int]:
        found = _PATTERN.match(self.pattern or "")
        if not found:
            raise ValueError(f"{self.score}: pattern {self.pattern!r} is not n:m (e.g. 2:4)")
        return int(found[1]), int(found[2])

    @classmethod
    def claims(cls, name: str) -> bool:
        return name in ("wanda", "magnitude")

    @classmethod
    def from_token(cls, name: str, arg: str) -> dict[str, Any]:
        arg, _, option = arg.partition(",")
        fields: dict[str, Any] = {"score": name}
        if option:
            key, _, value = option.partition("=")
            if key.strip() != "ft":
                raise ValueError(f"{name}:{arg},{option}: the one option is ft=<fine-tune epochs>")
            fields["fine_tune_epochs"] = value.strip()
        if _PATTERN.match(arg):
            return {**fields, "pattern": arg}
        return {**fields, "sparsity": arg or None}

    def label(self) -> str:
        base = (f"{self.score}-{self.sparsity:g}" if self.pattern is None
                else f"{self.score}-{self.pattern.replace(':', 'of')}")  # "wanda-2of4": no ':' in file and run names
        return f"{base}-ft{self.fine_tune_epochs}" if self.fine_tune_epochs else base

    def compact(self) -> str:
        base = f"{self.score}:{self.sparsity!r}" if self.pattern is None else f"{self.score}:{self.pattern}"
        return f"{base},ft={self.fine_tune_epochs}" if self.fine_tune_epochs else base

    def check(self, model, kept: list) -> None:
        if self.pattern is None:
            return
        from torch import nn

        m = self.nm()[1]
        narrow = {name: layer.in_features for name, layer in model.named_modules()
                  if isinstance(layer, nn.Linear) and layer not in kept and layer.in_features % m}
        if narrow:
            raise ValueError(f"chain step {self.compact()}: {self.pattern} sparsity needs Linear input widths that "
                             f"are multiples of {m}; these layers are not: {narrow} (keep them in train.keep_layers "
                             "or use a sparsity instead of a pattern)")

    def settings(self, cfg) -> dict[str, Any]:
        return {"calibration_samples": cfg.quantize.calibration_samples, "keep_layers": cfg.train.keep_layers,
                **({"lr": cfg.prune.lr, "batch_size": cfg.train.batch_size, "seed": cfg.train.seed}
                   if self.fine_tune_epochs else {})}

    def run(self, cfg, source, out_dir: Path, name: str):
        from torch import nn

        from wattflow.compress.wanda import sparsify
        from wattflow.data import loader
        from wattflow.models import load_checkpoint, save_checkpoint
        from wattflow.stages import Artifact
        from wattflow.workloads import workload_for

        workload = workload_for(cfg)
        model, spec, meta = load_checkpoint(source.artifact.path, source.artifact.sha256)
        model.eval()
        kept = set(workload.keep_layers(model))
        layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m not in kept}
        n_batches = -(-cfg.quantize.calibration_samples // cfg.train.batch_size)
        train = loader(workload.splits.train, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)
        dtype = next(model.parameters()).dtype
        calibration = (xb.to(dtype) if xb.is_floating_point() else xb
                       for _, (xb, _) in zip(range(n_batches), train, strict=False))
        per_layer = sparsify(model, layers, self.score, self.sparsity, self.nm() if self.pattern else None,
                             calibration)
        if self.fine_tune_epochs:
            from torch.nn.utils import prune

            from wattflow.compress.prune import fine_tune

            for layer in layers.values():  # the masks ride along as hooks: zeros stay zero while training
                prune.custom_from_mask(layer, "weight", layer.weight.detach() != 0)
            fine_tune(model, workload.splits.train, self.fine_tune_epochs, cfg.prune.lr, cfg.train.batch_size,
                      cfg.train.seed, workload.loss)
            for layer in layers.values():
                prune.remove(layer, "weight")
            per_layer = {f"{n}.weight": float((m.weight == 0).float().mean()) for n, m in layers.items()}
        total = sum(m.weight.numel() for m in layers.values())
        zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
        meta = {**meta, "sparsity_score": self.score, "sparsity_pattern": self.pattern,
                "pruned_sparsity": zeros / total}
        out = out_dir / f"{name}.pt"
        sha = save_checkpoint(out, model, spec, meta)
        params = {"score": self.score, "sparsity": self.sparsity if self.sparsity is not None else "n/a",
                  "fine_tune_epochs": self.fine_tune_epochs,
                  "pattern": self.pattern or "none", "calibration_samples": cfg.quantize.calibration_samples,
                  "kernels": "dense here (2:4 sparse kernels need CUDA capability >= 8.0)" if self.pattern else "dense"}
        metrics = {"sparsity": zeros / total, **{f"sparsity.{k}": v for k, v in per_layer.items()}}
        return Artifact(path=str(out), format="torch", sha256=sha), params, metrics
