import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from per_run import examples
from pydantic import ValidationError

from wattflow.config import PipelineConfig
from wattflow.select import (
    SelectConfig,
    comparison_names,
    exact_rows,
    pareto_front,
    select_champion,
)
from wattflow.stages import VariantFigures
from wattflow.workloads import workload_for

U = "unknown"


def row(name: str, accuracy, energy=0.05, deploy=40_000, b1=0.05, chain: str | None = None, b256=1.0) -> dict:
    return {"variant": name, "chain": chain or f"train -> {name}", "accuracy": accuracy,
            "energy_per_1k_inferences_j": energy, "deployable_bytes": deploy, "latency_b1_ms": b1,
            "latency_b256_ms": b256}


def baseline(accuracy=0.97, energy=0.07, deploy=130_000, b1=0.09) -> dict:
    return row("train", accuracy, energy, deploy, b1, chain="train")


# --- properties -----------------------------------------------------------------------------------------

figure = st.one_of(st.integers(1, 20).map(lambda k: k / 100), st.just(U))  # coarse grid: ties happen
accuracy = st.integers(85, 100).map(lambda k: k / 100)


@st.composite
def tables(draw, min_variants=0):
    n = draw(st.integers(min_variants, 7))
    rows = [baseline(draw(accuracy), draw(figure), draw(st.integers(1, 9)) * 1000, draw(figure))]
    for i in range(n):
        rows.append(row(f"v{i}", draw(st.one_of(accuracy, st.just(U))), draw(figure),
                        draw(st.one_of(st.integers(1, 9).map(lambda k: k * 1000), st.just(U))), draw(figure)))
    return rows


budgets = st.sampled_from([0.0, 0.5, 1.0, 3.0, 10.0])


@settings(max_examples=examples(300), deadline=None)
@given(tables(), budgets)
def test_champion_is_on_the_front_and_within_budget_or_the_baseline(rows, budget):
    sel = select_champion(rows, budget)
    champ = rows[sel.champion_index]
    assert sel.champion == champ["variant"] and sel.baseline == "train"
    if sel.champion_index != 0:
        assert sel.champion in sel.front and sel.champion in sel.in_budget
        assert (rows[0]["accuracy"] - champ["accuracy"]) * 100 <= budget + 1e-9
        # lowest objective among every in-budget row whose objective is known
        known_in_budget = [r["energy_per_1k_inferences_j"] for r in rows
                           if r["variant"] in sel.in_budget and r["energy_per_1k_inferences_j"] != U]
        assert champ["energy_per_1k_inferences_j"] == min(known_in_budget)
    assert sel.reason


@settings(max_examples=examples(300), deadline=None)
@given(tables(min_variants=1), budgets, st.data())
def test_adding_a_dominated_variant_never_changes_the_champion(rows, budget, data):
    before = select_champion(rows, budget)
    dominator = rows[data.draw(st.integers(0, len(rows) - 1))]
    # Worse or equal on every known axis, strictly worse on accuracy, unknown exactly where the dominator is.
    worse = {k: (v if v == U else v * data.draw(st.sampled_from([1, 1.5, 3]))) for k, v in dominator.items()
             if k in ("energy_per_1k_inferences_j", "deployable_bytes", "latency_b1_ms")}
    acc = dominator["accuracy"]
    extra = row("dominated", U if acc == U else acc - 0.01, **{
        "energy": worse["energy_per_1k_inferences_j"], "deploy": worse["deployable_bytes"],
        "b1": worse["latency_b1_ms"]})
    if acc == U and all(v == U for v in worse.values()):
        return  # all unknown: indistinguishable from its "dominator", not dominated
    if acc == U and all(extra[k] == dominator[k] for k in worse):
        return  # equal on every known axis: not strictly worse
    after = select_champion([*rows, extra], budget)
    assert "dominated" not in after.front
    assert after.champion == before.champion and after.front == before.front


