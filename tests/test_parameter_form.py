"""The Prefect UI renders the flow's parameter (`PipelineConfig`) as a form from its JSON schema: every
field documented, bounds as minimum/maximum, Literal choices as drop-downs; the same schema rejects
out-of-range values before a run starts."""

from __future__ import annotations

from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import is_valid

from flows.pipeline import pipeline
from wattflow.config import PipelineConfig


def form() -> dict:
    return parameter_schema(pipeline).model_dump()


def test_every_field_of_every_section_is_documented():
    schema = form()
    assert schema["properties"]["config"]["$ref"] == "#/definitions/PipelineConfig"
    assert "recipe" in schema["properties"]["config"].get("description", "").lower()
    undocumented = [f"{name}.{field}" for name, section in schema["definitions"].items()
                    for field, prop in section.get("properties", {}).items()
                    if field != "kind" and not prop.get("description")]
    assert undocumented == []


def test_bounds_and_choices_render_as_limits_and_drop_downs():
    d = form()["definitions"]
    epochs = d["TrainConfig"]["properties"]["epochs"]
    assert (epochs["minimum"], epochs["maximum"]) == (1, 1000)
    model = d["TrainConfig"]["properties"]["model"]  # a built-in's name or a factory by import path
    assert {"string", "object"} <= {v.get("type", "object") for v in model["anyOf"]}
    assert [v["enum"] for v in d["DataConfig"]["properties"]["dataset"]["anyOf"] if "enum" in v] == [
        ["digits", "npz", "image-folder", "text"]]
    assert "fake-nvml" in d["EnergyConfig"]["properties"]["backend"]["enum"]
    assert d["TrainConfig"]["properties"]["lr"]["exclusiveMinimum"] == 0.0


def test_the_form_schema_refuses_what_the_config_refuses():
    schema = form()
    good = {"config": PipelineConfig().model_dump(mode="json")}
    assert is_valid(good, schema)
    bad = {"config": {**good["config"], "train": {**good["config"]["train"], "epochs": 0}}}
    assert not is_valid(bad, schema)
