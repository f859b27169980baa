"""Choose the variant to ship: the Pareto front over four figures, and the champion under an accuracy budget.

    selection = select_champion(rows, accuracy_budget_points=0.5, objective="energy_per_1k_inferences_j")
    selection.champion, selection.reason, selection.comparison

`rows` are `wattflow.report.summary_rows` (plain dicts; the first row is the baseline, the trained model).
A figure may be the string "unknown" (e.g. no energy counter): it is never replaced by a number.
- Front: row `a` dominates row `b` when, axis by axis, both are known and `a` is at least as good, or both are
  unknown; and `a` is strictly better on at least one known axis. An unknown figure is thus neither better nor
  worse than a known one: a row can only be dominated by rows that are unknown on the same axes, so a row with
  an unknown figure tends to stay on the front (nothing shows it is beaten) rather than be dropped on a guess.
- Champion: among rows within the accuracy budget of the baseline (accuracy known) whose objective is known,
  the lowest objective, unless others are tied with it (below). Where no variant besides the baseline
  qualifies, the baseline is the champion, and `reason` says why.
- Noise: a row may carry a figure's 95% interval (`<figure>_lo`, `<figure>_hi`). Every eligible row that no
  eligible row beats beyond noise (its interval's low end is not above the lowest high end; such a row overlaps
  the lowest one's interval too) is tied with it, and the declared order `TIE_BREAK` picks among
  them (smaller deployable, higher accuracy, simpler chain, table order); the reason names the tied rows and
  the rule that chose. A row without an interval counts as its point value.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from wattflow.config import Objective, SelectConfig  # noqa: F401 (re-exported)
from wattflow.intervals import bounds

UNKNOWN = "unknown"  # as in wattflow.report (not imported: this module stays free of torch and the stages)


ENERGY_FIGURE = "energy_per_1k_inferences_j"
# Pareto axes: figure -> +1 when higher is better, -1 when lower is better.
AXES: dict[str, int] = {"accuracy": +1, "energy_per_1k_inferences_j": -1, "deployable_bytes": -1,
                        "latency_b1_ms": -1}
OBJECTIVE_UNITS = {"energy_per_1k_inferences_j": "J per 1k inferences", "deployable_bytes": "deployable bytes",
                   "latency_b1_ms": "ms at batch 1", "latency_b256_ms": "ms at batch 256"}
# Absolute slack on budget comparisons: accuracies are 4-significant-digit decimals, not exact binary floats.
_BUDGET_SLACK_POINTS = 1e-9
PRUNE_LABEL_PREFIXES = ("prune-", "channels-")  # chain labels of unstructured and structured prune steps


class Selection(BaseModel):
    model_config = ConfigDict(frozen=True)

    champion_index: int
    champion: str
    baseline: str
    objective: Objective
    accuracy_budget_points: float
    perplexity_budget_percent: float | None = None  # language models: the budget applied instead of accuracy
    in_budget: list[str]          # within budget, accuracy known (the baseline always is)
    front: list[str]              # Pareto-optimal rows, table order
    best_int8_only: str | None    # chain: train -> one int8 quantize step
    best_pruned_only: str | None  # chain: train -> prune steps only
    comparison: list[str]         # always shown: baseline, champion, best int8-only, best pruned-only
    reason: str


def known(value) -> bool:
    return value is not None and value != UNKNOWN


def _dominates(a: dict, b: dict) -> bool:
    strictly_better = False
    for axis, sign in AXES.items():
        va, vb = a.get(axis, UNKNOWN), b.get(axis, UNKNOWN)
        if not known(va) and not known(vb):
            continue  # unknown on both: this axis cannot separate them
        if not (known(va) and known(vb)):
            return False  # unknown vs known: nothing shows `a` is at least as good here
        if sign * (va - vb) < 0:
            return False
        strictly_better |= sign * (va - vb) > 0
    return strictly_better


def pareto_front(rows: list[dict]) -> list[int]:
    """Indices of the rows no other row dominates (see the module docstring for unknown figures)."""
    return [i for i, b in enumerate(rows) if not any(_dominates(a, b) for j, a in enumerate(rows) if j != i)]


def accuracy_drop_points(rows: list[dict], index: int) -> float | None:
    """Baseline accuracy minus this row's, in percentage points; None when unknown."""
    acc, base = rows[index].get("accuracy", UNKNOWN), rows[0].get("accuracy", UNKNOWN)
    return (base - acc) * 100.0 if known(acc) and known(base) else None


