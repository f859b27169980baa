from pathlib import Path

import pytest

from wattflow.config import ConfigError, PipelineConfig, load_config, parse_config


def test_defaults_validate_and_round_trip():
    cfg = PipelineConfig()
    assert cfg.train.cpu_ranks == 2 and cfg.train.threads_per_rank == 1
    assert PipelineConfig.model_validate(cfg.model_dump()) == cfg


def test_yaml_recipe_overrides_only_what_it_names(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  epochs: 3\n  model: mlp\nchains:\n  - prune:0.5\n  - distill -> channels:0.5\n"
                      "  - steps: [{kind: prune, sparsity: 0.9}, {kind: quantize, backend: kmeans-4bit}]\n")
    cfg = load_config(recipe)
    assert (cfg.train.epochs, cfg.train.model) == (3, "mlp")
    assert [c.labels for c in cfg.chains] == [["prune-0.5"], ["distill", "channels-0.5"], ["prune-0.9", "kmeans-4bit"]]
    assert cfg.train.lr == PipelineConfig().train.lr


@pytest.mark.parametrize(("data", "field", "hint"), [
    ({"train": {"epochs": 0}}, "train.epochs", "greater than or equal to 1"),
    ({"train": {"cpu_ranks": 100}}, "train.cpu_ranks", "less than or equal to 64"),
    ({"chains": ["prune:1.5"]}, "chains.0.steps.0.prune.sparsity", "less than 1"),
    ({"chains": ["fp4"]}, "chains.0.steps.0.quantize.backend", "onnx-int8-static"),
    ({"chains": ["bf16 -> prune:0.5"]}, "chains.0.steps", "quantize step can only be the last"),
    ({"chains": ["prune:0.5 -> distill"]}, "chains.0.steps", "distill step can only be the first"),
    ({"train": {"mlp_hidden": [0]}}, "train.mlp_hidden", "[1, 4096]"),
    ({"train": {"epoch": 3}}, "train.epoch", "Extra inputs are not permitted"),
])
def test_invalid_values_name_the_field_and_the_allowed_range(data, field, hint):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert field in str(err.value) and hint in str(err.value)


def test_missing_or_non_mapping_recipe_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(bad)


def test_cli_refuses_a_bad_recipe_before_any_work(tmp_path, monkeypatch, capsys):
    from flows.pipeline import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"work_dir: {tmp_path}/artifacts\ntrain:\n  lr: -1\n")
    assert main(["--config", str(recipe)]) == 2
    out = capsys.readouterr().out
    assert "train.lr" in out and "greater than 0" in out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "artifacts").exists()


def test_shipped_recipes_validate():
    recipes = sorted(Path(__file__).parents[1].glob("deployments/recipes/*.yaml"))
    assert recipes
    for recipe in recipes:
        load_config(recipe)
