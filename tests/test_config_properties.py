"""Properties of configuration parsing and the recipe loader: whatever the input, the outcome is a valid
config that round-trips, or a ConfigError, never another exception."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from per_run import examples

from wattflow.config import ConfigError, PipelineConfig, load_config, parse_config

SETTINGS = settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=20)
junk_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)

SECTIONS = ["data", "train", "prune", "quantize", "distill", "eval", "energy"]
CHAIN_TOKENS = ["prune:0.5", "channels:0.3", "distill", "bf16", "onnx-int8-static", "kmeans-4bit", "int8-weights"]


@st.composite
def plausible_configs(draw) -> dict:
    """Mostly-valid recipes: real section and field names with values near and across their bounds."""
    defaults = PipelineConfig().model_dump()
    data: dict = {}
    for section in draw(st.lists(st.sampled_from(SECTIONS), unique=True, max_size=4)):
        fields = list(defaults[section])
        chosen = draw(st.lists(st.sampled_from(fields), unique=True, max_size=3))
        data[section] = {f: draw(near(defaults[section][f])) for f in chosen}
    if draw(st.booleans()):
        data["chains"] = [" -> ".join(draw(st.lists(st.sampled_from(CHAIN_TOKENS), min_size=1, max_size=3)))
                          for _ in range(draw(st.integers(1, 3)))]
    return data


def near(default):
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(-2, max(4, 2 * default))
    if isinstance(default, float):
        return st.floats(-1.0, max(2.0, 2 * default), allow_nan=False)
    if isinstance(default, list) and default and isinstance(default[0], int):
        return st.lists(st.integers(0, 300), max_size=5)
    return st.just(default)


@SETTINGS
@given(plausible_configs())
def test_any_accepted_config_round_trips(data):
    try:
        cfg = parse_config(data)
    except ConfigError as err:
        assert str(err).startswith("invalid configuration:")
        return
    assert parse_config(cfg.model_dump()) == cfg
    assert parse_config(yaml.safe_load(yaml.safe_dump(cfg.model_dump()))) == cfg  # and through a YAML recipe


SEGMENT = r"""(?:[\w-]+|'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""  # a key, or its repr when it is not a plain word
FIELD_LINE = re.compile(rf"^  (\(root\)|{SEGMENT}(?:\.{SEGMENT})*): \S")  # "  train.epochs: Input should be ..."


def explained(err: ConfigError) -> bool:
    """A refusal says what is wrong: each invalid field by its dotted path, or the shape of the whole."""
    text = str(err)
    if text.startswith("invalid configuration:\n"):
        lines = text.splitlines()[1:]
        return bool(lines) and all(FIELD_LINE.match(line) or line.startswith("    ") for line in lines)
    return text.startswith(("a configuration must be a mapping of sections", "recipe "))


def outcome(parse, data):
    """The parsed config, or the ConfigError it raised (any other exception fails the test)."""
    try:
        return parse(data)
    except ConfigError as err:
        return err


def accepted_or_explained(result) -> bool:
    return isinstance(result, PipelineConfig) or (isinstance(result, ConfigError) and explained(result))


@SETTINGS
@given(st.dictionaries(st.sampled_from(SECTIONS + ["chains", "experiment", "bogus"]) | st.text(max_size=8),
                       junk_values, max_size=5))
def test_junk_dicts_parse_or_raise_a_config_error_naming_the_fields(data):
    assert accepted_or_explained(outcome(parse_config, data))


@SETTINGS
@given(junk_values)
def test_junk_of_any_shape_parses_or_raises_a_config_error_naming_the_fields(data):
    assert accepted_or_explained(outcome(parse_config, data))


def load_text(content: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_bytes(content)
        return outcome(load_config, path)


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_as_a_recipe_load_or_raise_a_config_error_that_explains(content):
    assert accepted_or_explained(load_text(content))


yaml_ish = st.text(alphabet=st.sampled_from(list("abcdefgtrain:epochs- []{}0123456789.,'\"&*!|>\n #")), max_size=120)


@SETTINGS
@given(yaml_ish)
def test_random_yaml_text_loads_or_raises_a_config_error_that_explains(text):
    assert accepted_or_explained(load_text(text.encode()))


def test_the_explanation_check_itself_refuses_an_unexplained_error():
    assert not explained(ConfigError("something went wrong"))
    assert explained(outcome(parse_config, {"train": {"epochs": -1}}))


@SETTINGS
@given(plausible_configs())
def test_a_dumped_recipe_loads_back_to_the_same_config(data):
    try:
        cfg = parse_config(data)
    except ConfigError:
        return
    assert load_text(yaml.safe_dump(cfg.model_dump()).encode()) == cfg
