"""What the parent run shows: the Pareto plot (PNG), the comparison table (CSV) and the markdown report.

    pareto_png(rows, selection, "out/pareto.png")
    comparison_csv(rows, selection, "out/variants.csv")
    markdown_report({"model": "cnn", ...}, rows, selection, [variant.energy, ...], "http://127.0.0.1:5000/#/...")

`rows` are `wattflow.report.summary_rows`, `selection` is `wattflow.select.select_champion(rows)`. Unknown
figures ("unknown") are listed as such, never plotted at 0.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from wattflow.select import OBJECTIVE_UNITS, Selection, known

ENERGY = "energy_per_1k_inferences_j"
# Marker area (points²) for the largest deployable artifact; others scale by bytes (area ∝ bytes).
MAX_MARKER_AREA_PT2 = 900.0
MIN_MARKER_AREA_PT2 = 25.0


def _methods(rows: list[dict]) -> str:
    return ", ".join(sorted({str(r.get("inference_energy_method", "unknown")) for r in rows}))


def _error_bar(row: dict, figure: str) -> list[list[float]] | None:
    lo, hi = row.get(f"{figure}_lo"), row.get(f"{figure}_hi")
    if not (known(lo) and known(hi)):
        return None
    return [[max(0.0, row[figure] - lo)], [max(0.0, hi - row[figure])]]


def pareto_png(rows: list[dict], selection: Selection, path: str | Path) -> Path:
    """`pareto_figure` written as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pareto_figure(rows, selection).savefig(path)
    return path


