"""Bring your own model and data: image folders, dataset and model factories by import path, every stage on a
user's residual conv net, and the house rules of the extension points."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wattflow.compress.distill import distill_checkpoint
from wattflow.compress.prune import prune_checkpoint
from wattflow.compress.quantize import quantize_checkpoint
from wattflow.config import PipelineConfig
from wattflow.data import DataError, first_samples, splits_for
from wattflow.datasets.image_folder import ImageFiles
from wattflow.datasets.sample_images import write_digit_images
from wattflow.evaluate import deployable_artifact, load_predictor
from wattflow.models import build_model, load_checkpoint, save_checkpoint
from wattflow.workloads import WorkloadError, check_workload, workload_for

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "bring-your-own"
USER_MODEL = {"factory": "mynet:build", "path": str(EXAMPLE), "kwargs": {"in_channels": 3, "num_classes": 10,
                                                                          "width": 4}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A grey 28x28 PNG folder and an RGB 32x32 JPEG folder of the bundled digits (20 per class)."""
    root = tmp_path_factory.mktemp("images")
    write_digit_images(root / "grey", mode="L", size=28, per_class=20)
    write_digit_images(root / "rgb", mode="RGB", size=32, fmt="jpeg", per_class=20)
    return root


def cfg_for(path: Path, model=None, size: int = 32, **sections) -> PipelineConfig:
    return PipelineConfig.model_validate({"data": {"dataset": "image-folder", "path": str(path), "image_size": size},
                                          "train": {"model": model or USER_MODEL}, **sections})


@pytest.mark.parametrize(("name", "size", "shape"), [("grey", 28, (1, 28, 28)), ("rgb", 32, (3, 32, 32))])
def test_an_image_folder_streams_normalised_images_of_its_mode_and_size(folders, name, size, shape):
    splits = splits_for(cfg_for(folders / name, size=size).data)
    assert splits.input_shape == shape and splits.num_classes == 10 and splits.notes == ()
    assert isinstance(splits.train, ImageFiles)  # read lazily, file by file: never the whole folder
    assert len(splits.train) + len(splits.val) + len(splits.test) == 200
    x = first_samples(splits.train, 64)
    assert x.shape == (64, *shape) and x.dtype == np.float32
    # normalised with the train split's own per-channel statistics, which are recorded with the model
    pre = splits.preprocessing
    assert pre["mode"] == ("L" if name == "grey" else "RGB") and pre["image_size"] == size
    assert len(pre["mean"]) == shape[0] and all(0.0 < s for s in pre["std"])
    assert abs(float(first_samples(splits.train, 10**6).mean())) < 0.05
    assert splits.identity["digest"] and splits.identity["name"] == name


