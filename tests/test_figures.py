import csv
import io

from wattflow.figures import comparison_csv, markdown_report, pareto_figure, pareto_png
from wattflow.select import select_champion

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(name, accuracy, energy, deploy, chain=None, method="estimated:cpu-time"):
    return {"variant": name, "stage": "prune", "chain": chain or f"train -> {name}", "accuracy": accuracy,
            "delta_accuracy_points": round((accuracy - 0.9722) * 100, 3), "deployable_bytes": deploy,
            "deployable_compression_ratio": round(130508 / deploy, 3), "latency_b1_ms": 0.05,
            "latency_b256_ms": 2.0, "stage_energy_j": 5.0, "stage_energy_method": method,
            "energy_per_1k_inferences_j": energy, "inference_energy_method": method}


ROWS = [row("train", 0.9722, 0.0691, 130508, chain="train"), row("prune-0.8", 0.9722, 0.0651, 28641),
        row("onnx-int8-static", 0.9694, 0.0157, 42403),
        row("bf16", 0.9722, "unknown", 53833, method="unavailable"),
        row("prune-0.8+onnx-int8-static", 0.9694, 0.0159, 42403, chain="train -> prune-0.8 -> onnx-int8-static")]
STAGE_ENERGY = [
    {"name": "train", "energy_j": 46.4, "duration_s": 11.0, "method": "estimated:cpu-time",
     "scope": "CPU (estimated from process CPU time); excludes GPU", "flags": []},
    {"name": "bf16", "energy_j": None, "duration_s": 0.01, "method": "unavailable", "scope": "nothing measured",
     "flags": ["below_resolution"]}]


def test_pareto_png_is_a_real_png(tmp_path):
    path = pareto_png(ROWS, select_champion(ROWS), tmp_path / "plots" / "pareto.png")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000  # an 880x616 plot with text, not an empty canvas
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (880, 616)


def test_the_pareto_plot_names_rows_of_unknown_energy_instead_of_plotting_them():
    rows = [{**r, "energy_per_1k_inferences_j_lo": r["energy_per_1k_inferences_j"] * 0.9,
             "energy_per_1k_inferences_j_hi": r["energy_per_1k_inferences_j"] * 1.1}
            if r["energy_per_1k_inferences_j"] != "unknown" else r for r in ROWS]
    ax = pareto_figure(rows, select_champion(rows)).axes[0]
    texts = [t.get_text() for t in ax.texts]
    labelled = {t for t in texts if not t.startswith("marker area")}
    assert labelled == {r["variant"] for r in ROWS} - {"bf16"}  # every known row labelled at its point
    (note,) = [t for t in texts if t.startswith("marker area")]
    assert note.endswith("not plotted (energy or accuracy unknown): bf16")
    assert "champion: onnx-int8-static" in [h.get_label() for h in ax.get_legend().legend_handles]
    assert len(ax.containers) == 4  # one error bar (95% interval) per plotted row


def test_comparison_csv_round_trips_with_the_selection_marked(tmp_path):
    sel = select_champion(ROWS)
    path = comparison_csv(ROWS, sel, tmp_path / "variants.csv")
    with path.open(newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["variant"] for r in back] == [r["variant"] for r in ROWS]
    for original, read in zip(ROWS, back, strict=True):
        assert {k: str(v) for k, v in original.items()} == {k: read[k] for k in original}
    champion = next(r for r in back if r["champion"] == "True")
    assert champion["variant"] == sel.champion == "onnx-int8-static"
    assert back[3]["energy_per_1k_inferences_j"] == "unknown" and back[3]["on_pareto_front"] == "True"
    assert [r["always_compared"] for r in back] == ["True", "True", "True", "False", "False"]


def test_markdown_report_names_the_champion_says_why_and_keeps_methods(tmp_path):
    sel = select_champion(ROWS)
    link = "http://127.0.0.1:5000/#/experiments/1/runs/abc123"
    md = markdown_report({"train": {"model": "cnn", "epochs": 20}, "chains": "prune:0.8, onnx-int8-static"},
                         ROWS, sel, STAGE_ENERGY, link)
    assert md.startswith("# wattflow: ship **onnx-int8-static**")
    assert sel.reason in md and "0.5 accuracy points" in md
    assert f"({link})" in md
    assert "| train.model | cnn |" in md and "| train.epochs | 20 |" in md
    assert "| onnx-int8-static | train -> onnx-int8-static | 0.9694 |" in md and "★ champion" in md
    assert "| bf16 | unknown | 0.01 | unavailable | nothing measured | below_resolution |" in md
    assert "| train | 46.4 | 11 | estimated:cpu-time |" in md


def test_markdown_report_explains_a_baseline_champion():
    rows = [ROWS[0], row("kmeans-4bit", 0.90, 0.001, 9000)]
    sel = select_champion(rows)
    md = markdown_report({}, rows, sel, [], "runs:/x")
    assert md.startswith("# wattflow: ship **train**") and "no variant is within 0.5 accuracy points" in md


def test_summary_rows_carry_the_accuracy_delta_and_the_terminal_table_stars_the_champion():
    from rich.console import Console

    from wattflow.energy import DeviceEnergy, EnergyResult
    from wattflow.report import rich_table, summary_rows
    from wattflow.stages import Artifact, StageResult, VariantFigures

    def variant(name):
        energy = EnergyResult(name, 1.0, (DeviceEnergy("cpu:process-tree", 2.0, "estimated:cpu-time"),))
        return StageResult(name=name, stage="train", chain=[name], energy=energy.to_dict(),
                           artifact=Artifact(path="/nonexistent", format="torch", sha256="0" * 64))

    figures = {"size_bytes": 1000, "size_lzma_bytes": 800, "nonzero_params": 10, "deployable_bytes": 900,
               "latency_s": {1: 2e-5}, "energy_method": "estimated:cpu-time"}
    rows = summary_rows([variant("train"), variant("int8")],
                        [VariantFigures(**figures, scores={"accuracy": 0.9722}),
                         VariantFigures(**figures, scores={"accuracy": 0.9694})])
    assert rows[0]["delta_accuracy_points"] == 0.0 and rows[1]["delta_accuracy_points"] == -0.28
    console = Console(width=200, record=True, color_system="truecolor", file=io.StringIO())
    console.print(rich_table(rows, champion="int8"))
    text, styled = console.export_text(clear=False), console.export_text(styles=True)
    assert "★ int8" in text and "-0.28" in text and "Δ pts" in text and "★ champion" in text
    champion_line = next(line for line in styled.splitlines() if "★ int8" in line)
    assert "\x1b[1;32m" in champion_line  # bold green
    assert "★" not in rich_table(rows).caption  # no champion given: no star anywhere
