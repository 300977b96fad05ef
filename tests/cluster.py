"""Real service processes for end-to-end tests: redis-server, scheduler, executor, gateway.

Each is started with the same `pagedserve <service>` command line that `pagedserve up`
and the compose file use, on free loopback ports, and waited for by condition (a port
that answers, a health check), never by sleeping.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

from pagedserve.services.launcher import free_port, pagedserve_command, redis_server_binary


# The keys of the session's shared clusters (tests/conftest.py): the float64 one requires
# the API key (its tests check that /v1 and /tokenize refuse a request without it), the
# default one none.
SHARED_ADMIN_KEY = "admin-shared"
SHARED_API_KEY = "key-shared"


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval_s)  # polling interval of a condition wait, not synchronisation
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class ServiceProcess:
    name: str
    command: list[str]
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command, stdout=self.log_file, stderr=subprocess.STDOUT, env=self.env)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig_kill: bool = False) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill() if sig_kill else self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


@dataclass
class Cluster:
    """redis + scheduler + executor (+ gateway) as real processes."""

    workdir: Path
    with_gateway: bool = True
    api_key: str | None = None
    admin_key: str | None = None
    kv_cache_memory: int = 256 << 20
    extra_scheduler_flags: list[str] = field(default_factory=list)
    extra_executor_flags: list[str] = field(default_factory=list)
    extra_gateway_flags: list[str] = field(default_factory=list)
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.gateway_zmq = f"tcp://127.0.0.1:{free_port()}"
        self.executor_zmq = f"tcp://127.0.0.1:{free_port()}"
        self.http_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.api_key:
            self.env["PAGEDSERVE_API_KEY"] = self.api_key
        if self.admin_key:
            self.env["PAGEDSERVE_ADMIN_KEY"] = self.admin_key

    def _service(self, name: str, command: list[str]) -> ServiceProcess:
        service = ServiceProcess(name, command, self.workdir / f"{name}.log", self.env)
        self.services[name] = service
        return service

    def start(self) -> "Cluster":
        base = pagedserve_command()
        redis = self._service(
            "redis",
            [redis_server_binary(), "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        )
        redis.start()
        wait_until(lambda: port_open(self.redis_port), 10, "redis-server")
        self.start_scheduler()
        self.start_executor()
        if self.with_gateway:
            self._service(
                "gateway",
                base + ["gateway", "--host", "127.0.0.1", "--port", str(self.http_port), "--scheduler-address",
                        self.gateway_zmq, "--redis-url", self.redis_url, *self.extra_gateway_flags],
            ).start()
            self.wait_healthy()
        return self

    def start_scheduler(self, extra_flags: list[str] | None = None) -> None:
        """(Re)start the scheduler on the same ports, with `extra_flags` instead of the
        cluster's own when given."""
        flags = self.extra_scheduler_flags if extra_flags is None else extra_flags
        self._service(
            "scheduler",
            pagedserve_command() + ["scheduler", "--gateway-address", self.gateway_zmq, "--executor-address",
                                    self.executor_zmq, "--redis-url", self.redis_url, *flags],
        ).start()

    def start_executor(self) -> None:
        self._service(
            "executor",
            pagedserve_command() + ["executor", "--scheduler-address", self.executor_zmq,
                                    "--kv-cache-memory", str(self.kv_cache_memory), *self.extra_executor_flags],
        ).start()

    def wait_healthy(self, timeout_s: float = 180) -> None:
        import httpx

        def healthy() -> bool:
            for service in self.services.values():
                if not service.alive():
                    raise RuntimeError(f"{service.name} died during start-up:\n{service.log()}")
            try:
                return httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout_s, "the gateway's /health", interval_s=0.25)

    def stop(self) -> None:
        for name in ("gateway", "executor", "scheduler", "redis"):
            if name in self.services:
                self.services[name].stop()


def save_random_gqa_llama(directory: Path) -> None:
    """A tiny random Llama (8 query heads, 2 KV heads: one KV head per rank at T = 2) saved
    as an HF folder with the SmolLM2 tokenizer: a real model that loads in a moment."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pagedserve.shared.model_source import default_model_source
    from pagedserve.shared.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(default_model_source())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
        initializer_range=0.1, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(4321)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


class Up:
    """`pagedserve up` as a subprocess, its log in a file (it names each child's PID and
    command line)."""

    def __init__(self, workdir: Path, flags: list[str], admin_key: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.admin_key = admin_key
        self.log_path = workdir / "up.log"
        self.log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.services.cli", "up", "--port", str(self.port), "--admin-key", admin_key, *flags],
            stdout=self.log_file, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pid_of(self, service: str) -> int:
        """The PID of `service`'s latest start, as `up` logged it."""
        return int(re.findall(rf"started {re.escape(service)} \(pid (\d+)\)", self.log())[-1])

    def command_of(self, service: str) -> str:
        """The command line of `service`'s latest start, as `up` logged it."""
        return re.findall(rf"started {re.escape(service)} \(pid \d+\): (.*)", self.log())[-1]

    def admin(self) -> dict[str, Any]:
        import httpx

        response = httpx.get(f"{self.base_url}/admin/scheduler", headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_healthy(self, timeout_s: float = 240) -> None:
        import httpx

        def healthy() -> bool:
            assert self.process.poll() is None, self.log()[-5000:]
            try:
                return httpx.get(f"{self.base_url}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout_s, "the gateway's /health", interval_s=0.25)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log_file.close()