@settings(max_examples=examples(200), deadline=None)
@given(tables(), st.data())
def test_with_nothing_in_budget_the_baseline_wins(rows, data):
    base = rows[0]["accuracy"]
    lossy = [row(r["variant"], U if r["accuracy"] == U else base - data.draw(st.integers(1, 10)) / 100,
                 r["energy_per_1k_inferences_j"], r["deployable_bytes"], r["latency_b1_ms"]) for r in rows[1:]]
    sel = select_champion([rows[0], *lossy], accuracy_budget_points=0.5)  # every known drop >= 1 point
    assert sel.champion == "train" and sel.in_budget == ["train"]
    assert "no variant is within 0.5 accuracy points" in sel.reason


# --- plain cases ----------------------------------------------------------------------------------------

def test_lowest_energy_within_budget_wins_and_the_reason_says_so():
    rows = [baseline(0.9722), row("prune-0.8", 0.9722, 0.065), row("onnx-int8-static", 0.9694, 0.0157),
            row("kmeans-4bit", 0.90, 0.001)]  # cheapest, but 7 points less accurate
    sel = select_champion(rows, 0.5)
    assert sel.champion == "onnx-int8-static" and "kmeans-4bit" not in sel.in_budget
    assert "onnx-int8-static has the lowest energy_per_1k_inferences_j (0.0157" in sel.reason
    assert "-0.28 points" in sel.reason
    assert select_champion(rows, 10.0).champion == "kmeans-4bit"
    assert select_champion(rows, 0.5, objective="deployable_bytes").champion == "prune-0.8"  # ties -> accuracy


def test_budget_is_in_absolute_points_with_the_edge_included():
    rows = [baseline(0.97), row("a", 0.965, 0.01)]  # exactly 0.5 points below
    assert select_champion(rows, 0.5).champion == "a"
    assert select_champion(rows, 0.49).champion == "train"


def test_unknown_energy_is_never_ranked_as_zero_and_never_dominated_by_known():
    rows = [baseline(0.97, energy=0.07), row("bf16", 0.97, energy=U, deploy=50_000, b1=0.2),
            row("int8", 0.97, energy=0.01, deploy=40_000, b1=0.02)]
    # int8 beats bf16 on every known axis, but bf16's energy is unknown: it stays on the front (train does not).
    assert pareto_front(rows) == [1, 2]
    assert select_champion(rows).champion == "int8"
    only_unknown = [baseline(0.97, energy=U), row("bf16", 0.97, energy=U)]
    sel = select_champion(only_unknown)
    assert sel.champion == "train" and "unknown for every variant" in sel.reason


def test_unknown_accuracy_is_never_within_budget():
    sel = select_champion([baseline(0.97), row("x", U, energy=0.001)])
    assert sel.in_budget == ["train"] and sel.champion == "train"


def test_a_baseline_that_stays_best_is_explained():
    sel = select_champion([baseline(0.97, energy=0.01), row("prune-0.8", 0.97, energy=0.02)])
    assert sel.champion == "train" and "no compressed variant beats it" in sel.reason


def test_comparison_keeps_baseline_best_int8_only_and_best_pruned_only():
    rows = [baseline(0.97),
            row("prune-0.8", 0.968, 0.060), row("prune-0.9", 0.969, 0.050),
            row("channels-0.5", 0.90, 0.010),                                   # pruned-only, out of budget
            row("onnx-int8-static", 0.97, 0.016), row("int8-weights", 0.97, 0.030),
            row("bf16", 0.97, 0.080),                                           # quantized, not int8
            row("prune-0.8+onnx-int8-static", 0.969, 0.015, chain="train -> prune-0.8 -> onnx-int8-static")]
    sel = select_champion(rows)
    assert sel.champion == "prune-0.8+onnx-int8-static"
    assert sel.best_int8_only == "onnx-int8-static" and sel.best_pruned_only == "prune-0.9"
    assert comparison_names(rows, sel) == ["train", "prune-0.9", "onnx-int8-static", "prune-0.8+onnx-int8-static"]
    none = select_champion([baseline(), row("bf16", 0.97, 0.01)])
    assert none.best_int8_only is None and none.best_pruned_only is None and none.comparison == ["train", "bf16"]


