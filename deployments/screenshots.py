"""Screenshots of the Prefect UI and the MLflow UI for the latest `make run-flow`, with headless Chromium, so the
README's pictures can be retaken after a change:

    make run-flow && make screenshots          # writes docs/img/*.png

It starts the Prefect server (with its UI) and the MLflow UI on the project's state (.wattflow/, or
PREFECT_HOME / MLFLOW_TRACKING_URI), on free loopback ports, opens each page in `chromium --headless` and
stops both servers. Chromium: `apt-get install -y chromium` (Debian) or set CHROMIUM to its path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from servers import free_port, start, stop, wait_healthy  # noqa: E402  (the tests' process helpers)

OUT = ROOT / "docs" / "img"
BIN = Path(sys.executable).parent


def chromium() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        sys.exit("no chromium: apt-get install -y chromium, or set CHROMIUM=/path/to/chrome")
    return found


def shoot(url: str, path: Path, wait_ms: int = 12_000, size: str = "1600,1000") -> None:
    """A full-window PNG of `url` once its scripts have had `wait_ms` of virtual time to render."""
    subprocess.run([chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size}", f"--virtual-time-budget={wait_ms}", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=120)
    print(f"{path.relative_to(ROOT)}  <- {url}")


def latest_run(client: MlflowClient) -> tuple[str, str, str, str]:
    """(experiment id, parent run id, Prefect flow run id, registered model name) of the newest pipeline run."""
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], "tags.`wattflow.stage` = 'pipeline'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        sys.exit("no wattflow pipeline run in the MLflow store: run `make run-flow` first")
    run = runs[0]
    versions = client.search_model_versions(f"run_id = '{run.info.run_id}'") or [
        v for m in client.search_registered_models() for v in client.search_model_versions(f"name = '{m.name}'")
        if client.get_run(v.run_id).data.tags.get("mlflow.parentRunId") == run.info.run_id]
    model = versions[0].name if versions else "wattflow-digits"
    return run.info.experiment_id, run.info.run_id, run.data.tags["prefect.flow_run_id"], model


def latest_artifact(prefect: str, key: str) -> str:
    """The id of the newest Prefect artifact with `key` (its page shows the table or the markdown itself)."""
    body = {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}
    request = urllib.request.Request(f"{prefect}/api/artifacts/filter", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())[0]["id"]


def main() -> int:
    state = ROOT / ".wattflow"
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{state}/mlflow.db")
    client = MlflowClient(tracking_uri)
    experiment_id, parent_id, flow_run_id, model = latest_run(client)
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    champion = next((r for r in children if r.info.run_name == client.get_run(parent_id).data.tags.get(
        "wattflow.champion")), children[0])
    OUT.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(state / "prefect")),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PREFECT_API_URL", None)
    prefect_port, mlflow_port = free_port(), free_port()
    # The UI calls the API at the address it is told (default :4200), not at the port it was served from.
    env["PREFECT_UI_API_URL"] = env["PREFECT_SERVER_UI_API_URL"] = f"http://127.0.0.1:{prefect_port}/api"
    logs = state / "screenshots"
    procs = [start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                   env, logs / "prefect.log"),
             start([str(BIN / "mlflow"), "ui", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
                    "--port", str(mlflow_port), "--workers", "1"], env, logs / "mlflow.log")]
    try:
        prefect, mlflow_ui = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
        wait_healthy(f"{prefect}/api/health", procs[0], logs / "prefect.log")
        wait_healthy(f"{mlflow_ui}/health", procs[1], logs / "mlflow.log")
        shoot(f"{prefect}/runs/flow-run/{flow_run_id}", OUT / "prefect-flow-run.png")
        shoot(f"{prefect}/runs/flow-run/{flow_run_id}?tab=Artifacts", OUT / "prefect-artifacts.png")
        for key, name in (("wattflow-variants", "prefect-variants-table.png"),
                          ("wattflow-report", "prefect-report.png")):
            shoot(f"{prefect}/artifacts/artifact/{latest_artifact(prefect, key)}", OUT / name, size="1600,1400")
        # MLflow 3 opens in its GenAI view; the experiment's runs list and a run page are the training views.
        shoot(f"{mlflow_ui}/#/experiments/{experiment_id}/runs", OUT / "mlflow-runs.png")
        shoot(f"{mlflow_ui}/#/experiments/{experiment_id}/runs/{parent_id}/artifacts/selection/pareto.png",
              OUT / "mlflow-pareto.png")
        shoot(f"{mlflow_ui}/#/experiments/{experiment_id}/runs/{champion.info.run_id}", OUT / "mlflow-champion-run.png",
              size="1600,1800")
        shoot(f"{mlflow_ui}/#/models/{model}", OUT / "mlflow-registered-model.png")
    finally:
        for proc in procs:
            stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
