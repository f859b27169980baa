"""Nothing outlives the stage that started it: ranks orphaned by a torchrun killed outright are stopped by
their pid files, and a measured-stage slot held by a process that dies is free again at once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from tasks.concurrency import host_locks
from wattflow.distributed import stop_process_group


@pytest.mark.integration  # real processes in sessions of their own
def test_ranks_left_behind_by_a_dead_torchrun_are_stopped(tmp_path):
    # A stand-in rank in a session of its own (as torchrun starts them), whose launcher is already gone.
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "-m", "wattflow.train"],
                            start_new_session=True)
    launcher = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    launcher.wait()
    (tmp_path / "rank-0.pid").write_text(str(rank.pid))
    (tmp_path / "rank-1.pid").write_text(str(launcher.pid))  # dead: never signalled, whatever holds the pid now
    try:
        stop_process_group(launcher, tmp_path, grace_s=0.0)
        assert rank.wait(timeout=10) == -9
    finally:
        rank.kill()


def test_a_slot_held_by_a_process_that_dies_is_free_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("WATTFLOW_SLOT_DIR", str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; from tasks.concurrency import host_locks\n"
        "with host_locks(['cpu:test-host']):\n"
        "    print('held', flush=True); time.sleep(1); os._exit(9)")], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "WATTFLOW_SLOT_DIR": str(tmp_path)})
    assert holder.stdout.readline().strip() == "held"
    acquired = threading.Event()

    def take() -> None:
        with host_locks(["cpu:test-host"]):
            acquired.set()

    threading.Thread(target=take, daemon=True).start()
    assert acquired.wait(timeout=30), "the dead holder's slot was never released"
    assert holder.wait(timeout=10) == 9