def test_bad_inputs_name_the_cause():
    with pytest.raises(ValueError, match="baseline 'train' has no known accuracy"):
        select_champion([baseline(U)])
    with pytest.raises(ValueError, match="unknown objective 'watts'"):
        select_champion([baseline()], objective="watts")
    with pytest.raises(ValueError, match=r"accuracy_budget_points must be in \[0, 100\]"):
        select_champion([baseline()], -1)


def test_select_config_bounds_and_defaults():
    cfg = SelectConfig()
    assert (cfg.model_name, cfg.accuracy_budget_points, cfg.objective) == (None, 0.5, "energy_per_1k_inferences_j")
    # unset, the name comes from the workload's data: one registered model per dataset
    assert workload_for(PipelineConfig()).registered_model_name == "wattflow-digits"
    for bad in ({"accuracy_budget_points": 101}, {"objective": "co2"}, {"model_nme": "x"}):
        with pytest.raises(ValidationError):
            SelectConfig(**bad)
    schema = SelectConfig.model_json_schema()["properties"]
    assert "percentage points" in schema["accuracy_budget_points"]["description"]
    assert set(schema["objective"]["enum"]) == {"energy_per_1k_inferences_j", "deployable_bytes",
                                                 "latency_b1_ms", "latency_b256_ms"}


def test_exact_rows_decide_what_rounding_would_tie():
    rows = [baseline(0.9722, energy=0.07), row("a", 0.9722, energy=0.0157), row("b", 0.9722, energy=0.0157)]
    figures = [VariantFigures(scores={"accuracy": 0.97222}, energy_per_1k_inferences_j=0.0701,
                              deployable_bytes=130_000, latency_s={1: 9e-5, 256: 4e-3}),
               VariantFigures(scores={"accuracy": 0.97222}, energy_per_1k_inferences_j=0.015712,
                              deployable_bytes=40_000, latency_s={1: 5e-5}),  # no b256 timing
               VariantFigures(scores={"accuracy": 0.97222}, energy_per_1k_inferences_j=0.015688,
                              deployable_bytes=40_000, latency_s={1: 5e-5, 256: 1e-3})]
    assert select_champion(rows).champion == "a"  # rounded: a tie, table order decides
    exact = exact_rows(rows, figures)
    assert select_champion(exact).champion == "b"
    assert exact[1]["latency_b256_ms"] == "unknown" and exact[2]["latency_b256_ms"] == 1.0
    assert exact[0]["variant"] == "train" and exact[0]["chain"] == "train"


def test_an_objective_off_the_front_axes_still_wins_within_budget():
    # `a` dominates `b` on the four front axes, but `b` is 4x faster at batch 256, the chosen objective.
    rows = [{**baseline(), "latency_b256_ms": 100.0}, row("a", 0.97, energy=0.01, deploy=10_000, b1=0.01, b256=40.0),
            row("b", 0.97, energy=0.02, deploy=20_000, b1=0.02, b256=10.0)]
    assert select_champion(rows, 0.5, "latency_b256_ms").champion == "b"
    assert select_champion(rows, 0.5).champion == "a"


# --- noise: intervals ------------------------------------------------------------------------------------

@st.composite
def noisy_tables(draw):
    """Tables whose energies carry 95% intervals of random half-widths (some rows without one)."""
    rows = draw(tables(min_variants=1))
    for r in rows:
        e = r["energy_per_1k_inferences_j"]
        if e != U and draw(st.booleans()):
            half = draw(st.sampled_from([0.0, 0.005, 0.01, 0.03]))
            r["energy_per_1k_inferences_j_lo"], r["energy_per_1k_inferences_j_hi"] = e - half, e + half
    return rows


def bounds(r: dict) -> tuple[float, float]:
    e = r["energy_per_1k_inferences_j"]
    return r.get("energy_per_1k_inferences_j_lo", e), r.get("energy_per_1k_inferences_j_hi", e)


