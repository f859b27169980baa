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
# A dead tracking server would otherwise block a client for minutes of retries.
export MLFLOW_HTTP_REQUEST_MAX_RETRIES ?= 2
# Honour the user's servers; otherwise keep every bit of state under the project.
export MLFLOW_TRACKING_URI ?= sqlite:///$(STATE)/mlflow.db
export PREFECT_HOME ?= $(STATE)/prefect

MLFLOW_PORT  ?= 5000
PREFECT_PORT ?= 4200

.PHONY: help setup state run-flow test lint bench gpu-check mlflow-ui prefect-ui clean distclean

help:
	@echo "make run-flow [CONFIG=recipe.yaml]  run the whole pipeline here (sets up .venv first)"
	@echo "make test                           run the test suite"
	@echo "make lint                           ruff"
	@echo "make bench [BENCH=quick]            benchmarks -> bench/results/*.json + SUMMARY.md"
	@echo "make gpu-check                      on an NVIDIA GPU: counter vs power-integral energy"
	@echo "make mlflow-ui                      MLflow UI on http://127.0.0.1:$(MLFLOW_PORT)"
	@echo "make prefect-ui                     Prefect server + UI on http://127.0.0.1:$(PREFECT_PORT)"
	@echo "make clean | distclean              remove run state | and the virtual environment"

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

setup: $(VENV)/.installed

state:
	@mkdir -p $(STATE)

run-flow: setup state
	@echo "MLflow store: $$MLFLOW_TRACKING_URI"
	@echo "Prefect: $${PREFECT_API_URL:-local server, state in $$PREFECT_HOME}"
	$(PY) -m flows.pipeline $(if $(CONFIG),--config "$(CONFIG)")

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check wattflow flows tasks tests bench

bench: setup
	$(PY) -m bench.run $(if $(filter quick,$(BENCH)),--quick)

gpu-check: setup
	$(PY) -m wattflow.gpu_check

mlflow-ui: setup state
	$(VENV)/bin/mlflow ui --backend-store-uri "$$MLFLOW_TRACKING_URI" --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

prefect-ui: setup state
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

clean:
	rm -rf $(STATE) mlruns .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
