"""Carbon is a separate, explicit step: kWh x grid intensity x PUE, each input recorded by the caller."""

from __future__ import annotations

from wattflow.energy.units import J_PER_KWH, j_to_kwh

__all__ = ["J_PER_KWH", "carbon_g", "co2e_g", "j_to_kwh"]


def co2e_g(energy_j: float | None, intensity_g_per_kwh: float, pue: float) -> float | None:
    """Grams of CO2e for `energy_j` of IT energy: kWh x intensity x PUE. None (unknown) stays None."""
    if intensity_g_per_kwh < 0:
        raise ValueError(f"intensity_g_per_kwh must be >= 0, got {intensity_g_per_kwh}")
    if pue < 1.0:
        raise ValueError(f"pue must be >= 1, got {pue}")
    if energy_j is None:
        return None
    return j_to_kwh(energy_j) * intensity_g_per_kwh * pue


carbon_g = co2e_g  # the earlier name, kept for callers