@settings(max_examples=examples(300), deadline=None)
@given(noisy_tables(), budgets)
def test_a_champion_is_never_beaten_beyond_noise_by_an_in_budget_variant(rows, budget):
    sel = select_champion(rows, budget)
    champ = rows[sel.champion_index]
    if champ["energy_per_1k_inferences_j"] == U:
        return  # the baseline by default: nothing known to compare
    for r in rows:
        if r["variant"] in sel.in_budget and r["energy_per_1k_inferences_j"] != U:
            assert not bounds(r)[1] < bounds(champ)[0], (r["variant"], sel.reason)


@settings(max_examples=examples(300), deadline=None)
@given(noisy_tables(), budgets, st.data())
def test_a_variant_tied_on_every_axis_changes_the_champion_only_when_the_tie_break_prefers_it(rows, budget, data):
    before = select_champion(rows, budget)
    champ = rows[before.champion_index]
    if before.champion_index == 0 or champ["deployable_bytes"] == U:
        return
    bigger = data.draw(st.booleans())  # the twin is larger (never preferred) or smaller (always preferred)
    twin = {**champ, "variant": "twin", "chain": champ["chain"],
            "deployable_bytes": champ["deployable_bytes"] + (1000 if bigger else -500)}
    after = select_champion([*rows, twin], budget)
    assert after.champion == (before.champion if bigger else "twin"), after.reason
    if not bigger:
        assert "Tied within noise" in after.reason and "chosen by smaller deployable" in after.reason


def test_overlapping_intervals_are_a_tie_broken_by_the_declared_order():
    rows = [baseline(0.9722, 0.06),
            {**row("onnx-int8-static", 0.9722, 0.0157, deploy=42_000), "energy_per_1k_inferences_j_lo": 0.0150,
             "energy_per_1k_inferences_j_hi": 0.0165},
            {**row("prune-0.8+onnx-int8-static", 0.9722, 0.0156, deploy=12_000,
                   chain="train -> prune-0.8 -> onnx-int8-static"),
             "energy_per_1k_inferences_j_lo": 0.0149, "energy_per_1k_inferences_j_hi": 0.0166}]
    sel = select_champion(rows)
    assert sel.champion == "prune-0.8+onnx-int8-static"  # lowest point and smaller: wins either way
    rows[2]["deployable_bytes"] = 90_000  # now larger: the tie goes to the smaller onnx-int8-static
    sel = select_champion(rows)
    assert sel.champion == "onnx-int8-static"
    assert "Tied within noise on energy_per_1k_inferences_j (95% intervals overlap) with " \
           "prune-0.8+onnx-int8-static; chosen by smaller deployable" in sel.reason
    rows[1]["energy_per_1k_inferences_j_hi"] = rows[1]["energy_per_1k_inferences_j_lo"] = 0.0157
    rows[2]["energy_per_1k_inferences_j_hi"] = 0.01561  # disjoint now: the lower one wins on the figure
    rows[2]["energy_per_1k_inferences_j_lo"] = 0.0155
    assert select_champion(rows).champion == "prune-0.8+onnx-int8-static"


def test_a_row_tied_with_the_best_but_beaten_outright_by_another_is_not_a_candidate():
    # Overlap is not transitive (found by the property above): the baseline's 0.05 overlaps v1's [0.03, 0.05],
    # but v3's exact 0.04 beats it beyond noise, so the baseline's smaller deployable must not win the tie.
    rows = [baseline(0.85, 0.05, deploy=1_000),
            {**row("v1", 0.85, 0.04, deploy=50_000), "energy_per_1k_inferences_j_lo": 0.03,
             "energy_per_1k_inferences_j_hi": 0.05},
            row("v3", 0.85, 0.04, deploy=60_000)]
    sel = select_champion(rows, 0.0)
    assert sel.champion == "v1"   # tied with v3 (both reach 0.04), and smaller
    assert "with v3" in sel.reason and "train" not in sel.reason.split("Tied")[1]
