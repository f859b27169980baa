"""The terminal front end of `make run-flow`: progress bars for training and the variants, with Prefect's
log lines scrolling above them (its console handler is pointed at the same rich Console for the run)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.logging.handlers import PrefectConsoleHandler
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tasks.progress import add_listener


def prefect_console_handlers() -> list[PrefectConsoleHandler]:
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in logging.Logger.manager.loggerDict)]
    return [h for lg in loggers for h in getattr(lg, "handlers", []) if isinstance(h, PrefectConsoleHandler)]


@contextmanager
def progress_bars(console: Console) -> Iterator[None]:
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console)
    bars: dict[str, int] = {}

    def on_event(bar: str, completed: float, total: float, description: str) -> None:
        if bar not in bars:
            bars[bar] = progress.add_task(description, total=total)
        progress.update(bars[bar], completed=completed, total=total, description=description)

    handlers = prefect_console_handlers()
    saved = [h.console for h in handlers]
    remove = add_listener(on_event)
    try:
        for handler in handlers:
            handler.console = console
        with progress:
            yield
    finally:
        remove()
        for handler, original in zip(handlers, saved, strict=True):
            handler.console = original
