"""The model card: the markdown description of a registered version, so that whoever finds the model in the
registry reads what it is, what it was measured at (with how), why it was chosen and how to load it.

    model_card(row, selection, context)   # context: workload, data, model name, version, links
"""

from __future__ import annotations

from typing import Any

from wattflow.select import OBJECTIVE_UNITS, Selection

FIGURES = (  # row key, label, unit
    ("accuracy", "test accuracy", ""), ("delta_accuracy_points", "Δ accuracy vs the trained model", " points"),
    ("perplexity", "test perplexity", ""), ("delta_perplexity_percent", "Δ perplexity vs the trained model", " %"),
    ("accuracy_95", "test accuracy, 95% interval (Wilson)", ""),
    ("energy_per_1k_inferences_j", "energy per 1k inferences (median of rounds)", " J"),
    ("energy_per_1k_inferences_95", "energy per 1k inferences, 95% interval", " J"),
    ("energy_per_1k_tokens_j", "energy per 1k tokens", " J"),
    ("deployable_bytes", "deployable artifact", " bytes"), ("deployable_compression_ratio", "deployable ratio "
     "(the trained model's deployable bytes / this one's)", "×"),
    ("size_bytes", "file as evaluated", " bytes"), ("nonzero_params", "nonzero parameters", ""),
)


def model_card(row: dict, selection: Selection, context: dict[str, Any]) -> str:
    """`row`: the variant's summary row (wattflow.report); `context`: workload, data, model_name, version,
    alias, flow_run, mlflow_run (links or ids), and optionally sample."""
    alias = context.get("alias", "champion")
    name, version = context["model_name"], context["version"]
    latency = {k: v for k, v in row.items() if k.startswith("latency_b") and k.endswith("_ms")}
    if selection.perplexity_budget_percent is not None:
        budget = f"+{selection.perplexity_budget_percent:g}% perplexity over the trained model"
    else:
        budget = f"{selection.accuracy_budget_points:g} accuracy points below the trained model"
    lines = [
        f"# {name} v{version}: `{row['variant']}`", "",
        f"**{alias}** of a wattflow run. Workload: {context['workload']}; data: {context['data']}.", "",
        f"- chain: `{row.get('chain', row['variant'])}`",
        f"- selection: lowest `{selection.objective}` ({OBJECTIVE_UNITS[selection.objective]}) within {budget}",
        f"- why: {selection.reason}",
        "", "## Figures (test split, this run, this machine)", "",
        "| figure | value |", "|---|---|",
        *(f"| {label} | {row[key]}{unit if row[key] != 'unknown' else ''} |" for key, label, unit in FIGURES
          if key in row),
        *(f"| latency at batch {k[len('latency_b'):-len('_ms')]} (median) | {v} ms |" for k, v in latency.items()),
        f"| inference energy method | {row.get('inference_energy_method', 'unknown')} |",
        f"| energy of the stage that made it | {row.get('stage_energy_j', 'unknown')} J "
        f"({row.get('stage_energy_method', 'unknown')}) |",
        "",
        "Energy figures carry their method: `measured:*` is read from hardware counters, `estimated:cpu-time` "
        "is CPU time × a per-core power, `simulated:*` comes from a fake GPU. An unknown figure is shown as "
        "unknown, never as 0.",
        "", "## Where it came from", "",
        f"- Prefect flow run: {context['flow_run']}",
        f"- MLflow run: {context['mlflow_run']}",
        "", "## Load it", "",
        "```python",
        "import mlflow",
        f'model = mlflow.pyfunc.load_model("models:/{name}@{alias}")   # or models:/{name}/{version}',
        "scores = model.predict(inputs)   # inputs and outputs: see the version's signature and input example",
        "```", "",
        f"Serve it over HTTP on 127.0.0.1: `mlflow models serve -m models:/{name}@{alias} --env-manager local`.",
    ]
    if context.get("sample"):
        lines += ["", "## Sample of the trained model", "", f"    {context['sample']!r}"]
    return "\n".join(lines) + "\n"