def perplexity_increase_percent(rows: list[dict], index: int) -> float | None:
    """This row's perplexity over the baseline's, as a percent increase; None when unknown."""
    ppl, base = rows[index].get("perplexity", UNKNOWN), rows[0].get("perplexity", UNKNOWN)
    return (ppl / base - 1.0) * 100.0 if known(ppl) and known(base) else None


def interval(row: dict, figure: str) -> tuple[float, float] | None:
    """(lo, hi) of a figure: its 95% interval when the row has one (`<figure>_lo`, `<figure>_hi`), else the point
    itself; None when the figure is unknown."""
    value = row.get(figure, UNKNOWN)
    if not known(value):
        return None
    lo, hi = row.get(f"{figure}_lo", UNKNOWN), row.get(f"{figure}_hi", UNKNOWN)
    return (lo, hi) if known(lo) and known(hi) else (value, value)


TIE_BREAK = ("smaller deployable", "higher accuracy", "simpler chain", "table order")


def _tie_key(row: dict, index: int) -> tuple:
    def low(value) -> tuple:  # unknown after every known value
        return (0, value) if known(value) else (1, 0.0)

    acc = row.get("accuracy", UNKNOWN)
    return (low(row.get("deployable_bytes", UNKNOWN)), low(-acc if known(acc) else UNKNOWN), len(_steps(row)), index)


def _tie_break_reason(rows: list[dict], champion: int, tied: list[int]) -> str:
    """The first rule of TIE_BREAK that separates the champion from the next row in the declared order."""
    ranked = sorted(tied, key=lambda i: _tie_key(rows[i], i))
    runner_up = ranked[1] if ranked[0] == champion else ranked[0]
    for rule, a, b in zip(TIE_BREAK, _tie_key(rows[champion], champion), _tie_key(rows[runner_up], runner_up),
                          strict=True):
        if a != b:
            return rule
    return TIE_BREAK[-1]


def _rank_key(row: dict, index: int, objective: str) -> tuple:
    def low(value) -> tuple:  # unknown after every known value
        return (0, value) if known(value) else (1, 0.0)

    acc = row.get("accuracy", UNKNOWN)
    return (low(row.get(objective, UNKNOWN)), low(-acc if known(acc) else UNKNOWN),
            low(row.get("deployable_bytes", UNKNOWN)), low(row.get("latency_b1_ms", UNKNOWN)), index)


def _steps(row: dict) -> list[str]:
    """The chain's step labels after the trained model ("train -> prune-0.8 -> bf16" -> [prune-0.8, bf16])."""
    labels = [s.strip() for s in str(row.get("chain", "")).split("->") if s.strip()]
    return labels[1:] if labels[:1] == ["train"] else labels


def is_int8_only(row: dict) -> bool:
    steps = _steps(row)
    return len(steps) == 1 and "int8" in steps[0]  # onnx-int8-*, int8-weights, torchao-int8-*


def is_pruned_only(row: dict) -> bool:
    steps = _steps(row)
    return bool(steps) and all(s.startswith(PRUNE_LABEL_PREFIXES) for s in steps)


def _best(rows: list[dict], candidates: list[int], in_budget: set[int], objective: str) -> int | None:
    """The one the champion rule would pick among `candidates`: in budget first, then by the same ranking."""
    if not candidates:
        return None
    return min(candidates, key=lambda i: (i not in in_budget, _rank_key(rows[i], i, objective)))