def test_a_bad_image_folder_fails_naming_the_problem(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        splits_for(cfg_for(tmp_path / "missing").data)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no .png/.jpg/.jpeg image"):
        splits_for(cfg_for(tmp_path / "empty").data)
    write_digit_images(tmp_path / "one", mode="L", size=8, per_class=3)
    for d in (tmp_path / "one").iterdir():
        if d.name != "0":
            for f in d.iterdir():
                f.unlink()
    with pytest.raises(DataError, match="only one class"):
        splits_for(cfg_for(tmp_path / "one").data)
    write_digit_images(tmp_path / "bad", mode="L", size=8, per_class=5)
    (tmp_path / "bad" / "3" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"1 image file\(s\) cannot be read: .*broken.png"):
        splits_for(cfg_for(tmp_path / "bad").data)


def test_mixed_image_modes_are_converted_and_said_so(tmp_path):
    write_digit_images(tmp_path / "mixed", mode="L", size=16, per_class=10)
    Image.new("RGB", (20, 12), (200, 10, 10)).save(tmp_path / "mixed" / "4" / "colour.png")
    splits = splits_for(cfg_for(tmp_path / "mixed", size=16).data)
    assert splits.input_shape == (3, 16, 16)
    assert "converted to RGB" in splits.notes[0] and "'L': 100" in splits.notes[0]


def write_module(directory: Path, name: str, source: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


def test_a_dataset_factory_by_import_path_is_split_or_taken_as_given(tmp_path):
    write_module(tmp_path / "code", "mydata", """
        import torch
        from torch.utils.data import TensorDataset

        def one(n=90):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, 5, generator=g)
            return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())

        def three():
            return {"train": one(60), "val": one(20), "test": one(20)}

        def wrong():
            return [1, 2]
        """)
    data = lambda fn: {"data": {"dataset": {"factory": f"mydata:{fn}", "path": str(tmp_path / "code")}}}  # noqa: E731
    split = splits_for(PipelineConfig.model_validate(data("one")).data)
    assert (len(split.train), len(split.val), len(split.test)) == (58, 14, 18)  # stratified by label
    assert split.input_shape == (5,) and split.num_classes == 3 and split.input_dtype == "float32"
    given = splits_for(PipelineConfig.model_validate(data("three")).data)
    assert (len(given.train), len(given.val), len(given.test)) == (60, 20, 20)
    with pytest.raises(DataError, match="returned a list"):
        splits_for(PipelineConfig.model_validate(data("wrong")).data)
    with pytest.raises(DataError, match="module 'nodata' does not import"):
        splits_for(PipelineConfig.model_validate({"data": {"dataset": {"factory": "nodata:x"}}}).data)


def test_a_bad_model_factory_is_refused_before_any_work(folders, tmp_path):
    write_module(tmp_path / "code", "models_bad", """
        import torch

        NOT_CALLABLE = 3

        def not_a_module(**kw):
            return "a string"

        def five_classes(**kw):
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(5))

        def wrong_input(**kw):
            return torch.nn.Linear(7, 10)
        """)
    cases = {"nomodule:build": "does not import", "models_bad:NOT_CALLABLE": "not a callable",
             "models_bad:missing": "has no attribute", "models_bad:not_a_module": "not a torch.nn.Module",
             "models_bad:five_classes": "to [2, 5], but the data has 10 classes",
             "models_bad:wrong_input": "fails on a batch of the data (shape [2, 3, 32, 32]"}
    for factory, message in cases.items():
        with pytest.raises(WorkloadError, match=message.replace("[", r"\[").replace("(", r"\(")):
            check_workload(cfg_for(folders / "rgb", {"factory": factory, "path": str(tmp_path / "code")}))


def test_every_stage_runs_on_a_users_residual_conv_net_from_its_own_file(folders, tmp_path):
    """prune (head kept), channels (residual), distill, onnx int8, k-means, packing: on MyNet and RGB images."""
    cfg = cfg_for(folders / "rgb", distill={"student_model": {**USER_MODEL, "kwargs": {**USER_MODEL["kwargs"],
                                                                                        "width": 2}}})
    workload = check_workload(cfg)
    torch.manual_seed(0)
    model = build_model(workload.model_spec())
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, model.eval(), workload.model_spec(), workload.meta())
    train, val = workload.splits.train, workload.splits.val

    pruned = prune_checkpoint(ckpt, tmp_path / "p.pt", 0.7, train, 1, 0.01, loss_fn=workload.loss)
    assert "classifier.weight" not in pruned.layer_sparsity and pruned.sparsity == pytest.approx(0.7, abs=0.01)

    slim = prune_checkpoint(ckpt, tmp_path / "c.pt", 0.5, train, 1, 0.01, method="structured")
    assert slim.params_after < 0.5 * slim.params_before
    assert slim.spec["structure"]  # the shapes torch-pruning left, as plain data: reloads from the factory
    reloaded, _, meta = load_checkpoint(slim.checkpoint, slim.sha256)  # weights_only
    assert meta["input_shape"] == [3, 32, 32] and meta["preprocessing"]["mode"] == "RGB"
    x = torch.from_numpy(first_samples(val, 8))
    assert torch.isfinite(reloaded(x)).all() and reloaded(x).shape == (8, 10)

    student = distill_checkpoint(ckpt, tmp_path / "s.pt", workload.student_spec(), train, val, 1, 0.01, 4.0, 0.7)
    assert student.student_params < sum(p.numel() for p in model.parameters())

    calibration = first_samples(train, 64)
    for source in (ckpt, Path(slim.checkpoint)):
        onnx = quantize_checkpoint(source, "onnx-int8-static", tmp_path / "q", calibration)
        scores = load_predictor(onnx.path, "onnx")(first_samples(val, 4))
        assert scores.shape == (4, 10) and np.isfinite(scores).all()
    kmeans = quantize_checkpoint(pruned.checkpoint, "kmeans-4bit", tmp_path / "q", calibration)
    packed, _, packed_bytes = deployable_artifact(kmeans.path, "torch", tmp_path / "deploy")
    xs = first_samples(val, 16)
    assert np.array_equal(load_predictor(packed, "packed")(xs), load_predictor(kmeans.path, "torch")(xs))
    assert packed_bytes < Path(ckpt).stat().st_size / 4


def test_the_builtin_resnet_prunes_channels_through_its_shortcuts_and_reloads(tmp_path):
    spec = {"kind": "resnet", "in_channels": 3, "num_classes": 10, "depth": 8, "width": 8}
    torch.manual_seed(0)
    model = build_model(spec).eval()
    save_checkpoint(tmp_path / "r.pt", model, spec, {"input_shape": [3, 16, 16]})
    images = torch.randn(40, 3, 16, 16)
    from wattflow.data import Split
    train = Split(images.numpy(), np.arange(40) % 10)
    out = prune_checkpoint(tmp_path / "r.pt", tmp_path / "c.pt", 0.5, train, 0, 0.01, method="structured")
    reloaded, spec_after, _ = load_checkpoint(out.checkpoint, out.sha256)
    assert reloaded.fc.out_features == 10 and reloaded.fc.in_features < 32 and "structure" in spec_after
    assert reloaded(images[:2]).shape == (2, 10)


def test_the_registered_model_name_comes_from_the_data(folders):
    assert workload_for(cfg_for(folders / "rgb")).registered_model_name == "wattflow-rgb"
    assert workload_for(PipelineConfig()).registered_model_name == "wattflow-digits"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_imports_point_down_only():
    """flows -> tasks -> wattflow: the library never imports Prefect, and no task imports a flow."""
    library = {p.relative_to(ROOT).as_posix() for p in (ROOT / "wattflow").rglob("*.py") if "prefect" in imports_of(p)}
    tasks = {p.name for p in (ROOT / "tasks").glob("*.py") if "flows" in imports_of(p)}
    assert library == set() and tasks == set()


@pytest.mark.integration  # torchrun ranks
def test_ranks_find_data_named_by_a_relative_path(tmp_path, monkeypatch):
    """torchrun's ranks run in the launch's own directory: a recipe's relative data.path must still resolve."""
    from wattflow.distributed import launch_training

    write_digit_images(tmp_path / "images", mode="L", size=8, per_class=10)
    monkeypatch.chdir(tmp_path)
    cfg = PipelineConfig.model_validate({"data": {"dataset": "image-folder", "path": "images", "image_size": 8},
                                         "train": {"model": "mlp", "mlp_hidden": [8], "epochs": 1, "cpu_ranks": 1}})
    out = launch_training(cfg, tmp_path / "run", lambda _: None)
    assert load_checkpoint(out.checkpoint)[2]["input_shape"] == [1, 8, 8]
