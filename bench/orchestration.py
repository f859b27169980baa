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

PROJECT = Path(__file__).resolve().parent.parent  # every subprocess runs here: `flows` is imported from it
STARTED = time.perf_counter()  # after the interpreter started, before the heavy imports
_local = threading.local()
TIMES: dict[str, float] = {}
CALLS: dict[str, int] = {}


def timed(category: str, fn):
    """Wrap `fn` so its time adds to TIMES[category] and its call to CALLS[category]; nested timed calls count
    once, in the outermost."""
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
            CALLS[category] = CALLS.get(category, 0) + 1
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

    server = start_in_background()
    from mlflow.tracking import MlflowClient

    from flows import pipeline
    from wattflow.tracking import Tracker

    for name in dir(MlflowClient):  # every client call (runs, batches, artifacts, inputs, the registry)
        if not name.startswith("_") and callable(getattr(MlflowClient, name)):
            setattr(MlflowClient, name, timed("mlflow_logging", getattr(MlflowClient, name)))
    # The first Tracker opens the store: with a sqlite:// URI, MLflow imports its SQLAlchemy store then (~1 s)
    Tracker.__init__ = timed("mlflow_store_open", Tracker.__init__)
    import prefect.concurrency._sync as prefect_slots  # the measured-stage slots' Prefect limits (a running server)

    prefect_slots.acquire_concurrency_slots_with_lease = timed(
        "slot_acquire", prefect_slots.acquire_concurrency_slots_with_lease)
    Tracker.log_model = timed("model_logging", Tracker.log_model)
    time_stages()
    server_cpu: list[float | None] = []

    def ready() -> None:  # then the server's CPU time from here on is what it spends serving this flow run
        timed("server_start", server.wait)()
        server_cpu.append(cpu_s(server.process.pid) if server.process else None)

    flow_started = time.perf_counter()
    code = pipeline.main(["--config", config, "--json-out", str(out.with_suffix(".rows.json"))], server_ready=ready)
    if server_cpu and server_cpu[0] is not None:
        TIMES["server_cpu_during_flow"] = cpu_s(server.process.pid) - server_cpu[0]
    out.write_text(json.dumps({**TIMES, **{f"{k}_calls": n for k, n in CALLS.items()},
                               "flow_call_s": time.perf_counter() - flow_started,
                               "imports_s": flow_started - STARTED,
                               "in_process_s": time.perf_counter() - STARTED}))
    sys.exit(code)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its children so far."""
    import psutil

    proc = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [proc, *proc.children(recursive=True)])


def one_run(side: str, config: Path, tmp: Path, env: dict, i: int, server_pid: int | None = None) -> dict:
    """One fresh subprocess; `server_pid`: a running Prefect server, whose CPU time during the run is recorded."""
    out = tmp / f"{side}-{i}.json"
    server_cpu = cpu_s(server_pid) if server_pid else 0.0
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bench.orchestration", "--bare" if side == "bare" else "--flow",
                           str(config), str(out)],
                          env=env, capture_output=True, text=True, cwd=PROJECT)
    if done.returncode != 0:
        raise RuntimeError(f"{side} run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - started
    during = {"server_cpu_during_flow": cpu_s(server_pid) - server_cpu} if server_pid else {}
    return {"wall_s": wall, **json.loads(out.read_text()), **during}


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
    code = ("from flows.temporary_server import TemporaryServer; from wattflow.tracking import Tracker; "
            "Tracker().experiment_id('wattflow'); s = TemporaryServer(); s.wait(); s.stop()")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, cwd=PROJECT)


def wall_s(code: str, env: dict) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, cwd=PROJECT)
    return time.perf_counter() - started


EMPTY_TASKS = 20
EMPTY_FLOW = f"""
import time
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from flows.temporary_server import TemporaryServer
TemporaryServer().wait()  # the flow below runs on it: its time is not the server's start
@task(cache_policy=NO_CACHE)
def step(i): return i
@flow
def empty():
    t0 = time.perf_counter()
    for i in range({EMPTY_TASKS}): step(i)
    return time.perf_counter() - t0
t0 = time.perf_counter()
in_tasks = empty()
print(in_tasks, time.perf_counter() - t0)
"""
MLFLOW_ROUNDS = 10
MLFLOW_CALLS = f"""
import statistics, time
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
client = MlflowClient()
exp = client.get_experiment_by_name("isolated-calls")
exp_id = exp.experiment_id if exp else client.create_experiment("isolated-calls")
per_call = []
for _ in range({MLFLOW_ROUNDS}):
    t0 = time.perf_counter()
    run_id = client.create_run(exp_id).info.run_id
    client.log_batch(run_id, metrics=[Metric(f"m{{i}}", 1.0, 0, 0) for i in range(20)],
                     params=[Param(f"p{{i}}", "x") for i in range(20)], tags=[RunTag(f"t{{i}}", "x") for i in range(5)])
    client.set_terminated(run_id)
    per_call.append((time.perf_counter() - t0) / 3)