def select_champion(rows: list[dict], accuracy_budget_points: float = 0.5,
                    objective: Objective = "energy_per_1k_inferences_j",
                    perplexity_budget_percent: float | None = None) -> Selection:
    """The champion: lowest `objective` among the rows within `accuracy_budget_points` (absolute percentage
    points) of the baseline, rows[0] — or, given `perplexity_budget_percent` (language models), among the rows
    whose perplexity is at most that many percent above the baseline's; equal objectives prefer a
    Pareto-optimal row. For an objective that is a
    front axis the winner is on the front anyway (a row dominating an in-budget row is in budget, no worse);
    latency at batch 256 is not an axis, so the front cannot be a filter."""
    if not rows:
        raise ValueError("select_champion needs at least one row (the baseline, rows[0])")
    if objective not in OBJECTIVE_UNITS:
        raise ValueError(f"unknown objective {objective!r}; allowed: {', '.join(OBJECTIVE_UNITS)}")
    if not 0.0 <= accuracy_budget_points <= 100.0:
        raise ValueError(f"accuracy_budget_points must be in [0, 100] (percentage points); got "
                         f"{accuracy_budget_points}")
    if not known(rows[0].get("accuracy", UNKNOWN)):
        raise ValueError(f"the baseline {rows[0].get('variant')!r} has no known accuracy: the budget is "
                         "relative to it; evaluate the trained model first")
    names = [r["variant"] for r in rows]
    front = pareto_front(rows)
    if perplexity_budget_percent is not None:
        if not known(rows[0].get("perplexity", UNKNOWN)):
            raise ValueError(f"a perplexity budget needs the baseline's perplexity; {rows[0].get('variant')!r} has "
                             "none (is the workload a language model?)")
        in_budget = {i for i in range(len(rows)) if (d := perplexity_increase_percent(rows, i)) is not None
                     and d <= perplexity_budget_percent + _BUDGET_SLACK_POINTS}
    else:
        in_budget = {i for i in range(len(rows)) if (d := accuracy_drop_points(rows, i)) is not None
                     and d <= accuracy_budget_points + _BUDGET_SLACK_POINTS}
    eligible = [i for i in sorted(in_budget) if known(rows[i].get(objective, UNKNOWN))]
    on_front = set(front)
    best = min(eligible, key=lambda i: (rows[i][objective], i not in on_front, _rank_key(rows[i], i, objective))
               ) if eligible else 0
    # Within noise: every eligible row that no eligible row beats beyond noise (its interval's low end is not above
    # the lowest high end) is tied with the best, and the declared order decides among them (smaller deployable,
    # then higher accuracy, then a simpler chain). Overlapping the best alone is not enough: overlap is not
    # transitive, and a row tied with the best can still be beaten outright by another.
    lowest_hi = min((interval(rows[i], objective)[1] for i in eligible), default=None)
    tied = [i for i in eligible if interval(rows[i], objective)[0] <= lowest_hi]
    champion = min(tied, key=lambda i: _tie_key(rows[i], i)) if len(tied) > 1 else best
    reason = _reason(rows, champion, eligible, in_budget, objective, accuracy_budget_points, perplexity_budget_percent)
    if len(tied) > 1:
        others = [rows[i]["variant"] for i in tied if i != champion]
        reason += (f" Tied within noise on {objective} (95% intervals overlap) with {', '.join(others)}; chosen by "
                   f"{_tie_break_reason(rows, champion, tied)}.")
    best_int8 = _best(rows, [i for i, r in enumerate(rows) if is_int8_only(r)], in_budget, objective)
    best_pruned = _best(rows, [i for i, r in enumerate(rows) if is_pruned_only(r)], in_budget, objective)
    comparison = list(dict.fromkeys(names[i] for i in (0, champion, best_int8, best_pruned) if i is not None))
    return Selection(
        champion_index=champion, champion=names[champion], baseline=names[0], objective=objective,
        accuracy_budget_points=accuracy_budget_points, perplexity_budget_percent=perplexity_budget_percent,
        in_budget=[names[i] for i in sorted(in_budget)],
        front=[names[i] for i in front], best_int8_only=None if best_int8 is None else names[best_int8],
        best_pruned_only=None if best_pruned is None else names[best_pruned], comparison=comparison,
        reason=reason)


