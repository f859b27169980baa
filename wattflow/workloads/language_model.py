"""Next-token prediction: windows of `data.block_size` token ids [N, T] (int64) to next-token scores
[N, T, vocab]. Loss: cross-entropy per token (nats). Metrics: `perplexity` (exp of the mean loss per token,
lower is better; the selection budget is a percent increase of it), `loss_nats_per_token`, and next-token top-1
`accuracy` (so that the MLflow contract is the classifiers' one; training validates on it). The LM head is
never pruned."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wattflow.config import FactoryRef
from wattflow.data import DataError, batches
from wattflow.workloads import WORKLOADS, Workload, WorkloadError
from wattflow.zoo import MODELS

SCORE_BATCH = 32  # windows per scoring batch: [32, T, vocab] float32 logits stay a few MB


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@WORKLOADS.register("language-model")
class LanguageModel(Workload):
    name = "language-model"
    primary_metric = "accuracy"  # what training validates on: a per-token mean, exact when ranks combine shards
    higher_is_better = True
    budget_metric = "perplexity"

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "tokens_per_sample": int(self.splits.input_shape[0])}

    def _spec(self, field: str, ref: str | FactoryRef, kwargs: dict[str, Any]) -> dict[str, Any]:
        s = self.splits
        if isinstance(ref, FactoryRef):
            return {"factory": ref.factory, "kwargs": dict(ref.kwargs),
                    "path": str(Path(ref.path).resolve()) if ref.path else None}
        try:
            return MODELS.get(ref).spec(list(s.input_shape), s.num_classes, **kwargs)
        except (TypeError, ValueError) as err:
            raise WorkloadError(f"{field}: {err}") from None

    def model_spec(self) -> dict[str, Any]:
        return self._spec("train.model", self.cfg.train.model, self.cfg.train.model_kwargs)

    def student_spec(self) -> dict[str, Any]:
        d = self.cfg.distill
        return self._spec("distill.student_model", d.student_model, d.student_model_kwargs)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))

    def score(self, predict, dataset) -> dict[str, float]:
        """Mean loss per token (nats), its perplexity, and next-token top-1 accuracy over `dataset`."""
        nll = 0.0
        correct = tokens = 0
        for xb, yb in batches(dataset, SCORE_BATCH):
            logp = _log_softmax(predict(xb).astype(np.float64))
            nll -= float(np.take_along_axis(logp, yb[..., None], axis=-1).sum())
            correct += int((logp.argmax(axis=-1) == yb).sum())
            tokens += yb.size
        loss = nll / tokens
        return {"accuracy": correct / tokens, "perplexity": math.exp(loss), "loss_nats_per_token": loss}

    def keep_layers(self, model: nn.Module) -> list[nn.Module]:
        modules = dict(model.named_modules())
        names = self.cfg.train.keep_layers if self.cfg.train.keep_layers is not None else ["lm_head"]
        missing = [n for n in names if n not in modules]
        if missing and self.cfg.train.keep_layers is not None:
            raise WorkloadError(f"train.keep_layers names {missing}, which the model does not have")
        return [modules[n] for n in names if n in modules]

    def sample(self, checkpoint: str, prompt_tokens: int = 32, new_tokens: int = 120) -> str | None:
        """A greedy continuation of the start of the test text, prompt and continuation split by '▌'."""
        from wattflow.datasets.text import decode
        from wattflow.models import load_checkpoint

        model, _, meta = load_checkpoint(checkpoint)
        vocab = meta.get("preprocessing", {}).get("vocab")
        if not hasattr(model, "generate") or not vocab:
            return None
        prompt = torch.from_numpy(self.example_inputs(1))[:, :prompt_tokens]
        out = model.eval().generate(prompt, new_tokens)[0].tolist()
        return decode(out[:prompt_tokens], vocab) + "▌" + decode(out[prompt_tokens:], vocab)

    def check(self) -> None:
        s = self.splits  # DataError for a bad file
        if s.input_dtype != "int64" or len(s.input_shape) != 1:
            raise DataError(f"language-model takes windows of token ids (data.dataset: text); the data gives "
                            f"{s.input_dtype} samples of shape {list(s.input_shape)}")
        for field, x, out in self.models_on_example():
            want = (2, *s.input_shape, s.num_classes)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
                got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise WorkloadError(f"{field}: the model maps token windows {list(x.shape)} to {got}; it must "
                                    f"return next-token scores {list(want)} (vocabulary {s.num_classes})")