def pareto_figure(rows: list[dict], selection: Selection) -> Figure:
    """Accuracy vs energy per 1k inferences; marker area by deployable bytes; Pareto front filled, others
    hollow; the champion starred; 95% intervals as error bars. Rows with an unknown energy or accuracy are named
    in a note instead."""
    plotted = [r for r in rows if known(r.get(ENERGY)) and known(r.get("accuracy"))]
    missing = [r["variant"] for r in rows if r not in plotted]
    max_bytes = max((r["deployable_bytes"] for r in plotted if known(r.get("deployable_bytes"))), default=1)
    front = set(selection.front)

    fig = Figure(figsize=(8.0, 5.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    ax = fig.add_subplot()
    label_offsets = _label_offsets_pt([(r[ENERGY], r["accuracy"]) for r in plotted])
    for r, offset in zip(plotted, label_offsets, strict=True):
        on_front = r["variant"] in front
        size = (max(MIN_MARKER_AREA_PT2, MAX_MARKER_AREA_PT2 * r["deployable_bytes"] / max_bytes)
                if known(r.get("deployable_bytes")) else MIN_MARKER_AREA_PT2)
        ax.scatter(r[ENERGY], r["accuracy"], s=size, alpha=0.75, linewidths=1.5,
                   facecolors="tab:blue" if on_front else "none", edgecolors="tab:blue" if on_front else "grey")
        xerr, yerr = _error_bar(r, ENERGY), _error_bar(r, "accuracy")
        if xerr is not None or yerr is not None:  # 95% intervals: median of rounds, Wilson for accuracy
            ax.errorbar(r[ENERGY], r["accuracy"], xerr=xerr, yerr=yerr, fmt="none", ecolor="grey", elinewidth=0.8,
                        capsize=2, alpha=0.8)
        ax.annotate(r["variant"], (r[ENERGY], r["accuracy"]), textcoords="offset points", xytext=offset,
                    fontsize=8)
    champion = rows[selection.champion_index]
    if champion in plotted:
        ax.scatter(champion[ENERGY], champion["accuracy"], marker="*", s=320, color="tab:green",
                   edgecolors="black", zorder=3, label=f"champion: {champion['variant']}")
    if selection.perplexity_budget_percent is None:  # a language model's budget is on perplexity, not drawn here
        floor = rows[0]["accuracy"] - selection.accuracy_budget_points / 100.0
        ax.axhline(floor, color="tab:red", linestyle="--", linewidth=1,
                   label=f"accuracy budget: {selection.accuracy_budget_points:g} points below {selection.baseline}")
    ax.scatter([], [], facecolors="tab:blue", edgecolors="tab:blue", label="Pareto front (4 figures)")
    ax.scatter([], [], facecolors="none", edgecolors="grey", label="dominated")
    ax.margins(x=0.15, y=0.15)
    ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("energy per 1k inferences (J), batch 256")
    ax.set_ylabel("test accuracy (fraction)")
    ax.set_title(f"wattflow variants: accuracy vs inference energy\nenergy method: {_methods(rows)}", fontsize=10)
    ax.grid(alpha=0.3)
    note = ("marker area ∝ deployable bytes; front over accuracy, energy, deployable bytes, b1 latency; "
            "bars: 95% intervals")
    if missing:
        note += f"\nnot plotted (energy or accuracy unknown): {', '.join(missing)}"
    ax.text(0.0, -0.16, note, transform=ax.transAxes, fontsize=8, va="top")
    return fig


def _label_offsets_pt(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Label offsets (points) that stack the names of near-coincident markers instead of overprinting them:
    compressed variants often share accuracy and nearly share energy."""
    if not points:
        return []
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    offsets: list[tuple[float, float]] = []
    for i, (x, y) in enumerate(points):
        near = sum(abs(x - px) / span_x < 0.12 and abs(y - py) / span_y < 0.06 for px, py in points[:i])
        offsets.append((7.0, 6.0 - 11.0 * near))
    return offsets


SELECTION_COLUMNS = ("champion", "on_pareto_front", "within_accuracy_budget", "always_compared")


def comparison_csv(rows: list[dict], selection: Selection, path: str | Path) -> Path:
    """Every row with every figure, plus where it stands in the selection (true/false columns)."""
    path = Path(path)
    columns = list(dict.fromkeys(k for r in rows for k in r)) + list(SELECTION_COLUMNS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="unknown")
        writer.writeheader()
        for r in rows:
            name = r["variant"]
            writer.writerow({**r, "champion": name == selection.champion,
                             "on_pareto_front": name in selection.front,
                             "within_accuracy_budget": name in selection.in_budget,
                             "always_compared": name in selection.comparison})
    return path


# Markdown variants table: row key -> header.
REPORT_COLUMNS = {
    "variant": "variant", "chain": "chain", "accuracy": "accuracy", "delta_accuracy_points": "Δ points",
    "perplexity": "perplexity", "delta_perplexity_percent": "Δ perplexity %",
    "deployable_bytes": "deployable bytes", "deployable_compression_ratio": "ratio", "latency_b1_ms": "b1 ms",
    "latency_b256_ms": "b256 ms", ENERGY: "J / 1k inferences", "energy_per_1k_inferences_95": "95% interval",
    "energy_per_1k_tokens_j": "J / 1k tokens",
    "inference_energy_method": "inference energy method",
    "stage_energy_j": "stage J", "stage_energy_method": "stage energy method",
}
# Shown only where the rows have them: language models' figures, and intervals (rows from before they existed).
OPTIONAL_COLUMNS = ("perplexity", "delta_perplexity_percent", "energy_per_1k_tokens_j", "energy_per_1k_inferences_95")


def report_columns(rows: list[dict]) -> dict[str, str]:
    """REPORT_COLUMNS, with the workload's own columns only where the rows have them, and a latency column per
    batch size evaluated."""
    first = rows[0] if rows else {}
    columns = {k: h for k, h in REPORT_COLUMNS.items()
               if not (k in OPTIONAL_COLUMNS or k.startswith("latency_b")) or k in first}
    return {**{k: h for k, h in columns.items() if k != "inference_energy_method" and not k.startswith("stage")},
            **{k: f"b{k[len('latency_b'):-len('_ms')]} ms" for k in first
               if k.startswith("latency_b") and k.endswith("_ms") and k not in columns},
            **{k: h for k, h in columns.items() if k == "inference_energy_method" or k.startswith("stage")}}


def _cell(value) -> str:
    return "unknown" if value is None else str(value).replace("|", "\\|")


def _table(header: list[str], body: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_cell(v) for v in line) + " |" for line in body)]


def _budget(selection: Selection) -> str:
    if selection.perplexity_budget_percent is not None:
        return f"**+{selection.perplexity_budget_percent:g}% perplexity**"
    return f"**{selection.accuracy_budget_points:g} accuracy points** (absolute)"


def _perplexity(row: dict) -> str:
    if "perplexity" not in row:
        return ""
    return (f"; perplexity {row['perplexity']}, Δ {row.get('delta_perplexity_percent', 'unknown')}%; "
            f"{row.get('energy_per_1k_tokens_j', 'unknown')} J per 1k tokens")


def markdown_report(config_summary: dict, rows: list[dict], selection: Selection, stage_energy: list[dict],
                    mlflow_link: str) -> str:
    """The run's story in markdown. `stage_energy`: `EnergyResult.to_dict()` records (name, energy_j,
    duration_s, method, scope, flags), one per stage and optionally the whole pipeline."""
    champion = rows[selection.champion_index]
    unit = OBJECTIVE_UNITS[selection.objective]
    lines = [f"# wattflow: ship **{selection.champion}**", "",
             f"**Why:** {selection.reason}", "",
             f"- objective: lowest `{selection.objective}` ({unit}), within {_budget(selection)} of the baseline "
             f"`{selection.baseline}`",
             f"- champion: accuracy {champion['accuracy']} (Δ {champion.get('delta_accuracy_points', 'unknown')} "
             f"points{_perplexity(champion)}), {champion.get(ENERGY, 'unknown')} J per 1k inferences "
             f"({champion.get('inference_energy_method', 'unknown')}), "
             f"{champion.get('deployable_bytes', 'unknown')} deployable bytes",
             f"- Pareto front: {', '.join(selection.front)}",
             f"- within budget: {', '.join(selection.in_budget)}",
             f"- always compared: {', '.join(selection.comparison)} (baseline, champion, best int8-only: "
             f"{selection.best_int8_only or 'none'}, best pruned-only: {selection.best_pruned_only or 'none'})",
             f"- MLflow run: [{mlflow_link}]({mlflow_link})", "",
             "## Variants", "",
             *_table([*report_columns(rows).values(), "selection"],
                     [[r.get(k, "unknown") for k in report_columns(rows)] + [_marks(r["variant"], selection)]
                      for r in rows]), "",
             "Δ points: accuracy minus the baseline's, in percentage points. ratio: the baseline's deployable "
             "bytes over the variant's. Latency: median.", "",
             "## Energy per stage", "",
             *_table(["stage", "energy (J)", "duration (s)", "method", "scope", "flags"],
                     [[e.get("name"), _number(e.get("energy_j")), _number(e.get("duration_s")), e.get("method"),
                       e.get("scope"), ", ".join(e.get("flags") or []) or "-"] for e in stage_energy]), "",
             "Unknown energy is shown as unknown, never 0. `estimated:*` methods are estimates, not measurements.",
             "", "## Configuration", "",
             *_table(["setting", "value"], [[k, v] for k, v in _flat(config_summary).items()]), ""]
    return "\n".join(lines)


def _marks(name: str, selection: Selection) -> str:
    marks = ["★ champion"] if name == selection.champion else []
    marks += ["front"] if name in selection.front else []
    marks += ["in budget"] if name in selection.in_budget else []
    return ", ".join(marks) or "-"


def _number(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "unknown"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
