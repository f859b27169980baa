"""`python -m flows` starts Prefect's temporary server itself (flows.temporary_server): the flow runs on it, its
runs, task runs and logs land in PREFECT_HOME's database for `make prefect-ui`, and nothing outlives the process."""

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration  # starts a Prefect server: not in make test-fast

PROJECT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import os, sys
    from flows.temporary_server import start_in_background
    server = start_in_background()
    from prefect import flow, get_run_logger, task
    from prefect.cache_policies import NO_CACHE
    from wattflow.preflight import configured_prefect_api_url

    @task(cache_policy=NO_CACHE)
    def double(x):
        return 2 * x

    @flow(name="temporary-server-check")
    def check():
        get_run_logger().info("logged to the temporary server")
        return double(21)

    assert "PREFECT_API_URL" not in os.environ  # until the server answers, as the user left it
    server.wait()
    assert check() == 42
    print(os.environ["PREFECT_API_URL"], configured_prefect_api_url())
""")


def own_prefect_home(tmp_path: Path, prefect_db: Path) -> dict[str, str]:
    """An environment with its own PREFECT_HOME (a copy of the migrated database: no migration at start) and
    no PREFECT_API_URL, as `make run-flow` on a fresh machine."""
    home = tmp_path / "prefect"
    home.mkdir()
    shutil.copyfile(prefect_db, home / "prefect.db")
    env = {**os.environ, "PREFECT_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    env.pop("PREFECT_API_URL", None)
    return env


def processes_using(home: str) -> list[list[str]]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("PREFECT_HOME") == home:
                found.append(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def test_a_flow_runs_on_the_temporary_server_and_its_runs_stay_in_prefect_home(tmp_path, prefect_db):
    env = own_prefect_home(tmp_path, prefect_db)
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=PROJECT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    api_url, configured = done.stdout.split()[-2:]
    assert api_url.startswith("http://127.0.0.1:") and configured == "None"  # not a server the user configured
    assert "temporary server on http://127.0.0.1:" in done.stderr
    assert processes_using(env["PREFECT_HOME"]) == []  # the server stopped with the process

    with sqlite3.connect(Path(env["PREFECT_HOME"]) / "prefect.db") as db:
        flow_state = db.execute("SELECT fr.state_type FROM flow_run fr JOIN flow f ON f.id = fr.flow_id "
                                "WHERE f.name = 'temporary-server-check'").fetchall()
        task_states = db.execute("SELECT state_type FROM task_run").fetchall()
        logs = db.execute("SELECT message FROM log").fetchall()
    assert flow_state == [("COMPLETED",)] and task_states == [("COMPLETED",)]
    assert ("logged to the temporary server",) in logs


def test_make_run_flows_entry_refuses_a_bad_recipe_and_leaves_no_server_behind(tmp_path, prefect_db):
    """The server starts before the recipe is read (while the flow's modules import): a refused recipe still
    exits 2 naming the field, and the server is stopped, not orphaned."""
    env = own_prefect_home(tmp_path, prefect_db)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"work_dir: {tmp_path}/artifacts\ntrain:\n  lr: -1\n")
    done = subprocess.run([sys.executable, "-m", "flows", "--config", str(recipe)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=PROJECT)
    assert done.returncode == 2 and "train.lr" in done.stdout, done.stdout + done.stderr
    assert processes_using(env["PREFECT_HOME"]) == []
