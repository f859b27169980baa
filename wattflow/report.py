"""The summary table, one row per variant, shared by the Prefect table artifact and the terminal."""

from __future__ import annotations

from rich.table import Table

from wattflow.stages import StageResult

UNKNOWN = "unknown"


def sig(x: float | None, digits: int = 4) -> float | str:
    """Round to significant digits, so small figures (a 3 ms stage, 0.02 J) never print as 0."""
    return UNKNOWN if x is None else float(f"{x:.{digits}g}")


def summary_rows(variants: list[StageResult], figures: list[dict]) -> list[dict]:
    """The first variant is the trained model: size ratios are against its serialized file."""
    baseline_bytes = figures[0]["size_bytes"]
    baseline_deployable = figures[0]["deployable_bytes"]
    baseline_accuracy = figures[0]["accuracy"]
    rows = []
    for v, f in zip(variants, figures, strict=True):
        energy = v.energy_result
        rows.append({
            "variant": v.name,
            "stage": v.stage,
            "chain": " -> ".join(v.chain),
            "accuracy": sig(f["accuracy"]),
            # Absolute percentage points vs the trained model (-0.28: 0.28 points less accurate).
            "delta_accuracy_points": sig((f["accuracy"] - baseline_accuracy) * 100.0, 3),
            "size_bytes": f["size_bytes"],
            "size_vs_train_file": sig(f["size_bytes"] / baseline_bytes, 3),
            "size_lzma_bytes": f["size_lzma_bytes"],
            "deployable_bytes": f["deployable_bytes"],
            # One definition per ratio, named: deployable bytes of the trained model / of this variant.
            "deployable_compression_ratio": sig(baseline_deployable / f["deployable_bytes"], 3),
            "nonzero_params": f["nonzero_params"],
            "latency_b1_ms": sig(f["latency_b1_s"] * 1e3) if "latency_b1_s" in f else UNKNOWN,
            "latency_b256_ms": sig(f["latency_b256_s"] * 1e3) if "latency_b256_s" in f else UNKNOWN,
            "stage_energy_j": sig(energy.energy_j, 3),
            "stage_energy_method": energy.method,
            "stage_energy_flags": ",".join([*energy.flags, *(["cached"] if v.cached else [])]) or "-",
            "stage_duration_s": sig(energy.duration_s, 3),
            "energy_per_1k_inferences_j": sig(f.get("energy_per_1k_inferences_j"), 3),
            "inference_energy_method": f["energy_per_1k_inferences.method"],
        })
    return rows


# Terminal column -> header: short enough for a 120-column terminal.
TERMINAL_COLUMNS = {
    "variant": "variant", "accuracy": "test acc", "delta_accuracy_points": "Δ pts", "size_bytes": "file B",
    "deployable_bytes": "deploy B", "deployable_compression_ratio": "deploy x", "latency_b1_ms": "b1 ms",
    "latency_b256_ms": "b256 ms",
    "stage_energy_j": "stage J", "stage_duration_s": "stage s", "stage_energy_flags": "stage flags",
    "energy_per_1k_inferences_j": "J/1k inf",
}


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
    for key, header in TERMINAL_COLUMNS.items():
        table.add_column(header, justify="left" if key == "variant" else "right")
    for row in rows:
        cells = [str(row.get(key, UNKNOWN)) for key in TERMINAL_COLUMNS]  # rows from older runs lack Δ
        is_champion = champion is not None and row["variant"] == champion
        if is_champion:
            cells[0] = f"{CHAMPION_MARK} {cells[0]}"
        table.add_row(*cells, style="bold green" if is_champion else None)
    return table
