"""Preflight: before any expensive work, check that the MLflow store and the Prefect API answer, and fail in
seconds with the URL and the fix (MLflow's own client retries for minutes on a dead server).

    python -m wattflow.preflight      # checks $MLFLOW_TRACKING_URI and, when set, $PREFECT_API_URL

Also home to the secret masking every log line and tracked value goes through: URLs keep their user but
lose their password, and values of secret-looking environment variables (tokens, passwords) are blanked.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

import requests

MLFLOW_FIX = "start it with make server, or unset MLFLOW_TRACKING_URI to use the local SQLite store"
PREFECT_FIX = "start it with make server, or unset PREFECT_API_URL to let the flow start a local Prefect server"

_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<password>[^@/\s]+)@")
_QUERY_SECRET = re.compile(r"(?P<head>[?&;](?:password|passwd|token|secret|api_key|apikey|access_token)=)[^&\s]+",
                           re.IGNORECASE)
# Whole words of the name only: TOKENIZERS_PARALLELISM=false is no secret, and masking "false" would garble params.
_SECRET_ENV_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|SECRET_KEY|CREDENTIALS?)($|_)",
                              re.IGNORECASE)
_NOT_SECRET_VALUES = {"true", "false", "none", "null", "yes", "no", "on", "off"}
MASK = "***"


# `python -m flows` points its own process at the temporary Prefect server it starts through PREFECT_API_URL
# (flows.temporary_server), and names that URL here too: it is no server the user configured.
TEMPORARY_PREFECT_ENV = "WATTFLOW_TEMPORARY_PREFECT_API_URL"


def configured_prefect_api_url() -> str | None:
    """PREFECT_API_URL as the user set it (`make server`, a worker's environment); None when it is unset or is
    the temporary server of `python -m flows`, which runs no service that expires concurrency leases."""
    url = os.environ.get("PREFECT_API_URL")
    return url if url and url != os.environ.get(TEMPORARY_PREFECT_ENV) else None


class ServiceUnreachable(RuntimeError):
    """A tracking or orchestration endpoint that does not answer; the message names it, its URL and the fix."""


def secret_env_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables, longest first (so no partial masks are left)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if _SECRET_ENV_NAME.search(k) and len(v) >= 6
              and v.lower() not in _NOT_SECRET_VALUES and not v.isdigit()}
    return sorted(values, key=len, reverse=True)


def mask_secrets(text: str) -> str:
    """`text` with URL passwords, secret query parameters and secret environment values replaced by ***."""
    text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK + "@", text)
    text = _QUERY_SECRET.sub(lambda m: m["head"] + MASK, text)
    for value in secret_env_values():
        text = text.replace(value, MASK)
    return text


def _unreachable(service: str, url: str, cause: str, fix: str) -> ServiceUnreachable:
    return ServiceUnreachable(f"{service} at {mask_secrets(url)} is unreachable: {mask_secrets(cause)}. Fix: {fix}")


def check_http(service: str, base_url: str, fix: str, timeout_s: float) -> None:
    """One GET of <base_url>/health, no retries: a live server answers in milliseconds."""
    url = base_url.rstrip("/") + "/health"
    try:
        response = requests.get(url, timeout=timeout_s)
    except requests.RequestException as err:
        raise _unreachable(service, base_url, f"{type(err).__name__}: {err}", fix) from None
    if response.status_code != 200:
        raise _unreachable(service, base_url, f"GET {url} answered HTTP {response.status_code}", fix)


def check_writable_path(service: str, uri: str, path: Path, fix: str) -> None:
    """A file store works when its nearest existing ancestor is a writable directory (the rest is created)."""
    if path.exists():
        target = path if path.is_dir() else path.parent
        if path.is_file() and not os.access(path, os.W_OK):
            raise _unreachable(service, uri, f"{path} is not writable", fix)
    else:
        target = path.parent
        while not target.exists():
            target = target.parent
    if not target.is_dir() or not os.access(target, os.W_OK | os.X_OK):
        raise _unreachable(service, uri, f"{target} is not a writable directory", fix)


def check_tcp(service: str, uri: str, host: str, port: int, fix: str, timeout_s: float) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        raise _unreachable(service, uri, f"cannot connect to {host}:{port} ({err})", fix) from None


DEFAULT_DB_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


def check_mlflow(tracking_uri: str, timeout_s: float = 3.0) -> None:
    parts = urlsplit(tracking_uri)
    scheme = parts.scheme.split("+")[0].lower()  # postgresql+psycopg2 -> postgresql
    if scheme in ("http", "https"):
        check_http("MLflow tracking server", tracking_uri, MLFLOW_FIX, timeout_s)
    elif scheme == "sqlite":
        db = tracking_uri.removeprefix("sqlite:///")
        if db and db != ":memory:" and not tracking_uri.startswith("sqlite:///:memory:"):
            check_writable_path("MLflow SQLite store", tracking_uri, Path(db), MLFLOW_FIX)
    elif scheme in ("file", ""):
        check_writable_path("MLflow file store", tracking_uri, Path(parts.path or tracking_uri), MLFLOW_FIX)
    elif scheme in DEFAULT_DB_PORTS and parts.hostname:
        check_tcp("MLflow database", tracking_uri, parts.hostname, parts.port or DEFAULT_DB_PORTS[scheme],
                  MLFLOW_FIX, timeout_s)
    # Other schemes (databricks, ...) authenticate in their own ways: their client reports their errors.


def bound_mlflow_retries(retries: int = 2) -> None:
    """MLflow's default (7 retries, exponential back-off) blocks a client for minutes on a dead server: the flow
    and `wattflow.sync` use `retries` unless MLFLOW_HTTP_REQUEST_MAX_RETRIES is set (the Makefile sets it)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))


def preflight(tracking_uri: str, prefect_api_url: str | None, timeout_s: float = 3.0) -> None:
    """Raise ServiceUnreachable within about `timeout_s` per service when the MLflow store or (when set)
    the Prefect API cannot be used."""
    check_mlflow(tracking_uri, timeout_s)
    if prefect_api_url:
        check_http("Prefect API", prefect_api_url, PREFECT_FIX, timeout_s)


def main() -> int:
    import mlflow

    try:
        preflight(mlflow.get_tracking_uri(), os.environ.get("PREFECT_API_URL"))
    except ServiceUnreachable as err:
        print(err, file=sys.stderr)
        return 3
    print("MLflow and Prefect endpoints answer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
