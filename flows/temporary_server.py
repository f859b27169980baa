"""Prefect's temporary server for `python -m flows` (`make run-flow`) when no PREFECT_API_URL is set, started
first thing, so that its start-up (a subprocess that imports Prefect's server, checks the SQLite database and
answers /health: ~4 s on 2 cores) overlaps with the flow's imports (~5 s: torch, Prefect, MLflow).

Prefect would start the same server itself (`SubprocessASGIServer`, at the flow's first API call), but only
after importing its whole server application into the flow's process to do so: ~3 s of CPU on every run, for a
command line. This runs Prefect's own command for it instead — uvicorn on `prefect.server.api.server:create_app`
with the environment Prefect's temporary server gets (no UI, the temporary server's set of services) — and
points this process at it through PREFECT_API_URL; the server stops when the process exits.

    server = start_in_background()   # first thing, before importing flows.pipeline
    ...
    server.wait()                    # before the flow's first API call; raises if the server did not start
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time

import httpx
from prefect.context import refresh_global_settings_context
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, get_current_settings

from wattflow.preflight import TEMPORARY_PREFECT_ENV

# What Prefect's SubprocessASGIServer gives its server (prefect 3.9): no UI, and the temporary server's services
EPHEMERAL_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
PORT_IN_USE = 3  # uvicorn's exit code when the port was taken between choosing it and binding it


class TemporaryServer:
    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.api_url = ""
        atexit.register(self.stop)
        self._launch()

    def _launch(self) -> None:
        # wattflow.distributed.free_port does the same, but importing it imports torch (~2 s before the launch)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True), **EPHEMERAL_ENV}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host",
             "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"], env=env)
        self.api_url = f"http://127.0.0.1:{port}/api"

    def _point_prefect_here(self) -> None:
        os.environ["PREFECT_API_URL"] = os.environ[TEMPORARY_PREFECT_ENV] = self.api_url
        # The server serves no UI: flow-run links point where `make prefect-ui` (`prefect server start`) shows it
        os.environ.setdefault("PREFECT_UI_URL", "http://127.0.0.1:4200")
        refresh_global_settings_context()  # Prefect read its settings at import: make it see the new URL

    def wait(self) -> None:
        """Until the server answers /health, then point this process's Prefect at it (until then PREFECT_API_URL
        stays as the user left it: unset); RuntimeError if it does not start."""
        timeout_s = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        deadline = time.monotonic() + timeout_s
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                code = self.process.poll()
                if code == PORT_IN_USE:
                    self._launch()
                elif code is not None:
                    raise RuntimeError(f"Prefect's temporary server exited with code {code} before it answered (its "
                                       "output is above); run `make server` and set PREFECT_API_URL to use that")
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        self._point_prefect_here()
                        print(f"Prefect: temporary server on {self.api_url.removesuffix('/api')} for this run "
                              "(`make prefect-ui` shows the run afterwards)", file=sys.stderr)
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"Prefect's temporary server did not answer /health in {timeout_s} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # uvicorn shuts down cleanly: its services flush what they hold
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class RunningServer:
    """PREFECT_API_URL is set (a running `make server`, or Prefect Cloud): nothing to start or wait for."""
    process = None

    def wait(self) -> None:
        pass


def start_in_background() -> TemporaryServer | RunningServer:
    return TemporaryServer() if not PREFECT_API_URL.value() else RunningServer()
