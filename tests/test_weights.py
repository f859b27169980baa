import copy

import numpy as np
import pytest
import torch
from helpers import train_briefly
from torch import nn

from wattflow.compress.quantize import backend_available, quantize_checkpoint
from wattflow.compress.weights import kmeans_1d, snap_int8, snap_kmeans
from wattflow.data import load_splits
from wattflow.evaluate import accuracy, load_predictor
from wattflow.models import load_checkpoint, prunable_modules, save_checkpoint, sha256_file

LENET = {"kind": "mlp", "in_features": 64, "hidden": [300, 100], "num_classes": 10}  # LeNet-300-100 shape


@pytest.fixture(scope="module")
def lenet() -> nn.Module:
    return train_briefly(LENET)


def half_zeroed(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module, name in prunable_modules(model):
            w = getattr(module, name)
            w.mul_(w.abs() > w.abs().flatten().median())  # -0.0 where a negative weight is zeroed
    return model


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.endswith("weight")}


def test_snap_int8_values_are_code_times_scale(lenet):
    source = half_zeroed(lenet)
    model = copy.deepcopy(source)
    grid = snap_int8(model)["weight_grid"]
    assert set(grid) == set(weights(model)) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    for name, w in weights(model).items():
        before = weights(source)[name]
        scales = torch.tensor(grid[name]["scales"], dtype=torch.float32)
        assert grid[name]["kind"] == "int8" and scales.tolist() == grid[name]["scales"]  # float32-exact
        assert torch.equal(scales, before.abs().amax(dim=1) / 127)
        codes = torch.round(w / scales[:, None])
        assert codes.abs().max() <= 127
        assert torch.equal(codes * scales[:, None], w)  # exactly on the grid, in float32
        assert torch.equal(w == 0, before == 0)  # zeros stay zero, and no small weight became zero here
        assert (w - before).abs().max() <= scales.max() / 2 * 1.0001


def test_snap_kmeans_shares_at_most_16_values_and_keeps_zeros(lenet):
    source = half_zeroed(lenet)
    model = copy.deepcopy(source)
    grid = snap_kmeans(model, bits=4)["weight_grid"]
    for name, w in weights(model).items():
        centroids = grid[name]["centroids"]
        assert grid[name]["kind"] == "codebook" and centroids == sorted(centroids)
        assert np.array_equal(np.float32(centroids), centroids)  # float32-exact floats
        distinct = torch.unique(w)
        assert len(distinct) <= 16 and 0 in distinct
        assert set(distinct.tolist()) == {0.0, *centroids}
        assert torch.equal(w == 0, weights(source)[name] == 0)


def test_snaps_are_deterministic_and_refuse_bf16(lenet):
    a, b = copy.deepcopy(lenet), copy.deepcopy(lenet)
    assert snap_kmeans(a) == snap_kmeans(b)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    with pytest.raises(ValueError, match="float32"):
        snap_int8(copy.deepcopy(lenet).to(torch.bfloat16))


def test_kmeans_1d_finds_clusters_and_keeps_outliers():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-1, 0.01, 500), rng.normal(1, 0.01, 500), [5.0]])
    c = kmeans_1d(x, 3)
    assert c.dtype == np.float32 and np.all(np.diff(c) > 0)
    # linear initialisation keeps the lone large value its own centroid (density init would lose it)
    np.testing.assert_allclose(c, [-1, 1, 5], atol=0.01)
    assert kmeans_1d(np.zeros(0), 15).size == 0


@pytest.mark.parametrize(("backend", "suffix", "tolerance"),
                         [("int8-weights", ".int8w.pt", 0.01), ("kmeans-4bit", ".kmeans4.pt", 0.03)])
def test_weight_backends_write_snapped_checkpoints_and_keep_accuracy(lenet, tmp_path, backend, suffix, tolerance):
    assert backend_available(backend)[0]
    src = tmp_path / "lenet.pt"
    save_checkpoint(src, copy.deepcopy(lenet).to(torch.bfloat16), LENET, {"origin": "test"})  # any source dtype
    art = quantize_checkpoint(src, backend, tmp_path / "out", load_splits().train.x[:256])
    assert art.path == str(tmp_path / "out" / f"lenet{suffix}") and art.format == "torch"
    assert "biases fp32" in art.note and "agreement" in art.note
    model, spec, meta = load_checkpoint(art.path)
    assert spec == LENET and next(model.parameters()).dtype == torch.float32  # the grids are float32
    assert meta["origin"] == "test" and meta["quantized"] == backend and meta["source_sha256"] == sha256_file(src)
    assert set(meta["weight_grid"]) == set(weights(model))
    test = load_splits().test
    acc_source = accuracy(load_predictor(src, "torch"), test.x, test.y)
    acc_snapped = accuracy(load_predictor(art.path, "torch"), test.x, test.y)
    assert acc_source > 0.9 and acc_snapped >= acc_source - tolerance
