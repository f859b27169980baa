"""Unit conversions, each a single correctly rounded division (so they are exact to the last bit)."""

from __future__ import annotations

J_PER_KWH = 3.6e6  # exactly representable, so j / J_PER_KWH is correctly rounded


def mj_to_j(mj: float) -> float:
    """Millijoules (NVML's energy counter) to joules."""
    return mj / 1000


def uj_to_j(uj: float) -> float:
    """Microjoules (RAPL's energy_uj) to joules."""
    return uj / 1_000_000


def j_to_kwh(j: float) -> float:
    return j / J_PER_KWH
