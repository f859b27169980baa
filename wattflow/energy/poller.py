"""A reference-counted background poller: one daemon thread per backend, alive only while a window is open.

Windows call `acquire()` when they open and `release()` when they close; nested or concurrent windows
share the thread. The thread calls `poll()` every `period_s` (first call one period after it starts);
backends also poll at every window edge, so the thread only has to fill the gaps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_JOIN_TIMEOUT_S = 5.0  # a poll stuck in a driver call must not hang the pipeline; the thread is a daemon


class Poller:
    def __init__(self, poll: Callable[[], None], period_s: float, name: str,
                 on_start: Callable[[], None] = lambda: None):
        if not period_s > 0:
            raise ValueError(f"{name}: poll period must be > 0 s, got {period_s}")
        self._poll, self.period_s, self.name, self._on_start = poll, period_s, name, on_start
        self._lock = threading.Lock()
        self._users = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def acquire(self) -> None:
        with self._lock:
            if self._users == 0:
                self._on_start()  # if this raises, nothing is held
                self._stop = threading.Event()  # a fresh event: the previous thread may still be winding down
                self._thread = threading.Thread(target=self._run, args=(self._stop,), name=self.name, daemon=True)
                self._thread.start()
            self._users += 1

    def release(self) -> None:
        with self._lock:
            if self._users == 0:
                raise RuntimeError(f"{self.name}: release() without acquire()")
            self._users -= 1
            if self._users > 0:
                return
            self._stop.set()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(_JOIN_TIMEOUT_S)

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.period_s):
            try:
                self._poll()
            except Exception:  # retried next period; the reads at the window edges report persistent errors
                pass
