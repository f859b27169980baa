import copy
import json
import lzma
import os
import pickle

import numpy as np
import pytest
import torch
from helpers import fit, train_briefly
from torch import nn
from torch.nn.utils import prune

from wattflow.compress import pack
from wattflow.compress.pack import MAGIC, load_packed, pack_checkpoint, read_packed
from wattflow.compress.quantize import export_onnx, quantize_checkpoint
from wattflow.data import load_splits
from wattflow.evaluate import accuracy, deployable_artifact, load_predictor, size_metrics
from wattflow.models import build_model, load_checkpoint, prunable_modules, save_checkpoint

LENET = {"kind": "mlp", "in_features": 64, "hidden": [300, 100], "num_classes": 10}  # LeNet-300-100 shape


def global_prune(model: nn.Module, amount: float, fine_tune_steps: int) -> nn.Module:
    """Zero the `amount` smallest weights over all layers (global magnitude), fine-tune with the masks on."""
    model = copy.deepcopy(model)
    prune.global_unstructured(prunable_modules(model), pruning_method=prune.L1Unstructured, amount=amount)
    fit(model, fine_tune_steps, lr=1e-3, seed=1)
    for module, name in prunable_modules(model):
        prune.remove(module, name)
    return model


def test_accuracy(path, fmt) -> float:
    test = load_splits().test
    return accuracy(load_predictor(path, fmt), test.x, test.y)


test_accuracy.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    """name -> checkpoint path: a briefly trained LeNet-300-100 and its variants."""
    root = tmp_path_factory.mktemp("pack")
    dense = train_briefly(LENET)  # the LeNet test_weights.py uses: trained once per run
    paths = {"fp32": str(root / "fp32.pt"), "zeroed90": str(root / "zeroed90.pt"),
             "pruned95": str(root / "pruned95.pt")}
    save_checkpoint(paths["fp32"], dense, LENET, {"origin": "test"})
    zeroed = copy.deepcopy(dense)
    with torch.no_grad():  # 90% zeros per layer, no fine-tune: a raw sparse tensor
        for module, name in prunable_modules(zeroed):
            w = getattr(module, name)
            w.mul_(w.abs() > w.abs().flatten().quantile(0.9))
    save_checkpoint(paths["zeroed90"], zeroed, LENET)
    save_checkpoint(paths["pruned95"], global_prune(dense, 0.95, fine_tune_steps=800), LENET)
    for src in ("fp32", "pruned95"):
        for backend in ("int8-weights", "kmeans-4bit", "bf16"):
            paths[f"{src}+{backend}"] = quantize_checkpoint(paths[src], backend, root, None).path
    return paths


def header(path) -> dict:
    body = lzma.decompress(open(path, "rb").read()[len(MAGIC):], format=lzma.FORMAT_ALONE)
    return json.loads(body[4:4 + int.from_bytes(body[:4], "little")])


def encodings(path) -> list[tuple[str, bool]]:
    """(encoding, sparse) of net.0.weight, net.0.bias, net.2.weight, ... in model order."""
    return [(row["enc"], row["sparse"]) for row in header(path)["tensors"]]


def logits(model: nn.Module) -> torch.Tensor:
    x = torch.from_numpy(load_splits().test.x).to(next(model.parameters()).dtype)
    with torch.inference_mode():
        return model(x)


# (checkpoint, encoding of the three weight tensors): biases are always raw and dense here
CASES = [("fp32", ("raw", False)), ("fp32+bf16", ("raw", False)), ("zeroed90", ("raw", True)),
         ("fp32+int8-weights", ("int8", False)), ("fp32+kmeans-4bit", ("codebook", False)),
         ("pruned95+int8-weights", ("int8", True)), ("pruned95+kmeans-4bit", ("codebook", True)),
         ("pruned95+bf16", ("raw", True))]


