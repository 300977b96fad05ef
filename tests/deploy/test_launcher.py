"""The supervisor behind `pagedserve up` (services/launcher.py), with stand-in child
processes instead of the services: a child that exits is restarted after a backoff that
grows while it keeps failing, the others are left alone, and stopping ends them all, even
one that ignores SIGTERM. Then `pagedserve up` itself, with the real services: its
start-up output says what it waits for in a few lines, not a line per health poll.
(test_fault_load.py kills the real services under `up`.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pagedserve.services.launcher import RestartPolicy, Supervisor, free_port, pagedserve_command
from tests.cluster import port_open, wait_until

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


@pytest.mark.slow
def test_up_logs_its_wait_for_the_services_in_a_few_lines(tmp_path: Path) -> None:
    """The launcher polls /health twice a second while the executor loads the model; it
    used to log each poll (an httpx line) and the gateway an access line for each (mostly
    503s): dozens of lines of errors on a newcomer's first screen."""
    port = free_port()
    log_path = tmp_path / "up.log"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | {"PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*pagedserve_command(), "up", "--port", str(port), "--kv-cache-memory", str(256 << 20)],
            stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
        )
        try:
            def up_or_exited() -> bool:
                return "pagedserve is up" in log_path.read_text() or process.poll() is not None
            wait_until(up_or_exited, 240, "pagedserve up to say it is up")
        finally:
            process.terminate()
            code = process.wait(timeout=60)
    output = log_path.read_text().splitlines()
    assert code == 0 and any("pagedserve is up" in line for line in output), "\n".join(output[-60:])
    assert not port_open(port)
    poll_lines = [line for line in output if "/health" in line]
    assert poll_lines == [], "\n".join(poll_lines[:10])  # neither `up` (httpx) nor the gateway (uvicorn) logs a poll
    waiting_lines = [line for line in output if "waiting for the gateway" in line]
    assert 1 <= len(waiting_lines) <= 6, "\n".join(waiting_lines)  # one per change of what it waits for
