# wattflow — every target sets up .venv first (created when missing, reinstalled when pyproject.toml changes).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STATE  := $(CURDIR)/.wattflow

# Headless and offline: no analytics, no telemetry (MLflow ignores DO_NOT_TRACK=1, hence "true").
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
# A dead tracking server would otherwise block a client for minutes of retries (and 120 s per request).
export MLFLOW_HTTP_REQUEST_MAX_RETRIES ?= 2
export MLFLOW_HTTP_REQUEST_TIMEOUT ?= 30
# wattflow's own warnings (an MLflow outage, its sync command) reach the Prefect UI's logs too.
export PREFECT_LOGGING_EXTRA_LOGGERS ?= wattflow
# ...and outside a flow run (make sync) they stay local instead of warning that there is no run to send to.
export PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW ?= ignore
# Honour the user's servers; otherwise keep every bit of state under the project.
export MLFLOW_TRACKING_URI ?= sqlite:///$(STATE)/mlflow.db
export PREFECT_HOME ?= $(STATE)/prefect

# make test / test-fast: pytest-xdist workers (one compute thread each; tests/conftest.py).
TEST_WORKERS ?= 2

MLFLOW_PORT  ?= 5000
PREFECT_PORT ?= 4200
# make serve: the registered champion over HTTP (MLflow's model server), on loopback.
MODEL        ?= wattflow-digits
ALIAS        ?= champion
SERVE_PORT   ?= 5001

