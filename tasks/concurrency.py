"""One measured stage per GPU (or per CPU-only host) at a time, across every worker and flow run.

    with measured_slot(logger.info):
        result = stages.train_stage(...)

NVML energy counters and RAPL are device-global: two stages measured on the same GPU at once would each be
charged for the other's work. So every measured stage holds a slot per GPU this process may use,
`gpu:<GPU UUID>` (CUDA_VISIBLE_DEVICES, as CUDA resolves it), or `cpu:<host>` on a host without a visible GPU.
A GPU's UUID is the same whoever looks (NVML indices are renumbered from 0 inside containers and Slurm cgroups,
and a container has its own hostname), so two workers on different GPUs never block each other, and two on the
same GPU always do, containers or not.

A slot is a kernel file lock on the host (released when its process dies) and, with a Prefect server, also a
Prefect global concurrency limit (limit 1) leased to the holding task run. Probed in Prefect 3.9.1: the server
ignores `create_if_missing` and, without `strict`, a missing limit is silently not enforced; so the limits are
created here when missing and acquired with strict=True, all names in one call (no deadlock between
multi-GPU stages).
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.sync import concurrency
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from wattflow.energy import EnergyMeter
from wattflow.energy.nvml import mig_parents, visible_indices
from wattflow.preflight import configured_prefect_api_url

SLOT_LIMIT = 1
# The lease is renewed in the background while the stage runs; it only expires if this process dies.
LEASE_DURATION_S = 300.0


def _visible_gpus(nvml=None) -> tuple[list[str], str]:
    """UUIDs of the GPUs this process may use, and why there are none (empty string if some)."""
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        uuids = [nvml.nvmlDeviceGetUUID(h) for h in handles]
    except Exception as e:  # no driver, no library, no GPU: a CPU-only host
        return [], f"NVML unavailable ({type(e).__name__}: {e})"
    uuids = [u.decode() if isinstance(u, bytes) else str(u) for u in uuids]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    migs = mig_parents(nvml, handles) if visible and "MIG-" in visible else {}  # a MIG slice blocks its GPU
    indices = visible_indices(uuids, visible, migs)
    return [uuids[i] for i in indices], "" if indices else f"no GPU visible (CUDA_VISIBLE_DEVICES={visible!r})"


def _host_slots(host: str | None, nvml, host_wide: bool = False) -> tuple[list[str], str]:
    gpus, why_none = _visible_gpus(nvml)
    cpu = f"cpu:{host or socket.gethostname()}"
    return ([f"gpu:{uuid}" for uuid in gpus] + ([cpu] if host_wide else [])) or [cpu], why_none


def slot_names(host: str | None = None, nvml=None, host_wide: bool = False) -> list[str]:
    """`gpu:<UUID>` per visible GPU, else `["cpu:<host>"]`; with `host_wide` (the stage's meter reads a host-wide
    counter: RAPL) also `cpu:<host>`, so stages on different GPUs of one host are not charged each other's CPU
    and DRAM energy. `nvml`: a FakeNvml in tests."""
    return _host_slots(host, nvml, host_wide)[0]


def reads_host_counters(meter: EnergyMeter) -> bool:
    """Whether `meter` reads a counter of the whole host (RAPL, a SoC), which a stage on another GPU would move
    too."""
    return any(getattr(backend, "host_wide", False) for backend in meter.backends)


def ensure_limits(names: list[str], limit: int = SLOT_LIMIT) -> None:
    """Create each global concurrency limit that does not exist yet (an existing one is left as it is: an
    operator may have changed or deactivated it on purpose)."""
    run = _flow_run_id()  # one look per flow run, not one before every measured stage (each is an API call)
    missing = [n for n in names if (run, n) not in _LIMITS_FOUND]
    if not missing:
        return
    with get_client(sync_client=True) as client:
        for name in missing:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
                except ObjectAlreadyExists:
                    pass  # another worker created it between our read and create
            _LIMITS_FOUND.add((run, name))


def slot_dir() -> Path:
    """Host-wide (not per checkout): every wattflow process on this host shares the same lock files."""
    path = Path(os.environ.get("WATTFLOW_SLOT_DIR") or Path(tempfile.gettempdir()) / "wattflow-slots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def host_locks(names: list[str]) -> Iterator[None]:
    """Kernel file locks, one per slot, taken in sorted order (no deadlock between multi-GPU stages). The
    kernel releases them when the process dies, so a killed stage never leaves a slot taken."""
    with ExitStack() as stack:
        for name in sorted(names):
            handle = stack.enter_context(open(slot_dir() / f"{name.replace(':', '_').replace('/', '_')}.lock", "a+"))
            fcntl.flock(handle, fcntl.LOCK_EX)
            stack.callback(fcntl.flock, handle, fcntl.LOCK_UN)
        yield


def _holder() -> ConcurrencyLeaseHolder | None:
    """Who holds a slot, for the Prefect UI's Concurrency page: the task run, else the flow run."""
    task = TaskRunContext.get()
    if task is not None:
        return ConcurrencyLeaseHolder(type="task_run", id=task.task_run.id)
    flow = FlowRunContext.get()
    return ConcurrencyLeaseHolder(type="flow_run", id=flow.flow_run.id) if flow and flow.flow_run else None


