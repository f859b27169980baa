"""Uncertainty of the figures: how far a measured value could be from the truth at 95% confidence.

    wilson(correct=348, n=360)   # (0.941, 0.982): the interval of a proportion (Wilson score interval)
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
