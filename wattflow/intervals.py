"""Uncertainty of the figures: how far a measured value could be from the truth at 95% confidence.

    wilson(correct=348, n=360)   # (0.941, 0.982): the interval of a proportion (Wilson score interval)
    median_interval([0.016, 0.015, 0.017, 0.016, 0.018])   # (0.016, (0.015, 0.017)): median of rounds
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% quantile of the normal distribution


def wilson(correct: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion correct / n: unlike the normal approximation it stays inside [0, 1]
    and is right for small n and proportions near 0 or 1 (Wilson 1927; Brown, Cai & DasGupta 2001)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, n={n}], got {correct}")
    p = correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0 and n the bounds are exactly 0 and 1; float rounding would leave them a hair inside.
    lo = 0.0 if correct == 0 else max(0.0, center - half)
    hi = 1.0 if correct == n else min(1.0, center + half)
    return lo, hi


def bounds(figure: str, pair: tuple[float, float] | None, scale: float = 1.0) -> dict[str, float]:
    """`{<figure>_lo, <figure>_hi}` of an interval (times `scale`), or nothing when it is unknown: the names every
    record of an interval uses (MLflow metrics, summary rows, selection)."""
    return {} if pair is None else {f"{figure}_lo": pair[0] * scale, f"{figure}_hi": pair[1] * scale}


BOOTSTRAP_RESAMPLES = 2000


def median_interval(values: list[float], level: float = 0.95, seed: int = 0
                    ) -> tuple[float, tuple[float, float] | None]:
    """(median, its `level` interval) of repeated measurements (rounds), the interval a percentile bootstrap of
    the median (seeded: the same rounds give the same interval); None with fewer than 2 values."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("median_interval needs at least one value")
    median = float(np.median(data))
    if data.size < 2:
        return median, None
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(data, size=(BOOTSTRAP_RESAMPLES, data.size), replace=True), axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(medians, [tail, 100 - tail])
    return median, (float(min(lo, median)), float(max(hi, median)))
