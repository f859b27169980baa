"""Carbon is a separate, explicit step: kWh x grid intensity x PUE, each input recorded by the caller."""

from __future__ import annotations

J_PER_KWH = 3.6e6


def carbon_g(energy_j: float | None, intensity_g_per_kwh: float, pue: float) -> float | None:
    """Grams of CO2e for `energy_j` of IT energy; None (unknown) stays None."""
    if intensity_g_per_kwh < 0:
        raise ValueError(f"intensity_g_per_kwh must be >= 0, got {intensity_g_per_kwh}")
    if pue < 1.0:
        raise ValueError(f"pue must be >= 1, got {pue}")
    if energy_j is None:
        return None
    return energy_j / J_PER_KWH * intensity_g_per_kwh * pue
