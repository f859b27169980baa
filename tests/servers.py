"""Real servers and workers for tests, on loopback and free ports, each stopped by its process group.

    with prefect_server_process(tmp / "prefect", migrated_prefect_db(tmp / "db" / "prefect.db")) as prefect, \
            deployed_stack(tmp, prefect) as stack, process_worker(stack.worker_env, stack.pool, tmp / "w.log"):
        ...

Every process runs in its own session (process group), so stopping it also stops what it started (the
uvicorn workers of a server, the flow-run subprocesses of a worker, torchrun and its ranks). The context
managers stop them in `finally`, also when the test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
PROJECT = Path(__file__).resolve().parents[1]
HEADLESS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
            "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT,
                                start_new_session=True)


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left of it after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; children that outlived it still share the group id
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        break


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}:\n{tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s:\n{tail(log_path)}")


@dataclass(frozen=True)
class PrefectServer:
    api_url: str
    env: dict[str, str]   # what a client, CLI or worker needs to talk to this server
    log_path: Path


def migrated_prefect_db(path: Path) -> Path:
    """A Prefect SQLite database at `path`, migrated to this Prefect's schema. Servers start on copies of it: a
    server on a fresh database spends ~13 s of its start migrating it on 2 cores, on a copy ~1 s."""
    path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **HEADLESS, "PREFECT_HOME": str(path.parent / "home"),
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{path}"}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([str(BIN / "prefect"), "server", "database", "upgrade", "-y"], env=env, cwd=PROJECT,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0 or not path.is_file():
        raise RuntimeError(f"migrating {path} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return path


@contextmanager
def prefect_server_process(root: Path, db_template: Path) -> Iterator[PrefectServer]:
    """A Prefect server (API and services, no UI) on a free loopback port, on a copy of `db_template`."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(db_template, root / "prefect.db")
    port, log_path = free_port(), root / "server.log"
    env = {**os.environ, **HEADLESS, "PREFECT_HOME": str(root / "prefect-home"),
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root}/prefect.db",
           "PREFECT_SERVER_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
                 log_path)
    try:
        api_url = f"http://127.0.0.1:{port}/api"
        wait_healthy(f"{api_url}/health", proc, log_path)
        client_env = {**os.environ, **HEADLESS, "PREFECT_HOME": str(root / "client-home"), "PREFECT_API_URL": api_url}
        yield PrefectServer(api_url, client_env, log_path)
    finally:
        stop(proc)


def start_mlflow_server(root: Path, port: int, db_template: Path | None = None, wait: bool = True
                        ) -> subprocess.Popen:
    """An MLflow tracking server (one worker, artifacts proxied into `root`/mlartifacts) on loopback `port`, its
    store `root`/mlflow.db (a copy of `db_template` when there is none yet); returns once /health answers, or at once
    with wait=False (then `wait_healthy` before using it)."""
    root.mkdir(parents=True, exist_ok=True)
    if db_template is not None and not (root / "mlflow.db").exists():
        shutil.copyfile(db_template, root / "mlflow.db")
    env = {**os.environ, **HEADLESS, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # 5 job workers: CPU
    proc = start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                  "--artifacts-destination", str(root / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
                  "--workers", "1"], env, root / "server.log")
    if wait:
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health", proc, root / "server.log")
        except BaseException:
            stop(proc)
            raise
    return proc


@contextmanager
def mlflow_server(root: Path, db_template: Path | None = None, before_ready: Callable[[], None] = lambda: None
                  ) -> Iterator[str]:
    """`start_mlflow_server` on a free port, stopped on exit; yields its URI. `before_ready` runs while the server
    starts (its start-up is mostly waiting on imports: other set-up can use that time)."""
    port = free_port()
    proc = start_mlflow_server(root, port, db_template, wait=False)
    try:
        before_ready()
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, root / "server.log")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@contextmanager
def model_server(model_uri: str, tracking_uri: str, log_path: Path) -> Iterator[str]:
    """`mlflow models serve` (what `make serve` runs) for `model_uri` on a free loopback port; yields its URL."""
    port = free_port()
    # MLflow starts `uvicorn` by name: the environment's bin directory must be on PATH
    env = {**os.environ, **HEADLESS, "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = start([str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                  "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], env, log_path)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(f"{url}/ping", proc, log_path)
        yield url
    finally:
        stop(proc)


def prefect_cli(args: list[str], env: dict[str, str], timeout_s: float = 180.0) -> str:
    """Run the `prefect` CLI against a server; raise with its output when it fails."""
    done = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], env=env, cwd=PROJECT, text=True,
                          capture_output=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


@contextmanager
def process_worker(env: dict[str, str], pool: str, log_path: Path, name: str = "worker",
                   limit: int | None = None) -> Iterator[subprocess.Popen]:
    """A process worker polling `pool` every second; its flow runs start in the project directory."""
    worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "2",
                  "WATTFLOW_PROJECT_DIR": str(PROJECT)}
    cmd = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    proc = start(cmd, worker_env, log_path)
    try:
        yield proc
    finally:
        # Its flow runs are over by now; Prefect's worker takes up to ~20 s to wind down on SIGTERM, which no
        # test looks at: a short grace, then its process group is killed.
        stop(proc, grace_s=3.0)


@dataclass(frozen=True)
class Stack:
    prefect: PrefectServer
    mlflow_uri: str
    pool: str
    root: Path

    @property
    def worker_env(self) -> dict[str, str]:
        return {**self.prefect.env, "MLFLOW_TRACKING_URI": self.mlflow_uri}


@contextmanager
def deployed_stack(root: Path, prefect: PrefectServer, pool: str = "test-gpu", names: list[str] | None = None,
                   mlflow_db: Path | None = None) -> Iterator[Stack]:
    """An MLflow server beside the Prefect server `prefect`, the process pool `pool`, and the deployments `names`
    (default: all) of deployments/prefect.yaml, created with the CLI commands `make deploy` runs."""
    def pool_and_deployments() -> None:
        prefect_cli(["work-pool", "create", pool, "--type", "process"], prefect.env)
        which = ["--all"] if names is None else [a for name in names for a in ("--name", name)]
        prefect_cli(["deploy", *which, "--prefect-file", "deployments/prefect.yaml"],
                    {**prefect.env, "WATTFLOW_POOL": pool})

    with mlflow_server(root / "mlflow", mlflow_db, before_ready=pool_and_deployments) as mlflow_uri:
        yield Stack(prefect, mlflow_uri, pool, root)
