"""The bad-input matrix: each bad input fails with its own error class and a message that names the cause
(the field, the file) and the fix, before expensive work where possible; a later stage's failure leaves its
MLflow run FAILED (never RUNNING) and the earlier stages' outputs in place."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from wattflow.config import ConfigError, PipelineConfig, parse_config
from wattflow.data import DataError, check_data
from wattflow.models import CheckpointError, build_model, default_spec, load_checkpoint, save_checkpoint, sha256_file

# ---------------------------------------------------------------------------------------------------------------
# Every config field: out of bounds and of the wrong type, generated from PipelineConfig's JSON schema, so a new
# field or section is covered the day it is added.

WRONG_TYPE: dict[str, tuple[Any, str]] = {  # JSON type -> (a value of another type, what the message says)
    "integer": ("twelve", "valid integer"), "number": ("fast", "valid number"),
    "string": (["a", "list"], "valid string"), "boolean": ("maybe", "valid boolean"),
    "array": ("not-a-list", "valid list"),
}


def number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def bound_violations(spec: dict, default: Any) -> list[tuple[Any, str]]:
    """(a value just outside each bound of `spec`, the range the message must state)."""
    is_int = spec.get("type") == "integer"
    step = 1 if is_int else 1.0
    out = []
    if "enum" in spec:  # a string outside the allowed values: the message lists them
        out.append(("not-one-of-them", f"'{spec['enum'][0]}'"))
    if "minimum" in spec:
        out.append((spec["minimum"] - step, f"greater than or equal to {number(spec['minimum'])}"))
    if "exclusiveMinimum" in spec:
        out.append((spec["exclusiveMinimum"], f"greater than {number(spec['exclusiveMinimum'])}"))
    if "maximum" in spec:
        out.append((spec["maximum"] + step, f"less than or equal to {number(spec['maximum'])}"))
    if "exclusiveMaximum" in spec:
        out.append((spec["exclusiveMaximum"], f"less than {number(spec['exclusiveMaximum'])}"))
    if "minLength" in spec:
        out.append(("x" * (spec["minLength"] - 1), f"at least {spec['minLength']} character"))
    if "maxLength" in spec:
        out.append(("x" * (spec["maxLength"] + 1), f"at most {spec['maxLength']} character"))
    if "minItems" in spec:
        out.append(([], f"at least {spec['minItems']} item"))
    if "maxItems" in spec and default:
        out.append(([default[0]] * (spec["maxItems"] + 1), f"at most {spec['maxItems']} item"))
    return out


def wrong_type(spec: dict) -> tuple[Any, str] | None:
    if "enum" in spec:
        return 12345, f"'{spec['enum'][0]}'"  # the message lists the allowed values
    return WRONG_TYPE.get(spec.get("type"))


def field_cases() -> list[tuple[str, str, dict, str, str]]:
    """(section, kind 'bounds'|'type', input, field path, expected fragment) for every schema field."""
    schema, defaults = PipelineConfig.model_json_schema(), PipelineConfig().model_dump()
    cases = []
    for section, prop in schema["properties"].items():
        if "$ref" in prop:
            fields = schema["$defs"][prop["$ref"].rsplit("/", 1)[-1]]["properties"]
            wrap = lambda name, value, s=section: {s: {name: value}}  # noqa: E731
            path, section_defaults = f"{section}.{{}}", defaults[section]
        else:
            fields, wrap, path, section_defaults = {section: prop}, lambda name, value: {name: value}, "{}", defaults
        for name, spec in fields.items():
            spec = next((b for b in spec.get("anyOf", []) if b.get("type") != "null"), spec)  # Optional[X] -> X
            for value, fragment in bound_violations(spec, section_defaults.get(name)):
                cases.append((section, "bounds", wrap(name, value), path.format(name), fragment))
            if (bad := wrong_type(spec)) is not None:
                cases.append((section, "type", wrap(name, bad[0]), path.format(name), bad[1]))
    return cases


FIELD_CASES = field_cases()


def test_every_section_has_an_out_of_bounds_and_a_wrong_type_case():
    sections = {s for s, p in PipelineConfig.model_json_schema()["properties"].items() if "$ref" in p}
    for kind in ("bounds", "type"):
        assert sections <= {s for s, k, *_ in FIELD_CASES if k == kind}, kind
    assert len(FIELD_CASES) > 80


@pytest.mark.parametrize(("section", "kind", "data", "field", "fragment"), FIELD_CASES,
                         ids=[f"{c[3]}-{c[1]}-{i}" for i, c in enumerate(FIELD_CASES)])
def test_a_bad_field_names_itself_and_its_allowed_range(section, kind, data, field, fragment):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    line = next((x for x in str(err.value).splitlines() if x.strip().startswith(f"{field}")), "")
    assert fragment in line, str(err.value)


@pytest.mark.parametrize(("data", "field", "fragment"), [
    ({"chains": ["fp4"]}, "chains.0.steps.0.quantize.backend", "'onnx-int8-static'"),  # unknown backend
    ({"chains": ["prune:1.5"]}, "chains.0.steps.0.prune.sparsity", "less than 1"),
    ({"chains": "bf16"}, "chains", "valid list"),
    ({"train": {"model": "vgg"}}, "train.model", "built-ins: cnn, gpt, mlp, resnet"),       # unknown model
    ({"train": {"model": {"factory": "no colon"}}}, "train.model", "pattern"),         # not an import path
    ({"trian": {"epochs": 1}}, "trian", "check its spelling (allowed: workload, experiment, work_dir, data, train"),
    ({"train": {"epoch": 3}}, "train.epoch", "(allowed: model, model_kwargs"),
    ({"data": {"dataset": "npz"}}, "data", "needs data.path"),
    ({"data": {"dataset": "image-folder"}}, "data", "needs data.path"),
    ({"data": {"path": "x.npz"}}, "data", "set one of those or remove path"),
    ({"data": {"dataset": "imagenet"}}, "data.dataset", "'digits', 'npz', 'image-folder' or 'text'"),
    ({"workload": "translation"}, "workload", "allowed: classification"),
])
def test_unknown_names_and_inconsistent_fields_say_what_is_allowed(data, field, fragment):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert field in str(err.value) and fragment in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# A dataset file of your own: checked by check_data before training.

def npz_config(path: Path, **data) -> PipelineConfig:
    return parse_config({"data": {"dataset": "npz", "path": str(path), **data}})


def write_npz(path: Path, n: int = 120, classes: int = 3, **arrays) -> Path:
    rng = np.random.default_rng(0)
    default = {"x": rng.random((n, 64), dtype=np.float32), "y": np.arange(n, dtype=np.int64) % classes}
    np.savez(path, **{**default, **arrays})
    return path


def test_a_good_npz_file_is_split_stratified_with_images_flattened(tmp_path):
    x = np.random.default_rng(1).random((90, 1, 8, 8), dtype=np.float32)
    splits = check_data(npz_config(write_npz(tmp_path / "ok.npz", x=x, y=np.arange(90) % 3)))
    assert splits.in_features == 64 and splits.num_classes == 3
    assert len(splits.train.y) + len(splits.val.y) + len(splits.test.y) == 90
    assert {int(c) for c in np.unique(splits.test.y)} == {0, 1, 2}


def npz_bytes(tmp_path: Path, name: str, content: bytes) -> Path:
    (tmp_path / name).write_bytes(content)
    return tmp_path / name


def bad_npz_cases():
    def missing(t):
        return t / "nope.npz"

    def empty(t):
        return npz_bytes(t, "empty.npz", b"")

    def garbage(t):
        return npz_bytes(t, "garbage.npz", b"definitely not a zip archive\x00\x01" * 10)

    def truncated(t):
        whole = write_npz(t / "whole.npz").read_bytes()
        return npz_bytes(t, "truncated.npz", whole[: len(whole) // 2])

    def not_npy_inside(t):
        with zipfile.ZipFile(t / "zip.npz", "w") as z:
            z.writestr("x.npy", b"not an npy array")
            z.writestr("y.npy", b"nor this")
        return t / "zip.npz"

    return [
        (missing, "does not exist", "point data.path at your .npz file"),
        (empty, "is empty (0 bytes)", "numpy.savez"),
        (garbage, "is not a readable .npz file", "numpy.savez"),
        (truncated, "is not a readable .npz file", "numpy.savez"),
        (not_npy_inside, "is not a readable .npz file", "numpy.savez"),
        (lambda t: write_npz(t / "keys.npz", labels=np.zeros(3)) and _drop_y(t / "keys.npz"), "lacks array(s) ['y']",
         "numpy.savez"),
        (lambda t: write_npz(t / "shape.npz", x=np.zeros((120, 8, 8), np.float32)), "x has shape [120, 8, 8]",
         "[N, C, H, W]"),
        (lambda t: write_npz(t / "ylen.npz", y=np.zeros(7, np.int64)), "y has shape [7] for 120 samples",
         "y: integer labels [N]"),
        (lambda t: write_npz(t / "yfloat.npz", y=np.zeros(120, np.float32)), "y has dtype float32",
         "integer labels"),
        (lambda t: write_npz(t / "xint.npz", x=np.zeros((120, 64), np.int64)), "x has dtype int64", "float32"),
        (lambda t: write_npz(t / "nan.npz", x=np.full((120, 64), np.nan, np.float32)), "NaN or infinite",
         "clean or drop"),
        (lambda t: write_npz(t / "neg.npz", y=np.arange(120) % 3 - 1), "negative labels", "0..classes-1"),
        (lambda t: write_npz(t / "obj.npz", x=np.array([{"a": 1}] * 120, dtype=object)), "not a readable .npz",
         "numpy.savez"),
        (lambda t: write_npz(t / "few.npz", y=np.r_[np.zeros(118, np.int64), [1, 1]]), "too few samples per class",
         "add samples or drop those classes"),
        (lambda t: write_npz(t / "one.npz", y=np.zeros(120, np.int64)), "1 class(es)", "at least 2"),
        (lambda t: write_npz(t / "tiny.npz", n=9, classes=3), "cannot split 9 samples of 3 classes",
         "add samples or raise the fractions"),
    ]


def _drop_y(path: Path) -> Path:
    arrays = dict(np.load(path))
    arrays.pop("y")
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(("make", "cause", "fix"), bad_npz_cases(),
                         ids=["missing", "empty", "garbage", "truncated", "not-npy", "no-y", "x-shape", "y-length",
                              "y-float", "x-int", "nan", "negative-label", "object-array", "few-per-class",
                              "one-class", "too-small-to-split"])
def test_a_bad_dataset_file_names_the_file_the_cause_and_the_fix(tmp_path, make, cause, fix):
    path = make(tmp_path)
    with pytest.raises(DataError) as err:
        check_data(npz_config(path))
    assert str(path) in str(err.value) and cause in str(err.value) and fix in str(err.value)


def test_augmenting_non_8x8_samples_is_refused(tmp_path):
    path = write_npz(tmp_path / "wide.npz", x=np.zeros((120, 10), np.float32) + 0.5)
    with pytest.raises(DataError, match="augment_factor=2 shifts 8x8 images.*set augment_factor: 1"):
        check_data(npz_config(path, augment_factor=2))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: truncated, corrupt, of another architecture.

@pytest.fixture
def mlp_checkpoint(tmp_path) -> Path:
    spec = default_spec("mlp", mlp_hidden=[16])
    path = tmp_path / "mlp.pt"
    save_checkpoint(path, build_model(spec), spec)
    return path


def test_a_truncated_checkpoint_names_the_file_and_says_retrain(mlp_checkpoint, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(mlp_checkpoint.read_bytes()[:700])
    with pytest.raises(CheckpointError, match=f"checkpoint {cut} is truncated or corrupt.*re-run training"):
        load_checkpoint(cut)


def test_a_corrupt_checkpoint_names_the_file_and_says_retrain(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match=f"checkpoint {junk} is .*corrupt.*re-run training"):
        load_checkpoint(junk)


def test_a_missing_checkpoint_and_a_foreign_payload_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*re-run training"):
        load_checkpoint(tmp_path / "gone.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="is not a wattflow checkpoint"):
        load_checkpoint(foreign)


def test_a_checkpoint_of_another_architecture_is_refused(mlp_checkpoint, tmp_path):
    cnn_spec = default_spec("cnn")
    with pytest.raises(CheckpointError, match=f"checkpoint {mlp_checkpoint} holds another architecture.*'cnn'"):
        load_checkpoint(mlp_checkpoint, expected_spec=cnn_spec)
    # weights of one shape under a spec of another: named, not a raw state_dict traceback
    payload = torch.load(mlp_checkpoint, weights_only=True)
    payload["spec"] = default_spec("mlp", mlp_hidden=[32])
    liar = tmp_path / "liar.pt"
    torch.save(payload, liar)
    with pytest.raises(CheckpointError, match="its weights do not fit its spec.*re-run training"):
        load_checkpoint(liar)


def test_a_changed_checkpoint_fails_its_sha256_check(mlp_checkpoint):
    sha = sha256_file(mlp_checkpoint)
    with open(mlp_checkpoint, "ab") as f:
        f.write(b"!")
    with pytest.raises(CheckpointError, match="changed since it was written.*re-run training"):
        load_checkpoint(mlp_checkpoint, expected_sha256=sha)


# (A GPU requested where none exists, a NaN loss: tests/test_elastic.py. A later stage failing inside the real
# flow, its run and the parent FAILED and training kept: tests/test_resume.py.)
