"""The promotion guard: a new champion takes the `champion` alias only if it is not worse beyond noise than the
version that holds it now, at equal or better accuracy — both measured in this run, on this machine (the
previous champion's deployable file is re-evaluated beside the new variants).

    previous = previous_champion(client, "wattflow-digits")   # None: no champion yet, or its file is gone
    promote, why = promotion_decision(new_row, previous_row, "energy_per_1k_inferences_j", "if-better")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from wattflow.select import interval, known

CHAMPION = "champion"
# What evaluation tagged on the variant's run (wattflow.stages.VariantFigures.mlflow_tags).
DEPLOYABLE_TAG, RUNTIME_TAG = "eval.deployable.path", "eval.deployable.runtime"


@dataclass(frozen=True)
class PreviousChampion:
    version: str
    variant: str
    run_id: str
    path: str | None      # its deployable file, when it is still on this machine
    runtime: str | None   # the runtime that file runs on
    note: str = ""        # why it cannot be re-evaluated here, when path is None


def previous_champion(client: MlflowClient, model_name: str) -> PreviousChampion | None:
    """The version behind `model_name@champion` and where its deployable file is; None when there is none."""
    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None
    tags = client.get_run(version.run_id).data.tags
    path, runtime = tags.get(DEPLOYABLE_TAG), tags.get(RUNTIME_TAG)
    variant = version.tags.get("wattflow.variant", "?")
    if not path or not Path(path).is_file() or not runtime:
        return PreviousChampion(str(version.version), variant, version.run_id, None, None,
                                f"its deployable file {path or '(not recorded)'} is not on this machine"
                                if not path or not Path(path).is_file() else "its runtime was not recorded")
    return PreviousChampion(str(version.version), variant, version.run_id, path, runtime)


def reevaluate(cfg, previous: PreviousChampion, out_dir: Path, meter) -> dict:
    """The previous champion's deployable evaluated like a new variant (same measurement, this machine), as a
    summary row (`wattflow.report.summary_rows`). Raises whatever evaluation raises (another workload's model)."""
    from wattflow.energy import EnergyResult
    from wattflow.models import sha256_file
    from wattflow.report import summary_rows
    from wattflow.stages import Artifact, StageResult, evaluate_variant

    stage = StageResult(name=f"v{previous.version} ({previous.variant})", stage="train",
                        chain=["registry", previous.variant], energy=EnergyResult("previous", 0.0, ()).to_dict(),
                        artifact=Artifact(path=previous.path, format=previous.runtime,
                                          sha256=sha256_file(previous.path)))
    return summary_rows([stage], [evaluate_variant(cfg, stage, out_dir, meter)])[0]


def promotion_decision(new: dict, previous: dict | None, objective: str, mode: str) -> tuple[bool, str]:
    """(promote?, why) for the new champion's row against the re-evaluated previous champion's row (summary
    rows, with `<figure>_lo/_hi` intervals where known). `mode`: "always" or "if-better"."""
    if mode == "always":
        return True, "select.promote is always"
    if previous is None:
        return True, "no previous champion to compare with here"
    acc_new, acc_old = new.get("accuracy"), previous.get("accuracy")
    if known(acc_new) and known(acc_old) and acc_new < acc_old:
        return False, (f"{new['variant']} is less accurate ({acc_new:.4g}) than the current champion "
                       f"{previous['variant']} ({acc_old:.4g}, re-evaluated in this run)")
    a, b = interval(new, objective), interval(previous, objective)
    if a is None or b is None:
        return True, f"{objective} is unknown for one of them: nothing shows the new champion is worse"
    if a[0] > b[1]:
        return False, (f"{new['variant']} is worse beyond noise on {objective} ({a[0]:.4g}-{a[1]:.4g}) than the "
                       f"current champion {previous['variant']} ({b[0]:.4g}-{b[1]:.4g}, re-evaluated in this run)")
    return True, (f"not worse beyond noise than the current champion {previous['variant']} on {objective} "
                  f"({a[0]:.4g}-{a[1]:.4g} vs {b[0]:.4g}-{b[1]:.4g}), at equal or better accuracy")