# make server / deploy / worker / stop (deployments/servers.sh; deployments/README.md explains each name).
WATTFLOW_POOL    ?= gpu
# make server binds loopback unless told otherwise (BIND_HOST=<an address of this host>, behind an authenticating proxy).
BIND_HOST        ?= 127.0.0.1
WORKER_NAME      ?= $(shell hostname)
MLFLOW_ARTIFACTS ?= $(STATE)/mlartifacts
# PREFECT_DB_URL (postgresql+asyncpg://...) and MLFLOW_DB_URL (postgresql://...): PostgreSQL instead of SQLite.
# deploy and worker talk to `make server` unless PREFECT_API_URL names another server; the worker logs to the
# MLflow server unless MLFLOW_TRACKING_URI was set by you (not by the default above).
SERVER_API := $(or $(PREFECT_API_URL),http://127.0.0.1:$(PREFECT_PORT)/api)
WORKER_MLFLOW_URI := $(if $(filter file,$(origin MLFLOW_TRACKING_URI)),http://127.0.0.1:$(MLFLOW_PORT),$(MLFLOW_TRACKING_URI))
SERVERS_SH = STATE="$(STATE)" VENV="$(CURDIR)/$(VENV)" BIND_HOST="$(BIND_HOST)" PROJECT_DIR="$(CURDIR)" PREFECT_PORT=$(PREFECT_PORT) \
	MLFLOW_PORT=$(MLFLOW_PORT) WATTFLOW_POOL="$(WATTFLOW_POOL)" WORKER_NAME="$(WORKER_NAME)" \
	MLFLOW_ARTIFACTS="$(MLFLOW_ARTIFACTS)" PREFECT_API_URL="$(SERVER_API)" WORKER_MLFLOW_URI="$(WORKER_MLFLOW_URI)" \
	bash deployments/servers.sh

.PHONY: help setup state example-data run-flow test test-fast lint bench gpu-check mlflow-ui prefect-ui serve screenshots server deploy worker stop sync clean \
	distclean

help:
	@echo "make run-flow [CONFIG=recipe.yaml]  run the whole pipeline here (sets up .venv first)"
	@echo "make example-data                   write examples/bring-your-own/images (RGB digits, no download)"
	@echo "make test                           run the test suite"
	@echo "make test-fast                      the inner loop: no torchrun ranks, servers, flows or multi-model claims"
	@echo "make lint                           ruff"
	@echo "make bench [BENCH=quick]            benchmarks -> bench/results/*.json + SUMMARY.md"
	@echo "make gpu-check                      on an NVIDIA GPU: counter vs power-integral energy"
	@echo "make mlflow-ui                      MLflow UI on http://127.0.0.1:$(MLFLOW_PORT)"
	@echo "make prefect-ui                     Prefect server + UI on http://127.0.0.1:$(PREFECT_PORT)"
	@echo "make screenshots                    docs/img/*.png of the Prefect and MLflow UIs for the latest run (headless chromium)"
	@echo "make serve [MODEL=... ALIAS=...]    models:/$(MODEL)@$(ALIAS) over HTTP on http://127.0.0.1:$(SERVE_PORT)/invocations"
	@echo "make server                         Prefect server :$(PREFECT_PORT) + MLflow server :$(MLFLOW_PORT) in the background"
	@echo "make deploy [WATTFLOW_POOL=gpu]     create the work pool if missing, deploy deployments/prefect.yaml"
	@echo "make worker [WORKER_NAME=...]       a process worker on the pool, in the background (one per GPU host)"
	@echo "make stop                           stop what server/worker started (by pid, .wattflow/pids)"
	@echo "make sync RUN_DIR=...               upload MLflow writes journaled while the server was unreachable"
	@echo "make clean | distclean              remove run state | and the virtual environment"

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

setup: $(VENV)/.installed

state:
	@mkdir -p $(STATE)

# The example image folder (examples/bring-your-own/images) is written from scikit-learn's bundled digits.
EXAMPLE_IMAGES := examples/bring-your-own/images
$(EXAMPLE_IMAGES): | setup
	$(PY) -m wattflow.datasets.sample_images $@ --mode RGB --size 32

example-data: $(EXAMPLE_IMAGES)

run-flow: setup state $(if $(and $(CONFIG),$(shell grep -l '$(EXAMPLE_IMAGES)' $(CONFIG) 2>/dev/null)),$(EXAMPLE_IMAGES))
	@echo "MLflow store: $$MLFLOW_TRACKING_URI"
	@echo "Prefect: $${PREFECT_API_URL:-local server, state in $$PREFECT_HOME}"
	$(PY) -m flows $(if $(CONFIG),--config "$(CONFIG)")

test: setup state
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

test-fast: setup state
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not integration and not claim" -q --hypothesis-profile=fast

lint: setup
	$(VENV)/bin/ruff check wattflow flows tasks tests bench examples

bench: setup
	$(PY) -m bench.run $(if $(filter quick,$(BENCH)),--quick)

gpu-check:  # installs nothing: run it where torch has CUDA (python -m wattflow.gpu_check)
	@test -x $(PY) || { echo "no $(PY): run 'python -m wattflow.gpu_check' in an environment with a CUDA build of torch"; exit 2; }
	$(PY) -m wattflow.gpu_check

mlflow-ui: setup state
	$(VENV)/bin/mlflow ui --backend-store-uri "$$MLFLOW_TRACKING_URI" --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

serve: setup state
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/mlflow models serve -m "models:/$(MODEL)@$(ALIAS)" --env-manager local --host 127.0.0.1 \
		--port $(SERVE_PORT) --workers 1

screenshots: setup state
	$(PY) deployments/screenshots.py

prefect-ui: setup state
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

server: setup state
	@$(SERVERS_SH) server

deploy: setup
	@export PREFECT_API_URL="$(SERVER_API)"; \
	echo "Prefect API: $$PREFECT_API_URL; work pool: $(WATTFLOW_POOL)"; \
	$(VENV)/bin/prefect work-pool inspect "$(WATTFLOW_POOL)" >/dev/null 2>&1 || \
		$(VENV)/bin/prefect work-pool create "$(WATTFLOW_POOL)" --type process; \
	WATTFLOW_POOL="$(WATTFLOW_POOL)" $(VENV)/bin/prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml

worker: setup state
	@$(SERVERS_SH) worker

stop:
	@$(SERVERS_SH) stop

sync: setup
	@test -n "$(RUN_DIR)" || { echo "usage: make sync RUN_DIR=.wattflow/artifacts/<flow-run-id>"; exit 2; }
	$(PY) -m wattflow.sync "$(RUN_DIR)"

clean: stop
	rm -rf $(STATE) mlruns .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
