"""Hypothesis properties of the meter and its records: non-negative energy, avg power = energy / duration,
nested windows within their parents, sums that add up, exact round trips and exact unit conversions."""

from __future__ import annotations

import json
import math
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from wattflow.energy import (
    DeviceEnergy,
    EnergyMeter,
    EnergyResult,
    co2e_g,
    combine_nodes,
    j_to_kwh,
    mj_to_j,
    uj_to_j,
)
from wattflow.energy.result import KINDS, TOTAL_KINDS

FAST = settings(max_examples=60, deadline=None, database=None)  # no .hypothesis/ left in the repo


class CounterBackend:
    """A fake backend over a monotone counter (J) that the test advances, one device per kind."""

    name, method = "counter", "simulated:counter"

    def __init__(self):
        self.counter_j = 0.0

    def snapshot(self) -> float:
        return self.counter_j

    def delta(self, start: float, end: float, duration_s: float) -> list[DeviceEnergy]:
        return [DeviceEnergy("gpu:0", end - start, self.method, kind="gpu"),
                DeviceEnergy("cpu:package-0", (end - start) / 4, self.method, kind="cpu")]


class ManualClock:
    def __init__(self):
        self.t_s = 0.0

    def __call__(self) -> float:
        return self.t_s


# ops: ("open", _) opens a window inside the innermost open one, ("close", _) closes it, ("tick", j) advances
# the counter by j joules and the clock by j / 7 s.
OPS = st.lists(st.tuples(st.sampled_from(["open", "close", "tick"]),
                         st.floats(0, 1e6, allow_nan=False)), max_size=40)


@FAST
@given(OPS)
def test_nested_windows_never_exceed_their_parent(ops):
    backend, clock = CounterBackend(), ManualClock()
    meter = EnergyMeter([backend], clock=clock)
    stack, parent_of, windows = [], {}, []
    for op, amount in [("open", 0.0), *ops]:
        if op == "open":
            cm = meter.window(f"w{len(windows)}")
            w = cm.__enter__()
            parent_of[len(windows)] = stack[-1][0] if stack else None
            windows.append(w)
            stack.append((len(windows) - 1, cm))
        elif op == "close" and len(stack) > 1:
            stack.pop()[1].__exit__(None, None, None)
        elif op == "tick":
            backend.counter_j += amount
            clock.t_s += amount / 7
            for i, _ in stack:   # an open window's reading so far is also sound
                assert windows[i].read().energy_j >= 0
    while stack:
        stack.pop()[1].__exit__(None, None, None)
    for child, parent in parent_of.items():
        r = windows[child].result
        assert r.energy_j >= 0 and r.duration_s >= 0
        if parent is not None:
            p = windows[parent].result
            assert r.energy_j <= p.energy_j and r.duration_s <= p.duration_s
            for kind, joules in r.energy_by_kind().items():
                assert (joules or 0.0) <= (p.energy_by_kind()[kind] or 0.0)


ENERGY = st.floats(0, 1e9, allow_nan=False, allow_infinity=False)
DEVICE = st.builds(
    lambda label, kind, energy_j, flags, index, note: DeviceEnergy(
        label, energy_j, "unavailable" if energy_j is None else "measured:x", note, kind, index, label, flags),
    st.text(min_size=1, max_size=12), st.sampled_from(KINDS), st.none() | ENERGY,
    st.lists(st.sampled_from(["below_resolution", "counter_reset", "contended"]), max_size=3).map(tuple),
    st.none() | st.integers(0, 15), st.text(max_size=20))
RESULT = st.builds(EnergyResult, st.text(max_size=12), st.floats(0, 1e7, allow_nan=False),
                   st.lists(DEVICE, max_size=6).map(tuple), st.text(alphabet="abcxyz-.", min_size=1, max_size=8))


@FAST
@given(RESULT)
def test_sums_power_and_round_trip(r):
    known = [d.energy_j for d in r.devices if d.energy_j is not None]
    assert r.energy_j == (math.fsum(known) if known else None)
    assert r.energy_j is None or r.energy_j >= 0
    if r.energy_j is not None and r.duration_s > 0:
        assert r.avg_power_w == r.energy_j / r.duration_s
    for d in r.devices:
        assert d.duration_s == r.duration_s
        if d.energy_j is not None and d.duration_s > 0:
            assert d.avg_power_w == d.energy_j / d.duration_s
    by_kind = r.energy_by_kind()
    assert set(TOTAL_KINDS) <= set(by_kind)
    kind_sum = math.fsum(v for v in by_kind.values() if v is not None)
    assert math.isclose(kind_sum, r.energy_j or 0.0, rel_tol=1e-12, abs_tol=1e-9)
    assert set(r.flags) == {f for d in r.devices for f in d.flags}
    d = r.to_dict()
    assert EnergyResult.from_dict(json.loads(json.dumps(d))) == r
    assert d["energy_by_kind_j"] == by_kind and d["scope"] == r.scope


@FAST
@given(st.lists(RESULT, min_size=1, max_size=4, unique_by=lambda r: r.node))
def test_combine_nodes_sums_each_node_once(results):
    job = combine_nodes("job", results)
    assert len(job.devices) == sum(len(r.devices) for r in results)
    assert job.duration_s == max(r.duration_s for r in results)
    known = [r.energy_j for r in results if r.energy_j is not None]
    assert math.isclose(job.energy_j or 0.0, math.fsum(known), rel_tol=1e-12, abs_tol=1e-9)


@settings(database=None)
@given(st.integers(-10**15, 10**15))
def test_mj_and_uj_to_j_are_exact(n):
    assert mj_to_j(n) == float(Fraction(n, 1000))
    assert uj_to_j(n) == float(Fraction(n, 1_000_000))


@settings(database=None)
@given(ENERGY, st.floats(0, 2000), st.floats(1, 3))
def test_j_to_kwh_is_exact_and_co2e_follows(energy_j, intensity, pue):
    assert j_to_kwh(energy_j) == float(Fraction(energy_j) / 3_600_000)
    assert co2e_g(energy_j, intensity, pue) == j_to_kwh(energy_j) * intensity * pue
    assert j_to_kwh(3.6e6 * round(energy_j % 1000)) == round(energy_j % 1000)
