import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from wattflow.data import load_splits
from wattflow.models import build_model, default_spec, load_checkpoint, save_checkpoint, sha256_file


def test_splits_are_deterministic_stratified_and_disjoint():
    a, b = load_splits(seed=3), load_splits.__wrapped__(seed=3)
    assert np.array_equal(a.train.y, b.train.y) and np.array_equal(a.test.x, b.test.x)
    sizes = (len(a.train.y), len(a.val.y), len(a.test.y))
    assert sum(sizes) == 1797 and sizes[2] == 360
    # stratified: each class's share in test is within 1 point of its share overall
    all_y = np.concatenate([a.train.y, a.val.y, a.test.y])
    for c in range(10):
        assert abs((a.test.y == c).mean() - (all_y == c).mean()) < 0.01
    assert a.train.x.dtype == np.float32 and 0.0 <= a.train.x.min() and a.train.x.max() <= 1.0
    assert not np.array_equal(load_splits(seed=4).test.y, a.test.y)


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match="'digits', 'npz', 'image-folder' or 'text'"):
        load_splits("imagenet")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_checkpoint_round_trip_with_weights_only(tmp_path, kind):
    torch.manual_seed(0)
    model = build_model(default_spec(kind)).eval()
    path = tmp_path / "m.pt"
    sha = save_checkpoint(path, model, default_spec(kind), {"epochs": 1})
    assert sha == sha256_file(path)
    raw = torch.load(path, weights_only=True)  # no pickled code: loads under the safe unpickler
    assert set(raw) == {"spec", "state_dict", "meta"}
    loaded, spec, meta = load_checkpoint(path, expected_sha256=sha)
    x = torch.rand(5, 64)
    assert torch.equal(model(x), loaded(x)) and spec["kind"] == kind and meta == {"epochs": 1}


def test_tampered_checkpoint_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    sha = save_checkpoint(path, build_model(default_spec("mlp")), default_spec("mlp"))
    with open(path, "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="sha256"):
        load_checkpoint(path, expected_sha256=sha)


def test_unknown_model_kind_is_refused():
    with pytest.raises(ValueError, match="allowed: cnn, gpt, mlp, resnet"):
        build_model({"kind": "vgg"})


def test_identical_weights_give_identical_checkpoint_bytes(tmp_path):
    model, spec = build_model(default_spec("mlp")), default_spec("mlp")
    assert save_checkpoint(tmp_path / "a.pt", model, spec) == save_checkpoint(tmp_path / "b.pt", model, spec)


def test_ranks_read_the_digits_and_their_launchers_splits_without_importing_scikit_learn(tmp_path):
    """A launcher saves its stratified splits (wattflow.distributed does, beside job.json); a process that finds
    its split there splits nothing again and imports no scikit-learn, the digits read from its bundled copy."""
    from sklearn.datasets import load_digits

    from wattflow.data import SPLIT_INDICES_ENV, digits_arrays, save_split_indices, stratified_indices

    x, y = digits_arrays()
    bunch = load_digits()
    assert np.array_equal(x, (bunch.data / 16.0).astype(np.float32)) and np.array_equal(y, bunch.target)
    made = stratified_indices(y, 0.15, 0.2, 3, "digits")
    save_split_indices(tmp_path / "splits.npz")
    rank = ("import sys, numpy as np; from wattflow.data import load_splits; s = load_splits(seed=3); "
            "print('sklearn' in sys.modules); np.save(sys.argv[1], s.test.y)")
    env = {**os.environ, SPLIT_INDICES_ENV: str(tmp_path / "splits.npz")}
    out = subprocess.run([sys.executable, "-c", rank, str(tmp_path / "test_y.npy")], env=env, text=True,
                         capture_output=True, check=True).stdout.split()
    assert out == ["False"]   # no scikit-learn imported
    assert np.array_equal(np.load(tmp_path / "test_y.npy"), y[made[2]])  # the launcher's split
