"""The supervisor behind `pagedserve up` (services/launcher.py), with stand-in child
processes instead of the services: a child that exits is restarted after a backoff that
grows while it keeps failing, the others are left alone, and stopping ends them all, even
one that ignores SIGTERM. (test_fault_load.py kills the real services under `up`.)"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from services.launcher import RestartPolicy, Supervisor
from tests.cluster import wait_until

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
POLICY = RestartPolicy(min_backoff_s=0.05, max_backoff_s=0.2, stable_after_s=30)


def test_backoff_doubles_while_failing_fast_and_resets_after_a_stable_run() -> None:
    policy = RestartPolicy(min_backoff_s=1, max_backoff_s=30, stable_after_s=60)
    assert policy.next_backoff_s(0, ran_s=0.1) == 1  # first exit
    assert [policy.next_backoff_s(b, ran_s=0.1) for b in (1, 2, 16, 30)] == [2, 4, 30, 30]
    assert policy.next_backoff_s(16, ran_s=61) == 1  # it ran fine for a while


def test_a_child_that_exits_is_restarted_and_the_others_are_left_alone() -> None:
    supervisor = Supervisor({"victim": SLEEPER, "bystander": SLEEPER}, policy=POLICY)
    supervisor.start_all()
    try:
        victim, bystander = supervisor.services["victim"], supervisor.services["bystander"]
        first_pid, bystander_pid = victim.pid, bystander.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)

        def restarted() -> bool:
            supervisor.poll(time.monotonic())
            return victim.pid != first_pid and victim.process is not None and victim.process.poll() is None
        wait_until(restarted, 10, "the victim to be restarted")
        assert victim.num_restarts == 1 and victim.backoff_s == POLICY.min_backoff_s
        assert bystander.pid == bystander_pid and bystander.num_restarts == 0
    finally:
        supervisor.stop_all()
    assert all(s.process is not None and s.process.poll() is not None for s in supervisor.services.values())


def test_a_crash_loop_backs_off_up_to_the_cap() -> None:
    supervisor = Supervisor({"crasher": [sys.executable, "-c", "raise SystemExit(3)"]}, policy=POLICY)
    supervisor.start_all()
    crasher = supervisor.services["crasher"]
    backoffs: list[float] = []

    def five_exits_seen() -> bool:
        was_waiting = crasher.restart_at is not None
        supervisor.poll(time.monotonic())
        if not was_waiting and crasher.restart_at is not None:  # it exited (again)
            backoffs.append(crasher.backoff_s)
        return len(backoffs) >= 5
    try:
        wait_until(five_exits_seen, 20, "five exits of a crashing child", interval_s=0.01)
    finally:
        supervisor.stop_all()
    assert backoffs[:5] == [0.05, 0.1, 0.2, 0.2, 0.2]
    assert crasher.process is not None and crasher.process.returncode == 3


def test_stop_all_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    stubborn = [sys.executable, "-c", (
        "import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(600)"
    )]
    supervisor = Supervisor({"stubborn": stubborn}, policy=POLICY)
    supervisor.start_all()
    wait_until(ready.exists, 10, "the child to ignore SIGTERM")
    started = time.monotonic()
    supervisor.stop_all(timeout_s=0.5)
    process = supervisor.services["stubborn"].process
    assert process is not None and process.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 5
