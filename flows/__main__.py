"""`python -m flows [--config recipe.yaml]`: what `make run-flow` runs — `flows.pipeline`'s command line, with
Prefect's temporary server (when no PREFECT_API_URL is set) starting while the flow's modules import."""

import sys

from flows.temporary_server import start_in_background

server_ready = start_in_background()

from flows.pipeline import main  # noqa: E402 (after the server's start-up has begun)

try:
    code = main(server_ready=server_ready)
finally:
    server_ready(raise_error=False)  # also after an early exit (a bad recipe): no server process left behind
sys.exit(code)
