import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wattflow.intervals import wilson
from wattflow.stages import VariantFigures


def test_wilson_matches_the_published_values():
    # Brown, Cai & DasGupta (2001) / Newcombe (1998): 81 of 263 -> [0.2553, 0.3662]
    lo, hi = wilson(81, 263)
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0  # stays inside [0, 1]


@given(st.integers(1, 5000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_the_interval_holds_the_observed_proportion_and_narrows_with_n(case):
    k, n = case
    lo, hi = wilson(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    lo4, hi4 = wilson(4 * k, 4 * n)
    assert hi4 - lo4 < hi - lo or math.isclose(hi4 - lo4, hi - lo, abs_tol=1e-12)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="n must be positive"):
        wilson(0, 0)
    with pytest.raises(ValueError, match=r"correct must be in \[0, n=10\]"):
        wilson(11, 10)


def test_figures_log_the_accuracy_interval_for_classifiers_only():
    metrics = VariantFigures(scores={"accuracy": 0.975}, test_samples=360).mlflow_metrics()
    assert (metrics["accuracy_lo"], metrics["accuracy_hi"]) == pytest.approx(wilson(351, 360))
    lm = VariantFigures(scores={"accuracy": 0.6}, test_samples=360, tokens_per_sample=64).mlflow_metrics()
    assert "accuracy_lo" not in lm and "accuracy_hi" not in lm  # tokens of a window are not independent
