"""Whether MLflow can be reached, and the process-wide offline state per journal: once a write finds MLflow
unreachable, every tracker on that journal stays offline, so no later stage waits on a dead server again."""

from __future__ import annotations

import re
import threading

import mlflow


class OfflineState:
    """Process-wide state per journal: which journals went offline (and why), each run's experiment, and the
    experiment ids already looked up."""

    lock = threading.Lock()
    offline: dict = {}                      # journal path -> the error that took it offline
    run_experiment: dict[str, str | None] = {}
    experiments: dict[tuple[str, str], str] = {}  # (tracking uri, name) -> id


class OfflineRunError(RuntimeError):
    """A run created while MLflow was unreachable, addressed by a tracker that has no journal."""


CONNECTION_ERROR_TEXT = re.compile(r"max retries exceeded|connection refused|failed to establish|timed out|"
                                   r"remotedisconnected|connection aborted|too many \d+ error responses", re.I)


def is_unreachable(err: BaseException) -> bool:
    """A connection-level failure (MLflow down, network gone, the store's database unreachable), as opposed
    to MLflow refusing the write itself (an invalid value), which must still raise."""
    import requests
    import urllib3

    try:
        from sqlalchemy.exc import OperationalError
    except ImportError:  # pragma: no cover - sqlalchemy ships with mlflow
        OperationalError = ()  # noqa: N806
    kinds = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError,
             urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OperationalError)
    seen: BaseException | None = err
    for _ in range(10):  # MLflow re-raises as MlflowException, often without `from`: follow both links
        if seen is None:
            break
        if isinstance(seen, kinds):
            return True
        if isinstance(seen, mlflow.exceptions.MlflowException) and CONNECTION_ERROR_TEXT.search(str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