print(statistics.median(per_call))
"""


def printed(code: str, env: dict) -> list[float]:
    """The numbers on the last line a fresh interpreter running `code` prints."""
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True,
                         cwd=PROJECT)
    return [float(x) for x in out.stdout.strip().splitlines()[-1].split()]


def isolated_parts(env: dict, rounds: int = 3) -> dict:
    """The parts of the overhead that are Prefect's and MLflow's own, each alone in a fresh interpreter, medians:
    importing both, the temporary server's start, a flow run of EMPTY_TASKS empty tasks (whole, and per task),
    and one MLflow client call on the SQLite store (a run's create, a batch of 45 values, its end)."""
    server = ("import time; from flows.temporary_server import TemporaryServer; t0 = time.perf_counter(); "
              "s = TemporaryServer(); s.wait(); print(time.perf_counter() - t0); s.stop()")
    interpreter = [wall_s("pass", env) for _ in range(rounds)]
    # what the flow imports of both, with MLflow's SQLAlchemy store (a sqlite:// store: imported at the first client)
    imports = [wall_s("import prefect.flows, mlflow.tracking, mlflow.store.tracking.sqlalchemy_store", env)
               for _ in range(rounds)]
    starts, per_task, empty_flow, mlflow_call = [], [], [], []
    for _ in range(rounds):
        starts.append(printed(server, env)[-1])
        in_tasks, whole = printed(EMPTY_FLOW, env)[-2:]
        per_task.append(in_tasks / EMPTY_TASKS)
        empty_flow.append(whole)
        mlflow_call.append(printed(MLFLOW_CALLS, env)[-1])
    return {"import_prefect_mlflow_s": statistics.median(imports) - statistics.median(interpreter),
            "temporary_server_start_s": statistics.median(starts),
            "empty_task_run_s": statistics.median(per_task),
            f"flow_run_of_{EMPTY_TASKS}_empty_tasks_s": statistics.median(empty_flow),
            "mlflow_client_call_s": statistics.median(mlflow_call)}


@contextmanager
def prefect_server(env: dict, home: Path) -> Iterator[tuple[str, int]]:
    """A running Prefect server (what `make server` starts), on a free port of 127.0.0.1; yields its API URL and
    process id."""
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
        yield url, proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


FIXED_PARTS = ("imports_s", "mlflow_store_open_s", "start_exit_s", "server_start_s")


def breakdown_of(f: dict, b: dict) -> dict:
    """Where the flow's extra wall time goes: medians, flow minus bare (see breakdown_method)."""
    parts = {
        "imports_s": f["imports_s"] - b["imports_s"],
        "mlflow_store_open_s": f.get("mlflow_store_open", 0.0),
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
        with prefect_server(env, tmp / "server-home") as (api_url, server_pid):
            server_env = {**env, "PREFECT_API_URL": api_url}
            for side in order:
                runs[side].append(one_run(side, config, tmp, server_env if side == "server" else env,
                                          len(runs[side]), server_pid if side == "server" else None))
    med = {side: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in rs[-1]} for side, rs in runs.items()}
    b = med["bare"]
    sides = {}
    for side in ("flow", "server"):
        ratios = [f["wall_s"] / bare["wall_s"] for f, bare in zip(runs[side], runs["bare"], strict=True)]
        parts = breakdown_of(med[side], b)
        sides[side] = {"median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
                       "ratios": ratios, "median_flow_s": med[side]["wall_s"],
                       "median_overhead_s": med[side]["wall_s"] - b["wall_s"],
                       # fixed: what a flow run costs whatever its work (imports, the MLflow store's lazy import
                       # and opening, interpreter exit, server start)
                       "fixed_overhead_s": sum(parts[k] for k in FIXED_PARTS),
                       "orchestration_beyond_imports_and_server_s": sum(
                           v for k, v in parts.items() if k not in FIXED_PARTS),
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
                            "server); mlflow_store_open: Tracker construction (the first opens the MLflow store: with "
                            "sqlite:// MLflow imports its SQLAlchemy store then; counted as fixed); mlflow_logging: "
                            "every MlflowClient call outside log_model (runs, batches, artifacts, inputs, registry; "
                            "*_calls: how many); model_logging: Tracker.log_model (the shipped champion and "
                            "baseline); slot_acquire: acquiring the measured-stage slots' Prefect global concurrency "
                            "limits (only with a running server); stage_work_difference: the library's stage "
                            "functions' time in the flow minus in the bare run (contention with the server process, "
                            "whose CPU time during the flow is server_cpu_during_flow; noise); "
                            "task_orchestration_rest: "
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
        m = med[side]
        figure += (f"; {m.get('mlflow_logging_calls', 0):.0f} MLflow calls, {m.get('model_logging_calls', 0):.0f} "
                   f"models logged; the Prefect server used {m.get('server_cpu_during_flow', 0.0):.1f}s of CPU "
                   "during the flow")
        if side == "flow":
            figure += (f"; alone: import prefect+mlflow {isolated['import_prefect_mlflow_s']:.1f}s, temporary server "
                       f"start {isolated['temporary_server_start_s']:.1f}s, a flow run of {EMPTY_TASKS} empty tasks "
                       f"{isolated[f'flow_run_of_{EMPTY_TASKS}_empty_tasks_s']:.1f}s (one task "
                       f"{1e3 * isolated['empty_task_run_s']:.0f}ms), one MLflow call "
                       f"{1e3 * isolated['mlflow_client_call_s']:.0f}ms")
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
