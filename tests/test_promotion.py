"""The promotion guard's decision, on summary rows with intervals (the flow re-evaluates the current champion
beside the new variants; tests/test_registry.py holds the MLflow side)."""

from wattflow.promotion import promotion_decision

E = "energy_per_1k_inferences_j"


def row(name, accuracy, energy, lo=None, hi=None):
    r = {"variant": name, "accuracy": accuracy, E: energy}
    if lo is not None:
        r[f"{E}_lo"], r[f"{E}_hi"] = lo, hi
    return r


def test_always_and_no_previous_champion_promote():
    new = row("onnx-int8-static", 0.97, 0.016, 0.015, 0.017)
    assert promotion_decision(new, row("old", 0.99, 0.001), E, "always") == (True, "select.promote is always")
    assert promotion_decision(new, None, E, "if-better")[0]


def test_a_tie_within_noise_at_equal_accuracy_promotes():
    ok, why = promotion_decision(row("new", 0.97, 0.016, 0.015, 0.017), row("old", 0.97, 0.0155, 0.0150, 0.0162),
                                 E, "if-better")
    assert ok and "not worse beyond noise than the current champion old" in why


def test_worse_beyond_noise_or_less_accurate_keeps_the_aliases():
    ok, why = promotion_decision(row("new", 0.97, 0.030, 0.028, 0.032), row("old", 0.97, 0.016, 0.015, 0.017),
                                 E, "if-better")
    assert not ok and "worse beyond noise on energy_per_1k_inferences_j (0.028-0.032)" in why
    assert "current champion old (0.015-0.017, re-evaluated in this run)" in why
    ok, why = promotion_decision(row("new", 0.96, 0.010), row("old", 0.97, 0.016), E, "if-better")
    assert not ok and "less accurate (0.96) than the current champion old (0.97" in why


def test_unknown_energy_cannot_show_the_new_champion_worse():
    ok, why = promotion_decision(row("new", 0.97, "unknown"), row("old", 0.97, 0.016), E, "if-better")
    assert ok and "unknown" in why