@pytest.mark.parametrize(("key", "weight_encoding"), CASES)
def test_pack_round_trip_gives_identical_logits(ckpts, tmp_path, key, weight_encoding):
    out = tmp_path / "m.wfp"
    size_bytes = pack_checkpoint(ckpts[key], out)
    assert size_bytes == os.path.getsize(out) and open(out, "rb").read().startswith(MAGIC)
    source, spec, meta = load_checkpoint(ckpts[key])
    model, spec2, meta2 = load_packed(out)
    assert spec2 == spec == LENET and meta2 == meta and not model.training
    for k, v in source.state_dict().items():
        assert v.dtype == model.state_dict()[k].dtype and torch.equal(v, model.state_dict()[k]), k
    assert torch.equal(logits(model), logits(source))
    assert encodings(out) == [weight_encoding, ("raw", False)] * 3
    text = json.dumps(header(out))
    assert "scales" not in text and "centroids" not in text  # the grids travel as binary parts, not JSON


def test_packing_is_deterministic_and_leaves_no_temporaries(ckpts, tmp_path):
    a = pack_checkpoint(ckpts["pruned95+kmeans-4bit"], tmp_path / "a.wfp")
    b = pack_checkpoint(ckpts["pruned95+kmeans-4bit"], tmp_path / "b.wfp")
    assert a == b and (tmp_path / "a.wfp").read_bytes() == (tmp_path / "b.wfp").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["a.wfp", "b.wfp"]


def test_deep_compression_ratio(ckpts, tmp_path):
    """Pruning 95% + 4-bit weight sharing + lzma vs the same lossless packing of the dense fp32 model."""
    sizes = {key: pack_checkpoint(ckpts[key], tmp_path / f"{key}.wfp")
             for key in ("fp32", "pruned95", "pruned95+kmeans-4bit", "pruned95+int8-weights")}
    acc = {key: test_accuracy(tmp_path / f"{key}.wfp", "packed") for key in sizes}
    ratio = {key: sizes["fp32"] / size for key, size in sizes.items()}
    report = f"bytes {sizes}, ratio vs fp32 .wfp {ratio}, accuracy {acc}"
    print(report)
    # Measured (LeNet-300-100 on 64 inputs): fp32 ~173 kB; pruned+kmeans4 (bf16-rounded biases) ~4.1 kB (42.6x);
    # pruned+int8 (fp32 biases) ~7.2 kB (~24x).
    assert ratio["pruned95+kmeans-4bit"] >= 40, report
    assert ratio["pruned95+int8-weights"] >= 22, report
    assert sizes["pruned95+kmeans-4bit"] < sizes["pruned95+int8-weights"] < sizes["pruned95"], report
    # Deep Compression's own definition: dense fp32 bytes of the weights and biases over the artifact.
    assert size_metrics(ckpts["fp32"], "torch")["dense_bytes"] / sizes["pruned95+kmeans-4bit"] >= 38, report
    # the grid is not destructive: the shared values keep the pruned model's accuracy
    assert acc["fp32"] > 0.9 and acc["pruned95"] > 0.93, report
    assert acc["pruned95+kmeans-4bit"] >= acc["pruned95"] - 0.02, report
    assert acc["pruned95+int8-weights"] >= acc["pruned95"] - 0.01, report


@pytest.mark.parametrize("key", ["fp32+int8-weights", "fp32+kmeans-4bit"])
def test_a_false_grid_claim_falls_back_to_raw(ckpts, tmp_path, key):
    payload = torch.load(ckpts[key], weights_only=True)
    payload["state_dict"]["net.2.weight"][3, 7] += 1e-3  # off the grid, claim unchanged
    payload["meta"]["weight_grid"]["net.4.weight"]["scales" if "int8" in key else "centroids"][0] = 0.1  # not fp32
    liar = tmp_path / "liar.pt"
    torch.save(payload, liar)
    pack_checkpoint(liar, tmp_path / "liar.wfp")
    source, _, meta = load_checkpoint(liar)
    model, _, meta2 = load_packed(tmp_path / "liar.wfp")
    assert torch.equal(logits(model), logits(source)) and meta2 == meta  # the claims are kept as written
    assert [enc for enc, _ in encodings(tmp_path / "liar.wfp")][::2] == ["int8" if "int8" in key else "codebook",
                                                                         "raw", "raw"]


