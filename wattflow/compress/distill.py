"""Knowledge distillation (Hinton, Vinyals & Dean, 2015): a smaller student learns from the teacher's
softened outputs as well as from the labels.

Single process: the students are small. The frozen teacher's logits are computed batch by batch, in
inference mode, from the same batches the student sees: the data stream, never held whole in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from wattflow.data import batches, loader
from wattflow.models import build_model, load_checkpoint, save_checkpoint, sha256_file
from wattflow.train import lr_factor, make_optimizer


@dataclass(frozen=True)
class DistillOutput:
    checkpoint: str
    sha256: str
    val_accuracy: float
    student_spec: dict[str, Any]
    student_params: int
    val_teacher_agreement: float = float("nan")  # share of val samples where student and teacher agree


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """alpha * KL(softmax(t/T) || softmax(s/T)) * T^2 + (1 - alpha) * CE(s, labels); at alpha 0 the teacher's logits
    may be None (the loss is the cross-entropy alone).

    The soft term's gradients scale as 1/T^2; multiplying by T^2 keeps its weight against the hard term
    unchanged when T changes."""
    t = temperature
    # Scores on the last axis: [N, classes] per sample, or [N, T, vocab] per token (averaged over tokens).
    student_logits = student_logits.reshape(-1, student_logits.shape[-1])
    hard = F.cross_entropy(student_logits, labels.reshape(-1))
    if alpha == 0:
        return hard
    teacher_logits = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)
    return alpha * soft + (1.0 - alpha) * hard


GRAD_CLIP_NORM = 5.0


def distill_checkpoint(teacher_ckpt: str | Path, out_path: str | Path, student_spec: dict[str, Any],
                       train: Dataset, val: Dataset, epochs: int, lr: float, temperature: float, alpha: float,
                       batch_size: int = 32, seed: int = 0, expected_sha256: str | None = None,
                       optimizer: str = "sgd") -> DistillOutput:
    """Train a fresh `student_spec` model against the teacher's soft targets; `optimizer` ("sgd": Nesterov
    momentum; "adamw") with one warm-up epoch then cosine decay. alpha=0 is plain training from scratch on the
    same schedule."""
    if epochs < 1 or temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need epochs >= 1, temperature > 0, 0 <= alpha <= 1; got {epochs}, {temperature}, {alpha}")
    teacher, teacher_spec, teacher_meta = load_checkpoint(teacher_ckpt, expected_sha256)
    teacher = teacher.eval()
    for key in ("in_features", "num_classes"):
        if key in student_spec and key in teacher_spec and student_spec[key] != teacher_spec[key]:
            raise ValueError(f"student {key}={student_spec.get(key)} differs from the teacher's "
                             f"{teacher_spec.get(key)}")

    torch.manual_seed(seed)  # the student's initial weights
    student = build_model(student_spec)
    train_batches = loader(train, batch_size, shuffle=True, seed=seed)
    optimizer = make_optimizer(optimizer, student, lr, weight_decay=5e-4)
    total = epochs * len(train_batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, len(train_batches), total))
    teacher_dtype = next(teacher.parameters()).dtype
    student.train()
    shapes_checked = False
    for _ in range(epochs):
        for xb, yb in train_batches:
            out = student(xb)
            tb = None
            if alpha > 0 or not shapes_checked:  # at alpha 0 (training from scratch) the loss never reads the teacher
                with torch.inference_mode():
                    tb = teacher(xb.to(teacher_dtype) if xb.is_floating_point() else xb).float()
                tb = tb.clone()  # outside inference mode: autograd may save it for the backward pass
                if out.shape != tb.shape:
                    raise ValueError(f"the student's output {list(out.shape)} does not match the teacher's "
                                     f"{list(tb.shape)}: build the student for the same classes")
                shapes_checked = True
            loss = distillation_loss(out, tb, yb, temperature, alpha)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"distillation loss became {loss.item()}; lower distill.lr (now {lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # The T^2-scaled soft loss gives large early gradients: unclipped, small conv students at
            # lr 0.05 died (all-ReLU-dead, chance accuracy) on digits.
            torch.nn.utils.clip_grad_norm_(student.parameters(), GRAD_CLIP_NORM)
            optimizer.step()
            scheduler.step()
    student.eval()

    correct = agree = seen = 0
    with torch.inference_mode():
        for xb, yb in batches(val, 512):
            x_val = torch.from_numpy(xb)
            predicted = student(x_val).argmax(dim=-1)  # per sample, or per token
            correct += int((predicted == torch.from_numpy(yb)).sum())
            x_teacher = x_val.to(teacher_dtype) if x_val.is_floating_point() else x_val
            agree += int((predicted == teacher(x_teacher).argmax(dim=-1)).sum())
            seen += yb.size
    val_accuracy, agreement = correct / seen, agree / seen
    params = sum(p.numel() for p in student.parameters())
    inputs = {k: teacher_meta[k] for k in ("workload", "input_shape", "input_dtype", "num_classes", "preprocessing")
              if k in teacher_meta}
    meta = {**inputs, "teacher_sha256": expected_sha256 or sha256_file(teacher_ckpt), "epochs": epochs,
            "temperature": temperature, "alpha": alpha, "val_accuracy": val_accuracy,
            "val_teacher_agreement": agreement}
    sha = save_checkpoint(out_path, student, student_spec, meta)
    return DistillOutput(str(out_path), sha, val_accuracy, dict(student_spec), params, agreement)
