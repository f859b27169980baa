"""The MLflow Model Registry: the champion and the baseline as versions of one registered model.

    versions = register_variants(tracker, selection, variants, rows, "wattflow-digits", flow_run_id)
    predict = load_alias("wattflow-digits", "champion")   # float32 [N, 64] -> logits [N, 10]

The champion's and the baseline's models are logged on their own child runs by `Tracker.log_model` (artifact
name "model"). In MLflow 3 that creates a LoggedModel, and the version is registered from its
`models:/<model_id>` URI with `run_id` set, so the version links back to the child run (and through it to the
flow's parent run).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from wattflow.select import Selection
from wattflow.tracking.exports import using_tracking_uri

if TYPE_CHECKING:  # the stages pull in every backend; the registry only reads names, runs and hashes
    from wattflow.stages import StageResult

MODEL_ARTIFACT = "model"  # the name Tracker.log_model logs under
CHAMPION, BASELINE = "champion", "baseline"


class RegistryError(RuntimeError):
    """A variant cannot be registered; the message names the variant and what is missing."""


class AliasRefused(RegistryError):
    """The versions were registered, but the aliases stay where they were; `versions` maps variant -> version."""

    def __init__(self, message: str, versions: dict[str, str]):
        super().__init__(message)
        self.versions = versions


def _client(tracker_or_client) -> MlflowClient:
    return tracker_or_client if isinstance(tracker_or_client, MlflowClient) else tracker_or_client.client


def logged_model_id(client: MlflowClient, run_id: str) -> str:
    """The id of the LoggedModel named "model" that `run_id` logged."""
    experiment_id = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_ARTIFACT}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}])
    if not models:
        raise RegistryError(f"run {run_id} has no logged model named {MODEL_ARTIFACT!r}: log it first "
                            "(Tracker.log_model; the flow's ship task logs the champion and the baseline)")
    return models[0].model_id  # the latest, should a retried stage have logged twice


def version_tags(row: dict, variant: StageResult, flow_run_id: str | None) -> dict[str, str]:
    """What a version carries: where it came from and its key figures (unknown stays "unknown")."""
    return {"wattflow.variant": variant.name, "wattflow.chain": " -> ".join(variant.chain),
            "prefect.flow_run_id": str(flow_run_id or "unknown"), "artifact.sha256": variant.artifact.sha256,
            "accuracy": str(row.get("accuracy", "unknown")),
            "delta_accuracy_points": str(row.get("delta_accuracy_points", "unknown")),
            "energy_per_1k_inferences_j": str(row.get("energy_per_1k_inferences_j", "unknown")),
            "energy_per_1k_inferences.method": str(row.get("inference_energy_method", "unknown")),
            "deployable_bytes": str(row.get("deployable_bytes", "unknown")),
            "latency_b1_ms": str(row.get("latency_b1_ms", "unknown"))}


VERSION_PLACEHOLDER = "{version}"  # in a journaled description: the version number, known once registered
REGISTER_KEY_TAG = "wattflow.register_key"  # one key per journaled registration: a replay finds its versions


def registration(selection: Selection, variants: list[StageResult], rows: list[dict], model_name: str,
                 flow_run_id: str | None, descriptions: dict[str, str] | None = None, key: str = "",
                 hold_aliases: str | None = None) -> dict:
    """What `Tracker.register` journals: plain data (run ids may be offline placeholders that sync resolves),
    applied by `apply_registration` now or at `wattflow.sync` time."""
    by_name = {v.name: v for v in variants}
    row_by_name = {r["variant"]: r for r in rows}
    entries = []
    for alias, name in ((CHAMPION, selection.champion), (BASELINE, selection.baseline)):
        variant = by_name.get(name)
        if variant is None or variant.mlflow_run_id is None:
            raise RegistryError(f"{alias} {name!r} has no MLflow run among the variants; pass the StageResults "
                                "returned by the recorded stages")
        entries.append({"alias": alias, "variant": name, "run_id": variant.mlflow_run_id,
                        "tags": version_tags(row_by_name.get(name, {}), variant, flow_run_id),
                        "description": (descriptions or {}).get(alias)})
    # hold_aliases: why the aliases must stay where they are (the promotion guard), registered all the same
    return {"model_name": model_name, "key": key, "entries": entries, "hold_aliases": hold_aliases}


def apply_registration(client: MlflowClient, payload: dict) -> dict:
    """Register each entry's logged model as a version (once per key: a replay reuses the versions it finds),
    then move the aliases unless the champion's inputs differ from the current champion's. Returns
    {"aliases": {alias: version}, "versions": {variant: version}, "refused": reason or None}."""
    with using_tracking_uri(client.tracking_uri):  # MLflow resolves a version's models:/ source through it
        return _apply_registration(client, payload)


def _apply_registration(client: MlflowClient, payload: dict) -> dict:
    model_name, key = payload["model_name"], payload["key"]
    _ensure_registered_model(client, model_name)
    versions: dict[str, str] = {}
    for entry in payload["entries"]:
        name = entry["variant"]
        if name in versions:
            continue
        found = [v for v in client.search_model_versions(f"name = '{model_name}'")
                 if key and v.tags.get(REGISTER_KEY_TAG) == key and v.tags.get("wattflow.variant") == name]
        if found:
            versions[name] = str(found[0].version)
            continue
        tags = {**entry["tags"], **({REGISTER_KEY_TAG: key} if key else {})}
        versions[name] = _register_run(client, model_name, entry["run_id"], tags)
        if entry.get("description"):
            client.update_model_version(model_name, versions[name],
                                        description=entry["description"].replace(VERSION_PLACEHOLDER, versions[name]))
    champion = next(e["variant"] for e in payload["entries"] if e["alias"] == CHAMPION)
    refused = payload.get("hold_aliases") or _signature_change(client, model_name, versions[champion])
    aliases: dict[str, str] = {}
    if refused is None:
        for entry in payload["entries"]:
            client.set_registered_model_alias(model_name, entry["alias"], versions[entry["variant"]])
            aliases[entry["alias"]] = versions[entry["variant"]]
    return {"aliases": aliases, "versions": versions, "refused": refused}


def register_variants(tracker_or_client, selection: Selection, variants: list[StageResult], rows: list[dict],
                      model_name: str, flow_run_id: str | None) -> dict[str, str]:
    """Register the champion (alias "champion") and the baseline (alias "baseline") as new versions of
    `model_name`; a baseline champion is one version carrying both aliases. Returns {alias: version}."""
    result = apply_registration(_client(tracker_or_client),
                                registration(selection, variants, rows, model_name, flow_run_id))
    if result["refused"]:
        raise AliasRefused(result["refused"], result["versions"])
    return result["aliases"]


def input_schema(client: MlflowClient, model_name: str, version: str) -> dict | None:
    """The input part of a version's MLflow signature (None when it has none)."""
    from mlflow.models import get_model_info

    with using_tracking_uri(client.tracking_uri):  # a models:/ source resolves through the process-wide URI
        info = get_model_info(client.get_model_version(model_name, version).source)
    return None if info.signature is None else info.signature.inputs.to_dict()


