"""Orchestration overhead: the same training + compression + evaluation run through the Prefect flow
(`flows.pipeline.main`, MLflow tracking) and as a bare script running the same stage loop
(`wattflow.stage_loop.run_stages` with plain stages) with the same torchrun ranks, without Prefect or MLflow.
Each run is a fresh subprocess timed whole; the flow runs once on Prefect's temporary server (as `make run-flow`)
and once against a running Prefect server (as with `make server`); median over runs of the flow/bare wall-time
ratio. Targets: <= 1.10; fixed overhead (imports, interpreter exit, server start) <= 8 s; orchestration beyond
imports and server start <= 2 s. The parts that are Prefect's and MLflow's own are also measured alone.

The flow side runs `python -m bench.orchestration --flow <yaml> <json>`, which does what `python -m flows`
(`make run-flow`) does — the temporary server starts while the modules import — with timers around the wait for
that server, every MlflowClient call, Tracker.log_model and the stage functions, then calls `flows.pipeline.main`
unchanged: that gives the breakdown (a wrapper costs microseconds).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
import yaml

STARTED = time.perf_counter()  # after the interpreter started, before the heavy imports
_local = threading.local()
TIMES: dict[str, float] = {}


def timed(category: str, fn):
    """Wrap `fn` so its time adds to TIMES[category]; nested timed calls count once, in the outermost."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if getattr(_local, "busy", False):
            return fn(*args, **kwargs)
        _local.busy, t0 = True, time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _local.busy = False
            TIMES[category] = TIMES.get(category, 0.0) + time.perf_counter() - t0
    return wrapper


STAGE_FUNCTIONS = ("train_stage", "step_stage", "evaluate_variant", "measure_variants")


def time_stages() -> None:
    """Both sides: the library's stage functions add to TIMES["stage_work"]."""
    from wattflow import stages

    for name in STAGE_FUNCTIONS:
        setattr(stages, name, timed("stage_work", getattr(stages, name)))


def run_bare(config: str, out: Path) -> None:
    """The pipeline's work without Prefect or MLflow: the library's stage loop (`wattflow.stage_loop`, the one
    the flow runs) with plain stages, then the library half of selection and its files."""
    from wattflow.config import load_config
    from wattflow.figures import comparison_csv, pareto_png
    from wattflow.report import summary_rows
    from wattflow.select import select_for
    from wattflow.stage_loop import BareStages, run_stages
    from wattflow.workloads import workload_for

    time_stages()
    cfg = load_config(config)
    ready = time.perf_counter()
    run_dir = Path(cfg.work_dir).resolve() / f"bare-{os.getpid()}"
    variants, figures, _ = run_stages(cfg, BareStages(cfg, run_dir))
    rows = summary_rows(variants, figures)
    selection = select_for(cfg, rows, figures, workload_for(cfg).budget_metric)
    pareto_png(rows, selection, run_dir / "pareto.png")
    comparison_csv(rows, selection, run_dir / "variants.csv")
    out.write_text(json.dumps({**TIMES, "variants": len(rows), "imports_s": ready - STARTED,
                               "in_process_s": time.perf_counter() - STARTED}))


def run_flow(config: str, out: Path) -> None:
    """What `make run-flow` runs (`python -m flows`: the temporary server starts while the modules import), with
    timers around the wait for that server, every MlflowClient call, Tracker.log_model and the stage functions."""
    from flows.temporary_server import start_in_background

    server_ready = start_in_background()
    from mlflow.tracking import MlflowClient

    from flows import pipeline
    from wattflow.tracking import Tracker

    for name in ("create_run", "log_batch", "log_dict", "log_artifact", "set_terminated", "get_run",
                 "get_experiment_by_name", "create_experiment", "log_inputs"):
        setattr(MlflowClient, name, timed("mlflow_logging", getattr(MlflowClient, name)))
    Tracker.__init__ = timed("mlflow_logging", Tracker.__init__)
    import prefect.concurrency._sync as prefect_slots  # the measured-stage slots' Prefect limits (a running server)

    prefect_slots.acquire_concurrency_slots_with_lease = timed(
        "slot_acquire", prefect_slots.acquire_concurrency_slots_with_lease)
    Tracker.log_model = timed("model_logging", Tracker.log_model)
    time_stages()
    flow_started = time.perf_counter()
    code = pipeline.main(["--config", config, "--json-out", str(out.with_suffix(".rows.json"))],
                         server_ready=timed("server_start", server_ready))
    server_ready(raise_error=False)
    out.write_text(json.dumps({**TIMES, "flow_call_s": time.perf_counter() - flow_started,
                               "imports_s": flow_started - STARTED,
                               "in_process_s": time.perf_counter() - STARTED}))
    sys.exit(code)


def one_run(side: str, config: Path, tmp: Path, env: dict, i: int) -> dict:
    out = tmp / f"{side}-{i}.json"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bench.orchestration", "--bare" if side == "bare" else "--flow",
                           str(config), str(out)],
                          env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"{side} run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - started
    return {"wall_s": wall, **json.loads(out.read_text())}


