"""`python -m flows [--config recipe.yaml]`: what `make run-flow` runs — `flows.pipeline`'s command line, with
Prefect's temporary server (when no PREFECT_API_URL is set) starting while the flow's modules import."""

import sys

from flows.temporary_server import start_in_background

server = start_in_background()  # stopped when this process exits, also after an early exit (a bad recipe)

from flows.pipeline import main  # noqa: E402 (after the server's start-up has begun)

sys.exit(main(server_ready=server.wait))
