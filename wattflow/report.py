"""The summary table, one row per variant, shared by the Prefect table artifact and the terminal."""

from __future__ import annotations

from rich.table import Table

from wattflow.stages import StageResult

UNKNOWN = "unknown"


def summary_rows(variants: list[StageResult], figures: list[dict]) -> list[dict]:
    baseline_bytes = figures[0]["size_bytes"]
    rows = []
    for v, f in zip(variants, figures, strict=True):
        energy = v.energy_result
        per_inference = f.get("energy_per_inference_j")
        rows.append({
            "variant": v.name,
            "stage": v.stage,
            "chain": " -> ".join(v.chain),
            "accuracy": round(f["accuracy"], 4),
            "size_bytes": f["size_bytes"],
            "size_vs_train_file": round(f["size_bytes"] / baseline_bytes, 3),
            "nonzero_params": f["nonzero_params"],
            "latency_b1_ms": _ms(f.get("latency_b1_s")),
            "latency_b256_ms": _ms(f.get("latency_b256_s")),
            "stage_energy_j": UNKNOWN if energy.energy_j is None else round(energy.energy_j, 2),
            "stage_energy_method": energy.method,
            "stage_duration_s": round(energy.duration_s, 2),
            "energy_per_1k_inferences_j": UNKNOWN if per_inference is None else round(per_inference * 1e3, 4),
            "inference_energy_method": f["energy_per_inference.method"],
        })
    return rows


def _ms(seconds: float | None) -> float | str:
    return UNKNOWN if seconds is None else round(seconds * 1e3, 3)


TERMINAL_COLUMNS = ["variant", "accuracy", "size_bytes", "size_vs_train_file", "latency_b1_ms", "latency_b256_ms",
                    "stage_energy_j", "stage_duration_s", "energy_per_1k_inferences_j", "stage_energy_method"]


def rich_table(rows: list[dict], title: str = "wattflow variants") -> Table:
    table = Table(title=title)
    for col in TERMINAL_COLUMNS:
        table.add_column(col, justify="left" if col in ("variant", "stage_energy_method") else "right")
    for row in rows:
        table.add_row(*(str(row[c]) for c in TERMINAL_COLUMNS))
    return table
