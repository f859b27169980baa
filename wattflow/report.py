"""The summary table, one row per variant, shared by the Prefect table artifact and the terminal."""

from __future__ import annotations

from rich.table import Table

from wattflow.intervals import bounds
from wattflow.stages import StageResult, VariantFigures

UNKNOWN = "unknown"


def sig(x: float | None, digits: int = 4) -> float | str:
    """Round to significant digits, so small figures (a 3 ms stage, 0.02 J) never print as 0."""
    return UNKNOWN if x is None else float(f"{x:.{digits}g}")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _times(x: float | None, k: float) -> float | None:
    return None if x is None else x * k


def summary_rows(variants: list[StageResult], figures: list[VariantFigures]) -> list[dict]:
    """The first variant is the trained model: size ratios are against its serialized file. One latency column
    per batch size evaluated."""
    base = figures[0]
    batch_sizes = sorted({b for f in figures for b in f.latency_s})
    rows = []
    for v, f in zip(variants, figures, strict=True):
        energy = v.energy_result
        accuracy = f.accuracy
        rows.append({
            "variant": v.name,
            "stage": v.stage,
            "chain": " -> ".join(v.chain),
            "accuracy": sig(accuracy),
            # Absolute percentage points vs the trained model (-0.28: 0.28 points less accurate).
            "delta_accuracy_points": sig(None if accuracy is None or base.accuracy is None
                                         else (accuracy - base.accuracy) * 100.0, 3),
            **_perplexity(f, base),
            "size_bytes": f.size_bytes if f.size_bytes is not None else UNKNOWN,
            "size_vs_train_file": sig(_ratio(f.size_bytes, base.size_bytes), 3),
            "size_lzma_bytes": f.size_lzma_bytes if f.size_lzma_bytes is not None else UNKNOWN,
            "deployable_bytes": f.deployable_bytes if f.deployable_bytes is not None else UNKNOWN,
            # One definition per ratio, named: deployable bytes of the trained model / of this variant.
            "deployable_compression_ratio": sig(_ratio(base.deployable_bytes, f.deployable_bytes), 3),
            "nonzero_params": f.nonzero_params if f.nonzero_params is not None else UNKNOWN,
            **{f"latency_b{b}_ms": sig(_times(f.latency_s.get(b), 1e3)) for b in batch_sizes},
            "stage_energy_j": sig(energy.energy_j, 3),
            "stage_energy_method": energy.method,
            "stage_energy_flags": ",".join([*energy.flags, *(["cached"] if v.cached else [])]) or "-",
            "stage_duration_s": sig(energy.duration_s, 3),
            "energy_per_1k_inferences_j": sig(f.energy_per_1k_inferences_j, 3),
            # 95% intervals (median over eval.rounds rounds; Wilson for accuracy): "lo-hi", or unknown
            "energy_per_1k_inferences_95": _span(f.energy_per_1k_inferences_interval_j),
            "accuracy_95": _span(f.accuracy_interval),
            **_rounded(bounds("energy_per_1k_inferences_j", f.energy_per_1k_inferences_interval_j)),
            **_rounded(bounds("accuracy", f.accuracy_interval)),
            **({"energy_per_1k_tokens_j": sig(f.energy_per_1k_tokens_j, 3), "tokens_per_s": sig(f.tokens_per_s, 3)}
               if f.tokens_per_sample else {}),
            "inference_energy_method": f.energy_method,
        })
    return rows


def _rounded(figures: dict[str, float]) -> dict[str, float]:
    return {k: sig(v) for k, v in figures.items()}


def _span(pair: tuple[float, float] | None) -> str:
    return UNKNOWN if pair is None else f"{sig(pair[0], 3)}-{sig(pair[1], 3)}"


def _perplexity(f: VariantFigures, base: VariantFigures) -> dict:
    """Language models: perplexity and its increase over the trained model's, in percent."""
    ppl, base_ppl = f.scores.get("perplexity"), base.scores.get("perplexity")
    if ppl is None and base_ppl is None:
        return {}
    return {"perplexity": sig(ppl), "delta_perplexity_percent": sig(None if ppl is None or base_ppl is None
                                                                     else (ppl / base_ppl - 1.0) * 100.0, 3)}


# Terminal column -> header: short enough for a 120-column terminal; a latency column per batch size goes
# after "deploy x".
TERMINAL_COLUMNS = {
    "variant": "variant", "accuracy": "test acc", "delta_accuracy_points": "Δ pts", "perplexity": "ppl",
    "delta_perplexity_percent": "Δ ppl %", "size_bytes": "file B",
    "deployable_bytes": "deploy B", "deployable_compression_ratio": "deploy x",
    "stage_energy_j": "stage J", "stage_duration_s": "stage s", "stage_energy_flags": "stage flags",
    "energy_per_1k_inferences_j": "J/1k inf", "energy_per_1k_inferences_95": "J/1k 95%",
    "energy_per_1k_tokens_j": "J/1k tok",
}


def terminal_columns(rows: list[dict]) -> dict[str, str]:
    latency = sorted((k for k in (rows[0] if rows else {}) if k.startswith("latency_b") and k.endswith("_ms")),
                     key=lambda k: int(k[len("latency_b"):-len("_ms")]))
    present = rows[0] if rows else TERMINAL_COLUMNS  # a workload's own columns (perplexity) only where it has them
    items = [(k, h) for k, h in TERMINAL_COLUMNS.items() if k in present or k == "deployable_compression_ratio"]
    at = [k for k, _ in items].index("deployable_compression_ratio") + 1
    return dict(items[:at] + [(k, f"b{k[len('latency_b'):-len('_ms')]} ms") for k in latency] + items[at:])


CHAMPION_MARK = "★"


def rich_table(rows: list[dict], title: str = "wattflow variants", champion: str | None = None) -> Table:
    """The terminal table; `champion` (a variant name) is marked with a star and shown in bold green."""
    methods = sorted({r["stage_energy_method"] for r in rows} | {r["inference_energy_method"] for r in rows})
    caption = (f"energy method: {', '.join(methods)}; file B: serialized file; deploy B: deployable artifact "
               "(packed .wfp or .onnx); deploy x: train's deployable bytes / variant's; Δ pts: accuracy vs "
               "train, percentage points")
    if champion is not None:
        caption += f"; {CHAMPION_MARK} champion"
    table = Table(title=title, caption=caption)
    columns = terminal_columns(rows)
    for key, header in columns.items():
        table.add_column(header, justify="left" if key == "variant" else "right")
    for row in rows:
        cells = [str(row.get(key, UNKNOWN)) for key in columns]  # rows from older runs lack Δ
        is_champion = champion is not None and row["variant"] == champion
        if is_champion:
            cells[0] = f"{CHAMPION_MARK} {cells[0]}"
        table.add_row(*cells, style="bold green" if is_champion else None)
    return table
