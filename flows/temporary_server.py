"""Prefect's temporary server, started before the flow's modules are imported, so that its start-up (a
subprocess that imports Prefect's server, migrates the SQLite database and answers /health: ~4 s on 2 cores)
overlaps with theirs (~5 s: torch, Prefect, MLflow) instead of following it.

    wait = start_in_background()     # first thing, before importing flows.pipeline
    ...
    wait()                           # before the flow's first API call; re-raises a failed start
    wait(raise_error=False)          # before exiting, also early: a start under way completes (and is stopped
                                     # at exit) instead of leaving a server process behind
"""

from __future__ import annotations

import threading
from collections.abc import Callable


def start_in_background() -> Callable[..., None]:
    """Start the server the flow would start itself (there is no PREFECT_API_URL) in a thread. Prefect keeps one
    such server per process, so the flow then finds it running."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return lambda raise_error=True: None
    from prefect.server.api.server import SubprocessASGIServer

    failed: list[BaseException] = []

    def start() -> None:
        try:
            SubprocessASGIServer().start()
        except BaseException as err:  # re-raised by wait(), in the caller's thread
            failed.append(err)

    thread = threading.Thread(target=start, name="prefect-temporary-server", daemon=True)
    thread.start()

    def wait(raise_error: bool = True) -> None:
        thread.join()
        if failed and raise_error:
            raise failed[0]

    return wait
