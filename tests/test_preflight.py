"""Preflight fails in seconds, naming the service, the URL (password masked) and the fix; it passes for live
endpoints and writable stores."""

from __future__ import annotations

import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from wattflow.preflight import (
    TEMPORARY_PREFECT_ENV,
    ServiceUnreachable,
    configured_prefect_api_url,
    mask_secrets,
    preflight,
)


def dead_url() -> str:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


class Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        ok = self.path in ("/health", "/api/health")
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b"OK" if ok else b"")

    def log_message(self, *args):
        pass


@pytest.fixture
def live_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_dead_mlflow_server_fails_in_seconds_naming_the_url_and_the_fix():
    url = dead_url()
    started = time.monotonic()
    with pytest.raises(ServiceUnreachable) as err:
        preflight(url, None)
    elapsed_s = time.monotonic() - started
    assert elapsed_s < 10  # the acceptance criterion (a refused connection takes milliseconds)
    message = str(err.value)
    assert message.startswith(f"MLflow tracking server at {url} is unreachable")
    assert "make server" in message and "unset MLFLOW_TRACKING_URI" in message


def test_a_dead_prefect_api_is_named_after_a_live_mlflow(live_url):
    api = dead_url() + "/api"
    with pytest.raises(ServiceUnreachable, match=f"Prefect API at {api} is unreachable.*unset PREFECT_API_URL"):
        preflight(live_url, api)
    preflight(live_url, live_url + "/api")  # both answer: no error


def test_a_password_in_the_url_is_masked_in_the_error():
    url = dead_url().replace("http://", "http://alice:hunter2pw@")
    with pytest.raises(ServiceUnreachable) as err:
        preflight(url, None)
    assert "hunter2pw" not in str(err.value) and "alice:***@127.0.0.1" in str(err.value)


def test_an_http_error_status_is_unreachable_too(live_url):
    with pytest.raises(ServiceUnreachable, match="HTTP 404"):
        preflight(live_url + "/elsewhere", None)


def test_local_stores_must_be_writable(tmp_path):
    preflight(f"sqlite:///{tmp_path}/new/dir/mlflow.db", None)  # creatable below a writable directory
    preflight(str(tmp_path / "mlruns"), None)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ServiceUnreachable, match="MLflow SQLite store.*is not a writable directory"):
        preflight(f"sqlite:///{blocker}/mlflow.db", None)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ServiceUnreachable, match="not a writable directory"):
            preflight(f"sqlite:///{locked}/mlflow.db", None)


def test_secrets_are_masked_in_urls_queries_and_env_values(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-s3cr3t-value")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # not a secret: "false" must survive
    text = "postgresql://bob:pa55word@db:5432/x?sslmode=require&password=qq123 token tok-s3cr3t-value false"
    assert mask_secrets(text) == "postgresql://bob:***@db:5432/x?sslmode=require&password=*** token *** false"


def test_the_temporary_prefect_server_is_no_configured_server(monkeypatch):
    """`python -m flows` points PREFECT_API_URL at the temporary server it starts and names it: the measured-stage
    slots must not lease Prefect limits there (it runs no service that expires leases), a worker's server must."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv(TEMPORARY_PREFECT_ENV, raising=False)
    assert configured_prefect_api_url() is None
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert configured_prefect_api_url() == "http://127.0.0.1:4200/api"
    monkeypatch.setenv(TEMPORARY_PREFECT_ENV, "http://127.0.0.1:4200/api")
    assert configured_prefect_api_url() is None
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example:4200/api")  # a worker started under that flow run
    assert configured_prefect_api_url() == "http://prefect.example:4200/api"
