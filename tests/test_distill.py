"""Distillation from a real CNN teacher, trained briefly on the digits, into a smaller MLP student."""

import math
from statistics import mean

import pytest
import torch

from wattflow.compress.distill import distill_checkpoint, distillation_loss
from wattflow.config import DistillConfig
from wattflow.data import load_splits
from wattflow.models import default_spec, load_checkpoint


@pytest.fixture
def teacher(sgd_trained):
    """The CNN (default spec) after 15 epochs of plain single-process SGD: about 97-98 % on val and test."""
    return sgd_trained["cnn"]


def test_distillation_loss_matches_a_hand_computation():
    s, t, label = [1.0, 2.0, 0.5], [3.0, 0.0, 1.0], 1

    def softmax(z, temp):
        e = [math.exp(v / temp) for v in z]
        return [v / sum(e) for v in e]

    def kl(temp):  # KL(teacher || student) at temperature temp
        p, q = softmax(t, temp), softmax(s, temp)
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))

    ce = -math.log(softmax(s, 1.0)[label])
    args = torch.tensor([s]), torch.tensor([t]), torch.tensor([label])
    for temp in (1.0, 2.0, 4.0):
        for alpha in (0.0, 0.3, 1.0):
            expected = alpha * kl(temp) * temp**2 + (1 - alpha) * ce
            assert distillation_loss(*args, temp, alpha).item() == pytest.approx(expected, rel=1e-5)
    # T^2 scaling: the soft term alone is the plain KL times T^2
    assert distillation_loss(*args, 4.0, 1.0).item() == pytest.approx(16 * kl(4.0), rel=1e-5)
    # a batch is averaged per sample ("batchmean"), not per logit
    batch = torch.tensor([s, s]), torch.tensor([t, t]), torch.tensor([label, label])
    assert distillation_loss(*batch, 2.0, 0.5).item() == pytest.approx(distillation_loss(*args, 2.0, 0.5).item())
    # at alpha 0 the teacher is not needed: training from scratch on the same schedule
    assert distillation_loss(args[0], None, args[2], 2.0, 0.0).item() == pytest.approx(ce, rel=1e-6)


@pytest.mark.claim  # six 30-epoch students
def test_distilled_student_beats_the_same_student_trained_from_scratch(teacher, tmp_path):
    """Default DistillConfig (MLP [64, 32], 30 epochs, T=4, alpha=0.7) against alpha=0, which is the same
    student trained on the labels alone: same spec, epochs, schedule and seed. On these 270 validation
    images one seed's difference is one or two images, so the claim is the mean over three paired seeds;
    agreement with the teacher is the direct effect and must rise on every seed.
    Measured (seeds 0-7): val accuracy 0.9625 -> 0.9704, val agreement with the teacher 0.979 -> 0.992."""
    path, sha = teacher
    cfg, splits = DistillConfig(), load_splits()
    spec = default_spec(cfg.student_model, splits.in_features, splits.num_classes, mlp_hidden=cfg.student_mlp_hidden)
    results = {}
    for seed in range(3):
        for alpha in (0.0, cfg.alpha):
            results[seed, alpha] = distill_checkpoint(
                path, tmp_path / f"s{seed}-{alpha}.pt", spec, splits.train, splits.val, cfg.epochs, cfg.lr,
                cfg.temperature, alpha, seed=seed, expected_sha256=sha)
    distilled = [results[seed, cfg.alpha] for seed in range(3)]
    scratch = [results[seed, 0.0] for seed in range(3)]
    assert mean(d.val_accuracy for d in distilled) > mean(s.val_accuracy for s in scratch) > 0.94
    assert all(d.val_teacher_agreement > s.val_teacher_agreement for d, s in zip(distilled, scratch, strict=True))

    out = distilled[0]
    student, saved_spec, meta = load_checkpoint(out.checkpoint, out.sha256)
    assert saved_spec == spec == out.student_spec and meta["teacher_sha256"] == sha
    assert sum(p.numel() for p in student.parameters()) == out.student_params
    assert out.student_params < sum(p.numel() for p in load_checkpoint(path)[0].parameters()) / 5


def test_a_student_for_other_inputs_or_classes_is_refused(teacher, tmp_path):
    path, _ = teacher
    splits = load_splits()
    with pytest.raises(ValueError, match="num_classes"):
        distill_checkpoint(path, tmp_path / "s.pt", default_spec("mlp", num_classes=3), splits.train, splits.val,
                           1, 0.05, 4.0, 0.7)
