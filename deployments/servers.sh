#!/usr/bin/env bash
# Background Prefect server, MLflow tracking server and process workers for `make server|worker|stop`.
#   deployments/servers.sh server | worker | stop | status
# Every process runs in its own process group (set -m), its pid in $STATE/pids/<name>.pid and its output in
# $STATE/logs/<name>.log; `stop` signals each group once (SIGTERM), then SIGKILLs what is left after 30 s.
# The Makefile passes: STATE VENV PREFECT_PORT MLFLOW_PORT WATTFLOW_POOL WORKER_NAME MLFLOW_ARTIFACTS
# and optionally PREFECT_DB_URL (postgresql+asyncpg://...) and MLFLOW_DB_URL (postgresql://...).
set -euo pipefail

PIDS="$STATE/pids"
LOGS="$STATE/logs"
BIN="$VENV/bin"
PREFECT_API="http://127.0.0.1:$PREFECT_PORT/api"
MLFLOW_URI="http://127.0.0.1:$MLFLOW_PORT"
mkdir -p "$PIDS" "$LOGS"

# Passwords never reach the terminal: scheme://user:secret@host -> scheme://user:****@host
mask() { sed -E 's#(://[^:/@]*:)[^/]*@#\1****@#' <<<"$1"; }

pid_of() { [[ -f "$PIDS/$1.pid" ]] && cat "$PIDS/$1.pid"; }
running() { local pid; pid=$(pid_of "$1") && kill -0 "$pid" 2>/dev/null; }

launch() {  # launch NAME CMD...: in the background, in its own process group
  local name=$1; shift
  if running "$name"; then
    echo "$name: already running (pid $(pid_of "$name"))"
    return 1
  fi
  set -m
  "$@" >>"$LOGS/$name.log" 2>&1 &
  echo $! >"$PIDS/$name.pid"
  set +m
}

wait_healthy() {  # wait_healthy NAME URL: until URL answers 200, the process died, or 120 s passed
  local name=$1 url=$2
  for _ in $(seq 240); do
    if curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; then return 0; fi
    if ! running "$name"; then
      echo "$name exited; last lines of $LOGS/$name.log:" >&2
      tail -n 30 "$LOGS/$name.log" >&2
      rm -f "$PIDS/$name.pid"
      return 1
    fi
    sleep 0.5
  done
  echo "$name did not answer $url within 120 s; see $LOGS/$name.log" >&2
  return 1
}

start_server() {
  local prefect_db="${PREFECT_DB_URL:-}" mlflow_db="${MLFLOW_DB_URL:-sqlite:///$STATE/mlflow.db}"
  local host="${BIND_HOST:-127.0.0.1}"
  case "$host" in
    127.0.0.1|localhost|::1) ;;
    *) echo "WARNING: BIND_HOST=$host: both servers accept connections from the network, unauthenticated;" \
            "put them behind a TLS and authenticating proxy" >&2 ;;
  esac
  # Database URLs travel in the environment, never on a command line (`ps` shows every argument to all users).
  [ -n "$prefect_db" ] && export PREFECT_API_DATABASE_CONNECTION_URL="$prefect_db"
  export MLFLOW_BACKEND_STORE_URI="$mlflow_db"
  if launch prefect-server "$BIN/prefect" server start --host "$host" --port "$PREFECT_PORT"; then
    echo "Prefect server starting (database: $(mask "${prefect_db:-sqlite in $PREFECT_HOME}"))"
  fi
  if launch mlflow-server "$BIN/mlflow" server \
      --artifacts-destination "$MLFLOW_ARTIFACTS" --host "$host" --port "$MLFLOW_PORT" --workers 1; then
    echo "MLflow server starting (store: $(mask "$mlflow_db"), artifacts: $(mask "$MLFLOW_ARTIFACTS"))"
  fi
  wait_healthy prefect-server "$PREFECT_API/health"
  wait_healthy mlflow-server "$MLFLOW_URI/health"
  echo "Prefect UI:  http://127.0.0.1:$PREFECT_PORT   (flow runs, deployments, work pools; log $LOGS/prefect-server.log)"
  echo "MLflow UI:   $MLFLOW_URI   (experiments and runs; log $LOGS/mlflow-server.log)"
  echo "Next: make deploy && make worker"
}

start_worker() {
  local name="worker-$WORKER_NAME"
  # The pull step of every deployment cds into WATTFLOW_PROJECT_DIR: this checkout.
  launch "$name" env PREFECT_API_URL="$PREFECT_API_URL" MLFLOW_TRACKING_URI="$WORKER_MLFLOW_URI" \
    WATTFLOW_PROJECT_DIR="$PROJECT_DIR" \
    "$BIN/prefect" worker start --pool "$WATTFLOW_POOL" --type process --name "$WORKER_NAME" || return 0
  sleep 3
  if ! running "$name"; then
    echo "$name exited; last lines of $LOGS/$name.log:" >&2
    tail -n 30 "$LOGS/$name.log" >&2
    exit 1
  fi
  echo "worker $WORKER_NAME on pool '$WATTFLOW_POOL' (pid $(pid_of "$name"), GPUs: ${CUDA_VISIBLE_DEVICES:-all})"
  echo "  Prefect $PREFECT_API_URL, MLflow $(mask "$WORKER_MLFLOW_URI"), log $LOGS/$name.log"
}

stop_all() {
  local stopped=0 f name pid
  # Workers first: their flow runs still report to the servers while they stop.
  for f in "$PIDS"/worker-*.pid "$PIDS"/prefect-server.pid "$PIDS"/mlflow-server.pid; do
    [[ -f "$f" ]] || continue
    name=$(basename "$f" .pid); pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
      for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      if kill -0 "$pid" 2>/dev/null; then
        echo "$name (pid $pid) ignored SIGTERM for 30 s: SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || true
      fi
      echo "stopped $name (pid $pid)"
      stopped=1
    fi
    rm -f "$f"
  done
  [[ $stopped == 1 ]] || echo "nothing to stop (no live pid in $PIDS)"
}

status() {
  local f
  for f in "$PIDS"/*.pid; do
    [[ -f "$f" ]] || { echo "nothing started"; return; }
    if kill -0 "$(cat "$f")" 2>/dev/null; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"
    else echo "$(basename "$f" .pid): not running (stale pid file)"; fi
  done
}

case "${1:-}" in
  server) start_server ;;
  worker) start_worker ;;
  stop) stop_all ;;
  status) status ;;
  *) echo "usage: $0 server|worker|stop|status" >&2; exit 2 ;;
esac
