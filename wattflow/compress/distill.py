"""Knowledge distillation (Hinton, Vinyals & Dean, 2015): a smaller student learns from the teacher's
softened outputs as well as from the labels.

Single process: the students are small, and the teacher's logits are computed once, up front, in
inference mode (it is frozen and the training data are not augmented, so they never change).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from wattflow.data import Split
from wattflow.models import build_model, load_checkpoint, save_checkpoint, sha256_file
from wattflow.train import lr_factor


@dataclass(frozen=True)
class DistillOutput:
    checkpoint: str
    sha256: str
    val_accuracy: float
    student_spec: dict[str, Any]
    student_params: int
    val_teacher_agreement: float = float("nan")  # share of val samples where student and teacher agree


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """alpha * KL(softmax(t/T) || softmax(s/T)) * T^2 + (1 - alpha) * CE(s, labels).

    The soft term's gradients scale as 1/T^2; multiplying by T^2 keeps its weight against the hard term
    unchanged when T changes."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)
    hard = F.cross_entropy(student_logits, labels)
    return alpha * soft + (1.0 - alpha) * hard


GRAD_CLIP_NORM = 5.0


def distill_checkpoint(teacher_ckpt: str | Path, out_path: str | Path, student_spec: dict[str, Any], train: Split,
                       val: Split, epochs: int, lr: float, temperature: float, alpha: float, batch_size: int = 32,
                       seed: int = 0, expected_sha256: str | None = None) -> DistillOutput:
    """Train a fresh `student_spec` model against the teacher's soft targets; SGD with Nesterov momentum and
    one warm-up epoch then cosine decay. alpha=0 is plain training from scratch on the same schedule."""
    if epochs < 1 or temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need epochs >= 1, temperature > 0, 0 <= alpha <= 1; got {epochs}, {temperature}, {alpha}")
    teacher, teacher_spec, _ = load_checkpoint(teacher_ckpt, expected_sha256)
    for key in ("in_features", "num_classes"):
        if student_spec.get(key) != teacher_spec.get(key):
            raise ValueError(f"student {key}={student_spec.get(key)} differs from the teacher's "
                             f"{teacher_spec.get(key)}")

    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    with torch.inference_mode():
        teacher_logits = teacher.eval()(x).float()

    torch.manual_seed(seed)  # the student's initial weights
    student = build_model(student_spec)
    loader = DataLoader(TensorDataset(x, y, teacher_logits), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    total = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, len(loader), total))
    student.train()
    for _ in range(epochs):
        for xb, yb, tb in loader:
            loss = distillation_loss(student(xb), tb, yb, temperature, alpha)
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

    with torch.inference_mode():
        x_val = torch.from_numpy(val.x)
        predicted = student(x_val).argmax(dim=1)
        val_accuracy = (predicted == torch.from_numpy(val.y)).float().mean().item()
        agreement = (predicted == teacher(x_val).argmax(dim=1)).float().mean().item()
    params = sum(p.numel() for p in student.parameters())
    meta = {"teacher_sha256": expected_sha256 or sha256_file(teacher_ckpt), "epochs": epochs,
            "temperature": temperature, "alpha": alpha, "val_accuracy": val_accuracy,
            "val_teacher_agreement": agreement}
    sha = save_checkpoint(out_path, student, student_spec, meta)
    return DistillOutput(str(out_path), sha, val_accuracy, dict(student_spec), params, agreement)