def test_unusual_values_round_trip_bitwise(tmp_path):
    model = build_model(LENET)
    with torch.no_grad():
        w = model.net[0].weight
        w[0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])
        w[1:] = 0  # long zero runs: filler entries
        w[250, 5] = 1.0
        model.net[4].weight.zero_()  # an all-zero tensor
    save_checkpoint(tmp_path / "odd.pt", model, LENET)
    pack_checkpoint(tmp_path / "odd.pt", tmp_path / "odd.wfp")
    _, _, state = read_packed(tmp_path / "odd.wfp")
    for k, v in model.state_dict().items():
        same_bits = v.view(torch.int32) == state[k].view(torch.int32)
        assert torch.all(same_bits | ((v == 0) & (state[k] == 0))), k  # -0.0 may come back as +0.0
    assert torch.isnan(state["net.0.weight"][0, 0])


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_and_gaps_round_trip(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, 1001)
    assert np.array_equal(pack._unpack_bits(pack._pack_bits(codes, bits), bits, len(codes)), codes)
    mask = np.zeros(3000, bool)
    mask[rng.choice(3000, 30 * bits, replace=False)] = True
    mask[[0, 255, 511, 1022]] = True  # runs of exactly 254, 255 and 510 zeros
    assert np.array_equal(pack._positions_mask(pack._gaps(mask), len(mask)), mask)
    assert not pack._positions_mask(pack._gaps(np.zeros(600, bool)), 600).any()


