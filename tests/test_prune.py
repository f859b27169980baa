"""Pruning on real models trained briefly on the digits: gradual unstructured and structured (torch-pruning)."""

import os

import pytest
import torch
from helpers import model_accuracy

from wattflow.compress.prune import cubic_sparsity, prune_checkpoint, weight_sparsity
from wattflow.data import load_splits
from wattflow.models import load_checkpoint


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_cubic_schedule_ends_on_target_and_prunes_early_rounds_hardest():
    points = [cubic_sparsity(0.8, t, 3) for t in range(4)]
    assert points[0] == 0 and points[-1] == pytest.approx(0.8)
    steps = [b - a for a, b in zip(points, points[1:], strict=False)]
    assert steps[0] > steps[1] > steps[2] > 0


def test_gradual_unstructured_reaches_target_with_plain_weights(sgd_trained, tmp_path):
    path, sha = sgd_trained["cnn"]
    splits = load_splits()
    out = prune_checkpoint(path, tmp_path / "p.pt", 0.8, splits.train, 3, 0.01, expected_sha256=sha,
                           schedule_steps=3)
    assert out.method == "unstructured" and out.sparsity == pytest.approx(0.8, abs=0.005)
    state = torch.load(out.checkpoint, weights_only=True)["state_dict"]
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    model, _, meta = load_checkpoint(out.checkpoint, out.sha256)
    assert not (model.head[3].weight == 0).any()  # the classifier head is kept by default (traced, not guessed)
    achieved, per_layer = weight_sparsity(model, kept=[model.head[3]])
    assert achieved == pytest.approx(out.sparsity) and per_layer == out.layer_sparsity
    assert meta["pruned_sparsity"] == pytest.approx(out.sparsity)
    # zeros do not shrink the dense model: same parameter count, no smaller file
    assert out.params_after == out.params_before == params(model)
    assert out.nonzero_params == sum(int((p != 0).sum()) for p in model.parameters())
    assert os.path.getsize(out.checkpoint) >= os.path.getsize(path)
    assert model_accuracy(model, splits.test) > 0.9


def test_keep_names_the_layers_never_pruned(sgd_trained, tmp_path):
    path, _ = sgd_trained["cnn"]
    everything = prune_checkpoint(path, tmp_path / "a.pt", 0.5, load_splits().train, 0, 0.01, keep=())
    assert "head.3.weight" in everything.layer_sparsity
    spared = prune_checkpoint(path, tmp_path / "b.pt", 0.5, load_splits().train, 0, 0.01, keep=("features.0",))
    assert set(spared.layer_sparsity) == {"features.2.weight", "head.1.weight", "head.3.weight"}
    with pytest.raises(ValueError, match="not in the model"):
        prune_checkpoint(path, tmp_path / "c.pt", 0.5, load_splits().train, 0, 0.01, keep=("nope",))


def test_unstructured_prunes_only_the_selected_layer_types(sgd_trained, tmp_path):
    path, _ = sgd_trained["cnn"]
    out = prune_checkpoint(path, tmp_path / "p.pt", 0.7, load_splits().train, 1, 0.01, method="unstructured",
                           schedule_steps=2, layer_types=("linear",))
    assert set(out.layer_sparsity) == {"head.1.weight"}  # head.3, the classifier, is kept
    assert out.sparsity == pytest.approx(0.7, abs=0.005)
    model, _, _ = load_checkpoint(out.checkpoint)
    assert weight_sparsity(model, ("conv",))[0] < 0.01  # conv weights were left dense


@pytest.mark.parametrize("kind, widths", [("mlp", {"net.0": (128, 64), "net.2": (64, 32)}),
                                          ("cnn", {"features.0": (16, 8), "features.2": (32, 16),
                                                   "head.1": (64, 32)})])
def test_structured_removes_neurons_and_shrinks_model_and_file(sgd_trained, tmp_path, kind, widths):
    path, sha = sgd_trained[kind]
    splits = load_splits()
    out = prune_checkpoint(path, tmp_path / "s.pt", 0.5, splits.train, 3, 0.01, expected_sha256=sha,
                           method="structured", schedule_steps=2)
    assert out.layer_width == widths
    assert out.layer_sparsity == {name: 0.5 for name in widths}
    # The checkpoint carries a new spec and rebuilds from it alone, with weights_only=True.
    model, spec, meta = load_checkpoint(out.checkpoint, out.sha256)
    assert spec == out.spec and meta["prune_method"] == "structured"
    assert params(model) == out.params_after < out.params_before == params(load_checkpoint(path)[0])
    assert out.sparsity == pytest.approx(1 - out.params_after / out.params_before)
    # Halving every hidden width removes more than half the parameters (both sides of a weight shrink).
    assert out.sparsity > 0.6
    file_ratio = os.path.getsize(out.checkpoint) / os.path.getsize(path)
    assert file_ratio == pytest.approx(out.params_after / out.params_before, abs=0.03)
    assert model(torch.from_numpy(splits.test.x[:5])).shape == (5, 10)
    assert model_accuracy(model, splits.test) > 0.85


def test_structured_layer_types_and_an_extreme_ratio_keep_the_model_valid(sgd_trained, tmp_path):
    path, _ = sgd_trained["cnn"]
    train = load_splits().train
    convs_only = prune_checkpoint(path, tmp_path / "c.pt", 0.5, train, 0, 0.01, method="structured",
                                  layer_types=("conv",))
    assert convs_only.spec["channels"] == [8, 16] and convs_only.spec["hidden"] == 64
    # torch-pruning would silently skip a layer it had to empty: one output per layer survives instead.
    extreme = prune_checkpoint(path, tmp_path / "e.pt", 0.99, train, 0, 0.01, method="structured")
    assert extreme.spec["channels"] == [1, 1] and extreme.spec["hidden"] == 1
    assert load_checkpoint(extreme.checkpoint)[0](torch.zeros(2, 64)).shape == (2, 10)


def test_bad_requests_are_refused(sgd_trained, tmp_path):
    path, _ = sgd_trained["mlp"]
    train = load_splits().train
    with pytest.raises(ValueError, match="unknown pruning method"):
        prune_checkpoint(path, tmp_path / "x.pt", 0.5, train, 0, 0.01, method="random")
    with pytest.raises(ValueError, match="no layer whose outputs could be removed"):
        prune_checkpoint(path, tmp_path / "x.pt", 0.5, train, 0, 0.01, method="structured", layer_types=("conv",))
    with pytest.raises(ValueError, match="sha256"):
        prune_checkpoint(path, tmp_path / "x.pt", 0.5, train, 0, 0.01, expected_sha256="0" * 64)
    assert not (tmp_path / "x.pt").exists()