def exact_rows(rows: list[dict], figures: list) -> list[dict]:
    """`rows` with the selection's figures replaced by the unrounded ones from `evaluate_variant` (a
    `wattflow.stages.VariantFigures` each; the rows show 3-4 significant digits): the choice then matches what
    the MLflow metrics say, even at a tie or at the budget's edge. Unknown figures become "unknown"."""
    def exact(value: float | None, scale: float = 1.0):
        return UNKNOWN if value is None else value * scale

    return [{**r, **bounds("accuracy", f.accuracy_interval),
             **bounds("energy_per_1k_inferences_j", f.energy_per_1k_inferences_interval_j),
             **bounds("latency_b1_ms", f.latency_interval_s.get(1), 1e3),
             **bounds("latency_b256_ms", f.latency_interval_s.get(256), 1e3),
             "accuracy": exact(f.accuracy), "perplexity": exact(f.scores.get("perplexity")),
             "energy_per_1k_inferences_j": exact(f.energy_per_1k_inferences_j),
             "deployable_bytes": exact(f.deployable_bytes), "latency_b1_ms": exact(f.latency_s.get(1), 1e3),
             "latency_b256_ms": exact(f.latency_s.get(256), 1e3)} for r, f in zip(rows, figures, strict=True)]


def select_for(cfg, rows: list[dict], figures: list, budget_metric: str = "accuracy") -> Selection:
    """The champion under a pipeline configuration's `select` section, on the exact figures (the rows are rounded
    for display); `budget_metric` is the workload's ("perplexity" applies `select.perplexity_budget_percent`)."""
    s = cfg.select
    return select_champion(exact_rows(rows, figures), s.accuracy_budget_points, s.objective,
                           s.perplexity_budget_percent if budget_metric == "perplexity" else None)


def comparison_names(rows: list[dict], selection: Selection) -> list[str]:
    """Rows always kept in a comparison, in table order: baseline, champion, best int8-only, best pruned-only."""
    keep = set(selection.comparison)
    return [r["variant"] for r in rows if r["variant"] in keep]


def _reason(rows: list[dict], champion: int, eligible: list[int], in_budget: set[int], objective: str,
            budget: float, ppl_budget: float | None = None) -> str:
    unit = OBJECTIVE_UNITS[objective]
    base = rows[0]
    within = f"{budget:g} accuracy points" if ppl_budget is None else f"+{ppl_budget:g}% perplexity"
    if champion != 0:
        row = rows[champion]
        versus = (f"{_g(base[objective])} for the baseline" if known(base.get(objective, UNKNOWN))
                  else "unknown for the baseline")
        if ppl_budget is None:
            quality = (f"accuracy {_g(row['accuracy'])} vs {_g(base['accuracy'])}: "
                       f"{_signed_points(-accuracy_drop_points(rows, champion))}{_accuracy_interval(row)}")
        else:
            quality = (f"perplexity {_g(row['perplexity'])} vs {_g(base['perplexity'])}: "
                       f"{perplexity_increase_percent(rows, champion):+.2f}%")
        return (f"{row['variant']} has the lowest {objective} ({_g(row[objective])} {unit}; {versus}) among the "
                f"{len(eligible)} variant(s) within {within} of {base['variant']} ({quality}).")
    others_in_budget = sorted(in_budget - {0})
    if not others_in_budget:
        quality = (f"accuracy {_g(base['accuracy'])}" if ppl_budget is None
                   else f"perplexity {_g(base['perplexity'])}")
        return f"no variant is within {within} of {base['variant']} ({quality}), so the baseline stays the champion."
    if not eligible:
        return (f"{objective} is unknown for every variant within {within}, so nothing can "
                f"be shown to beat the baseline {base['variant']}; it stays the champion.")
    return (f"the baseline {base['variant']} has the lowest {objective} ({_g(base[objective])} {unit}) among the "
            f"{len(eligible)} variant(s) within {within}; no compressed "
            f"variant beats it.")


def _accuracy_interval(row: dict) -> str:
    """The champion's accuracy interval, so the budget's decision is read against what one test set can show."""
    lo, hi = row.get("accuracy_lo", UNKNOWN), row.get("accuracy_hi", UNKNOWN)
    return f"; its 95% interval {lo:.4g}-{hi:.4g}" if known(lo) and known(hi) else ""


def _signed_points(points: float) -> str:
    return "no loss" if abs(points) < 0.005 else f"{points:+.2f} points"


def _g(value) -> str:
    """4 significant digits for the report (the exact figures stay in MLflow)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