def _signature_change(client: MlflowClient, model_name: str, new_version: str) -> str | None:
    """Why the aliases must not move to `new_version` (its inputs differ from the current champion's), or None.
    Serving `models:/<name>@champion` would otherwise start rejecting what its users send."""
    try:
        current = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None  # no champion yet
    old, new = input_schema(client, model_name, current.version), input_schema(client, model_name, new_version)
    if old is None or old == new:
        return None
    return (f"{model_name} v{new_version} takes inputs {new}, but the current champion v{current.version} takes "
            f"{old}: the aliases stay on v{current.version} (moving them would break whoever serves "
            f"models:/{model_name}@champion). Set select.model_name to register this workload under its own name.")


def _ensure_registered_model(client: MlflowClient, model_name: str) -> None:
    try:
        client.create_registered_model(
            model_name, description="wattflow variants: alias 'champion' is the one to ship, 'baseline' the "
            "trained model it is compared with.")
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def _register_run(client: MlflowClient, model_name: str, run_id: str, tags: dict[str, str]) -> str:
    model_id = logged_model_id(client, run_id)
    version = client.create_model_version(model_name, source=f"models:/{model_id}", run_id=run_id, tags=tags,
                                          model_id=model_id).version
    # As mlflow.register_model does: the logged model lists its registered versions (shown in the MLflow UI).
    listed = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    client.set_logged_model_tags(model_id, {
        MLFLOW_MODEL_VERSIONS: json.dumps([*listed, {"name": model_name, "version": str(version)}])})
    return str(version)


Predict = Callable[[np.ndarray], np.ndarray]


def load_alias(model_name: str, alias: str, tracking_uri: str | None = None) -> Predict:
    """A predictor for the version behind `alias`: float32 [N, in_features] -> logits float32 [N, classes],
    through MLflow's pyfunc (torch 'pt2' or ONNX Runtime, whichever flavour the variant was logged with)."""
    with using_tracking_uri(tracking_uri or mlflow.get_tracking_uri()):  # pyfunc resolves models:/ through it
        model = mlflow.pyfunc.load_model(f"models:/{model_name}@{alias}")

    def predict(x: np.ndarray) -> np.ndarray:
        out = model.predict(np.ascontiguousarray(x, dtype=np.float32))
        if isinstance(out, dict):  # ONNX pyfunc: {output name: array}, one output here
            (out,) = out.values()
        return np.asarray(out, dtype=np.float32)

    return predict