def _flow_run_id() -> str:
    flow = FlowRunContext.get()
    return str(flow.flow_run.id) if flow and flow.flow_run else ""


_REASONS_SAID: set[tuple[str, str]] = set()  # (flow run id, reason)
_LIMITS_FOUND: set[tuple[str, str]] = set()  # (flow run id, limit name) seen on the server


_HELD: dict[str, frozenset[str]] = {}  # flow run id -> the Prefect limits it holds across its measured stages


def _prefect_limits(names: list[str], timeout_s: float | None = None):
    ensure_limits(names)
    # raise_on_lease_renewal_failure=False: a transient API error must not kill an hour of training.
    return concurrency(names, occupy=1, timeout_seconds=timeout_s, lease_duration=LEASE_DURATION_S, strict=True,
                       holder=_holder(), raise_on_lease_renewal_failure=False)


@contextmanager
def flow_run_slots(log: Callable[[str], None] | None = None, *, host_wide: bool = False) -> Iterator[None]:
    """With a Prefect server, hold this host's measured-stage limits for the block, on behalf of the flow run:
    its measured stages inside then take only the host's file locks. Each acquisition is an API call, and a
    Prefect server on SQLite answered one that follows a task run's state changes in ~2 s (20 ms alone), so
    acquiring per stage cost the default pipeline ~10 s. Other flow runs wait for the whole block instead of
    interleaving stage by stage. Not around a multi-node training: its node runs may need this host's limits."""
    if not configured_prefect_api_url():
        yield
        return
    names, _ = _host_slots(None, None, host_wide)
    if log:
        log(f"waiting for measured-stage slot(s) {', '.join(names)} for this flow run's measured stages")
    with _prefect_limits(names):
        _HELD[_flow_run_id()] = frozenset(names)
        try:
            yield
        finally:
            _HELD.pop(_flow_run_id(), None)


@contextmanager
def measured_slot(log: Callable[[str], None] | None = None, *, names: list[str] | None = None,
                  host_wide: bool = False, timeout_s: float | None = None) -> Iterator[list[str]]:
    """Hold the measured-stage slots of this host's GPUs (or of the host) for the duration of the block.

    Always a kernel file lock per slot on this host (released if the process dies). With a Prefect server
    configured (PREFECT_API_URL in the environment: `make server`, a worker), also the Prefect global
    concurrency limit of the same name, leased to this task run, which the UI's Concurrency page shows and
    whose lease the server expires should a holder vanish. Not with the temporary server of `python -m flows`
    (`configured_prefect_api_url`) or the test harness: they do not run the service that expires leases, so a
    killed stage would block every later run.
    Waits for slots held by other stages (forever, or `timeout_s` for the Prefect limits, then TimeoutError).
    Do not nest it, nor hold it around code that waits for another holder of the same slots. `host_wide`: the
    stage's meter reads RAPL (`reads_host_counters`), so the host's slot is held too.
    """
    why_no_gpu = ""
    if names is None:
        names, why_no_gpu = _host_slots(None, None, host_wide)
    if log:
        # Why there is no GPU slot does not change within a flow run: say it the first time only.
        reason_key = (_flow_run_id(), why_no_gpu)
        said = reason_key in _REASONS_SAID
        _REASONS_SAID.add(reason_key)
        log(f"waiting for measured-stage slot(s) {', '.join(names)}"
            + (f" ({why_no_gpu})" if why_no_gpu and not said else ""))
    with ExitStack() as stack:
        # The Prefect limits before the file locks, always: whoever waits for a limit holds no lock (no cycle
        # with a flow run that holds its limits across stages, see flow_run_slots).
        if configured_prefect_api_url() and not set(names) <= _HELD.get(_flow_run_id(), frozenset()):
            stack.enter_context(_prefect_limits(names, timeout_s))
        stack.enter_context(host_locks(names))
        if log:
            log(f"holding {', '.join(names)}")
        yield names