def workload(quick: bool, tmp: Path) -> dict:
    """Full: the default recipe's chains and evaluation; quick: one chain, short training. The cache is off:
    every flow run of a pair must do the work the bare run does, not reuse the previous pair's."""
    common = {"work_dir": str(tmp / "artifacts"), "cache": {"enabled": False}}
    if not quick:  # the default recipe on 4x the train split (shifted copies), 75 epochs: a ~50 s bare run here
        return {**common, "train": {"epochs": 75, "cpu_ranks": 2}, "data": {"augment_factor": 4}}
    return {**common, "train": {"epochs": 5, "cpu_ranks": 2}, "chains": ["prune:0.8 -> onnx-int8-static"],
            "prune": {"fine_tune_epochs": 1}}


def warm_up(env: dict) -> None:
    """Create the temp MLflow and Prefect databases once, untimed: a user's second run finds them there."""
    code = ("from prefect.server.api.server import SubprocessASGIServer; from wattflow.tracking import Tracker; "
            "Tracker().experiment_id('wattflow'); s = SubprocessASGIServer(); s.start(); s.stop()")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)


def wall_s(code: str, env: dict) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


EMPTY_TASKS = 20
EMPTY_FLOW = f"""
import time
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
@task(cache_policy=NO_CACHE)
def step(i): return i
@flow
def empty():
    t0 = time.perf_counter()
    for i in range({EMPTY_TASKS}): step(i)
    return time.perf_counter() - t0
print(empty())
"""


def isolated_parts(env: dict, rounds: int = 3) -> dict:
    """The parts of the overhead that are Prefect's and MLflow's own, each alone in a fresh interpreter, medians:
    importing both, the temporary server's start, and the cost of one empty task run in a flow."""
    server = ("import time; from prefect.server.api.server import SubprocessASGIServer; s = SubprocessASGIServer(); "
              "t0 = time.perf_counter(); s.start(); print(time.perf_counter() - t0); s.stop()")
    interpreter = [wall_s("pass", env) for _ in range(rounds)]
    imports = [wall_s("import prefect.flows, mlflow.tracking", env) for _ in range(rounds)]
    starts, per_task = [], []
    for _ in range(rounds):
        out = subprocess.run([sys.executable, "-c", server], env=env, check=True, capture_output=True, text=True)
        starts.append(float(out.stdout.split()[-1]))
        out = subprocess.run([sys.executable, "-c", EMPTY_FLOW], env=env, check=True, capture_output=True, text=True)
        per_task.append(float(out.stdout.split()[-1]) / EMPTY_TASKS)
    return {"import_prefect_mlflow_s": statistics.median(imports) - statistics.median(interpreter),
            "temporary_server_start_s": statistics.median(starts),
            "empty_task_run_s": statistics.median(per_task)}


@contextmanager
def prefect_server(env: dict, home: Path) -> Iterator[str]:
    """A running Prefect server (what `make server` starts), on a free port of 127.0.0.1; yields its API URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    log = open(home.parent / "prefect-server.log", "w")  # noqa: SIM115 (closed after the server stops)
    proc = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env={**env, "PREFECT_HOME": str(home)}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start; see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def breakdown_of(f: dict, b: dict) -> dict:
    """Where the flow's extra wall time goes: medians, flow minus bare (see breakdown_method)."""
    parts = {
        "imports_s": f["imports_s"] - b["imports_s"],
        "start_exit_s": (f["wall_s"] - f["in_process_s"]) - (b["wall_s"] - b["in_process_s"]),
        "server_start_s": f.get("server_start", 0.0),
        "mlflow_logging_s": f.get("mlflow_logging", 0.0), "model_logging_s": f.get("model_logging", 0.0),
        "slot_acquire_s": f.get("slot_acquire", 0.0),
        "stage_work_difference_s": f["stage_work"] - b["stage_work"],
    }
    parts["task_orchestration_rest_s"] = f["wall_s"] - b["wall_s"] - sum(parts.values())
    return parts