def test_loading_runs_no_pickle(ckpts, tmp_path, monkeypatch):
    pack_checkpoint(ckpts["pruned95+kmeans-4bit"], tmp_path / "m.wfp")

    def refuse(*args, **kwargs):
        raise AssertionError("a packed file must load without pickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    model, _, _ = load_packed(tmp_path / "m.wfp")
    assert test_accuracy(tmp_path / "m.wfp", "packed") > 0.85 and model is not None


def test_refuses_what_is_not_packed_or_does_not_match_its_spec(ckpts, tmp_path):
    with pytest.raises(ValueError, match="magic"):
        read_packed(ckpts["fp32"])
    payload = torch.load(ckpts["fp32"], weights_only=True)
    payload["spec"] = {**LENET, "hidden": [300, 99]}
    torch.save(payload, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="does not match its spec"):
        pack_checkpoint(tmp_path / "wrong.pt", tmp_path / "wrong.wfp")
    assert not (tmp_path / "wrong.wfp").exists()


def test_deployable_artifact(ckpts, tmp_path):
    path, runtime, size_bytes = deployable_artifact(ckpts["pruned95+kmeans-4bit"], "torch", tmp_path / "deploy")
    assert path == str(tmp_path / "deploy" / "pruned95.kmeans4.wfp") and size_bytes == os.path.getsize(path)
    assert runtime == "packed"
    assert deployable_artifact(path, "packed", tmp_path / "elsewhere") == (path, "packed", size_bytes)
    onnx_path = tmp_path / "m.onnx"
    export_onnx(load_checkpoint(ckpts["fp32"])[0], onnx_path, 64)
    assert deployable_artifact(onnx_path, "onnx", tmp_path / "deploy") == (str(onnx_path), "onnx",
                                                                           os.path.getsize(onnx_path))
    assert sorted(os.listdir(tmp_path / "deploy")) == ["pruned95.kmeans4.wfp"]
    with pytest.raises(ValueError, match="allowed"):
        deployable_artifact(onnx_path, "tflite", tmp_path)


def test_size_metrics_and_predictor_of_a_packed_file(ckpts, tmp_path):
    for key in ("fp32", "pruned95+kmeans-4bit", "pruned95+bf16"):
        wfp = tmp_path / f"{key}.wfp"
        pack_checkpoint(ckpts[key], wfp)
        torch_sizes, packed_sizes = size_metrics(ckpts[key], "torch"), size_metrics(wfp, "packed")
        for name in ("param_count", "nonzero_params", "dense_bytes"):  # the same model, the same definitions
            assert packed_sizes[name] == torch_sizes[name], (key, name)
        assert packed_sizes["file_bytes"] == os.path.getsize(wfp) < torch_sizes["file_bytes"]
        x = load_splits().test.x
        assert np.array_equal(load_predictor(wfp, "packed")(x), load_predictor(ckpts[key], "torch")(x))
    pruned = size_metrics(tmp_path / "pruned95+kmeans-4bit.wfp", "packed")
    n_weights = sum(m.weight.numel() for m, _ in prunable_modules(build_model(LENET)))
    n_bias = pruned["param_count"] - n_weights
    assert pruned["nonzero_params"] == pytest.approx(0.05 * n_weights + n_bias, abs=2)
    assert pruned["dense_bytes"] == 4 * pruned["param_count"]
    assert size_metrics(tmp_path / "pruned95+bf16.wfp", "packed")["dense_bytes"] == 2 * pruned["param_count"]


@pytest.mark.parametrize("grid", [None, "kmeans-4bit"])
def test_a_two_of_four_tensor_is_stored_as_two_values_and_its_pattern_per_group(tmp_path, grid):
    from wattflow.compress.wanda import nm_mask

    spec = {"kind": "mlp", "in_features": 64, "hidden": [256], "num_classes": 8}
    model = build_model(spec)
    with torch.no_grad():
        for module, name in prunable_modules(model):
            w = getattr(module, name)
            w.mul_(nm_mask(w.abs(), 2, 4))
    path = tmp_path / "semi.pt"
    save_checkpoint(path, model, spec)
    if grid:
        path = quantize_checkpoint(path, grid, tmp_path, None).path
    packed = tmp_path / "semi.wfp"
    pack_checkpoint(path, packed)
    assert encodings(packed)[0][1] == "2:4" and encodings(packed)[2][1] == "2:4"   # both weights; biases dense
    state = load_checkpoint(path)[0].state_dict()
    assert all(torch.equal(state[k], v) for k, v in read_packed(packed)[2].items())   # lossless
    # smaller than the general sparse form (a uint8 gap per nonzero): one of 6 patterns per group of 4
    w = state["net.0.weight"]
    sizes = {row["sparse"]: len(pack._compress(b"".join(parts))) for row, parts in pack._candidates(w, None)
             if row["enc"] == "raw"}
    assert sizes["2:4"] < sizes[True]


def test_a_two_of_four_group_with_fewer_nonzeros_keeps_a_zero_and_decodes_exactly():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.5, 0.0, 0.0, -2.0, 0.0, 3.0, 0.0, 0.0]] * 2)
    w[1, 1] = 0.25
    claim = {"kind": "codebook", "centroids": [-2.0, 0.25, 1.5, 3.0]}
    semi = [(row, parts) for row, parts in pack._candidates(w, claim) if row["sparse"] == "2:4"]
    assert {row["enc"] for row, _ in semi} == {"raw", "codebook"}
    for row, parts in semi:
        decoded, _ = pack._decode({"dtype": "float32", **row, "shape": tuple(w.shape)}, parts)
        assert torch.equal(decoded, w), row
    assert pack._two_of_four((w != 0).reshape(-1).numpy(), torch.Size([2, 12])) is not None
    assert pack._two_of_four(np.ones(8, bool), torch.Size([2, 4])) is None   # 4 of 4: not 2:4