def run(quick: bool, results: Path) -> list[dict]:
    from bench.machine import machine

    # flow: the temporary server Prefect starts per run (what `make run-flow` does); server: a running Prefect
    # server (`make server`). In rotation (then reversed) as a run right after another one is faster, and load
    # drifts.
    order = ["flow", "server", "bare"] if quick else \
        ["bare", "flow", "server", "server", "flow", "bare", "bare", "flow", "server"]
    runs: dict[str, list[dict]] = {"flow": [], "server": [], "bare": []}
    with tempfile.TemporaryDirectory(prefix="wattflow-bench-orch-") as tmp_name:
        tmp = Path(tmp_name)
        recipe = workload(quick, tmp)
        config = tmp / "recipe.yaml"
        config.write_text(yaml.safe_dump(recipe))
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "PREFECT_HOME": str(tmp / "prefect")}
        env.pop("PREFECT_API_URL", None)
        warm_up(env)
        isolated = isolated_parts(env)
        (tmp / "server-home").mkdir()
        with prefect_server(env, tmp / "server-home") as api_url:
            server_env = {**env, "PREFECT_API_URL": api_url}
            for side in order:
                runs[side].append(one_run(side, config, tmp, server_env if side == "server" else env,
                                          len(runs[side])))
    med = {side: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in rs[-1]} for side, rs in runs.items()}
    b = med["bare"]
    sides = {}
    for side in ("flow", "server"):
        ratios = [f["wall_s"] / bare["wall_s"] for f, bare in zip(runs[side], runs["bare"], strict=True)]
        parts = breakdown_of(med[side], b)
        sides[side] = {"median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
                       "ratios": ratios, "median_flow_s": med[side]["wall_s"],
                       "median_overhead_s": med[side]["wall_s"] - b["wall_s"],
                       # fixed: what a flow run costs whatever its work (imports, interpreter exit, server start)
                       "fixed_overhead_s": parts["imports_s"] + parts["start_exit_s"] + parts["server_start_s"],
                       "orchestration_beyond_imports_and_server_s": sum(
                           v for k, v in parts.items() if k not in ("imports_s", "start_exit_s", "server_start_s")),
                       "breakdown_median_s": parts}
    flow = sides["flow"]
    met = (flow["median_ratio"] <= 1.10 and flow["fixed_overhead_s"] <= 8.0
           and flow["orchestration_beyond_imports_and_server_s"] <= 2.0)
    row = {
        "row": "orchestration_overhead", "machine": machine(), "target": "flow/bare <= 1.10, fixed overhead <= 8 s, "
        "orchestration beyond imports and server start <= 2 s", "pairs": len(runs["bare"]), "order": order,
        "recipe": recipe,
        "command": "python -m bench.orchestration --flow|--bare <recipe.yaml> <out.json> (fresh subprocess each, "
                   "MLFLOW_TRACKING_URI=sqlite in a temp dir, PREFECT_HOME in the temp dir; flow: no PREFECT_API_URL "
                   "(Prefect's temporary server), server: PREFECT_API_URL of a `prefect server start` on 127.0.0.1), "
                   f"order {'/'.join(order)}; one untimed warm-up creates both databases first",
        "median_bare_s": b["wall_s"], "temporary_server": flow, "running_server": sides["server"],
        "isolated_parts_s": isolated,
        "breakdown_method": "medians over runs, flow minus bare. imports: module import to work start (Prefect, "
                            "MLflow, flow module); start_exit: subprocess wall - time inside the module (interpreter "
                            "start, server shutdown at exit); server_start: the wait for Prefect's temporary server "
                            "once the modules are imported (it starts while they import; 0 against a running "
                            "server); mlflow_logging: every MlflowClient call and Tracker construction "
                            "outside log_model; model_logging: Tracker.log_model (the shipped champion and "
                            "baseline); slot_acquire: acquiring the measured-stage slots' Prefect global concurrency "
                            "limits (only with a running server); stage_work_difference: the library's stage "
                            "functions' time in the flow minus in the bare run (contention with the server process, "
                            "noise); task_orchestration_rest: "
                            "the remainder (task and flow run state tracking, artifacts, logging, result table). "
                            "isolated_parts_s: Prefect's and MLflow's own costs measured alone (see isolated_parts).",
        "runs": runs,
    }
    (results / "orchestration.json").write_text(json.dumps(row, indent=2))
    out = []
    for side, label in (("flow", "temporary server"), ("server", "running `make server`")):
        r = sides[side]
        parts = ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in r["breakdown_median_s"].items())
        figure = (f"median flow/bare wall time, {len(r['ratios'])} pairs (spread {r['min_ratio']:.3f}-"
                  f"{r['max_ratio']:.3f}; bare {b['wall_s']:.1f}s, +{r['median_overhead_s']:.1f}s: fixed "
                  f"{r['fixed_overhead_s']:.1f}s, orchestration beyond imports and server "
                  f"{r['orchestration_beyond_imports_and_server_s']:.1f}s; {parts})")
        if side == "flow":
            figure += (f"; alone: import prefect+mlflow {isolated['import_prefect_mlflow_s']:.1f}s, temporary server "
                       f"start {isolated['temporary_server_start_s']:.1f}s, one empty task run "
                       f"{1e3 * isolated['empty_task_run_s']:.0f}ms")
        out.append({"row": f"orchestration overhead, {label} (flow vs bare script)",
                    "value": round(r["median_ratio"], 3), "figure": figure,
                    "target": "<= 1.10; fixed <= 8 s; orchestration <= 2 s" if side == "flow" else "<= 1.10",
                    "met": met if side == "flow" else r["median_ratio"] <= 1.10})
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    side = parser.add_mutually_exclusive_group(required=True)
    side.add_argument("--flow", action="store_true")
    side.add_argument("--bare", action="store_true")
    parser.add_argument("config")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    (run_flow if args.flow else run_bare)(args.config, args.out)
