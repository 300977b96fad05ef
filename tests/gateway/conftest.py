"""Fixtures for the gateway tests: the real tokenizer of the embedded model (loaded once,
it takes seconds), a fake scheduler, and real gateways on uvicorn in a thread.

Gateways run on a real HTTP server rather than an in-memory transport because streaming,
client disconnects and the OpenAI SDK are exactly what is under test.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import msgspec
import pytest
import uvicorn
from transformers import PreTrainedTokenizerBase

from pagedserve.services.gateway.app import create_app
from pagedserve.services.gateway.config import GatewayConfig
from pagedserve.shared.model_source import default_model_source
from pagedserve.shared.tokenizer import load_tokenizer
from tests.gateway.fake_scheduler import FakeScheduler


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer(default_model_source())


@contextlib.contextmanager
def running_gateway(config: GatewayConfig, tokenizer: PreTrainedTokenizerBase) -> Iterator[str]:
    """A gateway on uvicorn (own thread and event loop) on a free port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(config, tokenizer=tokenizer)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("gateway did not start")
        time.sleep(0.01)  # polling interval of a condition wait
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def fake_scheduler() -> Iterator[FakeScheduler]:
    fake = FakeScheduler()
    yield fake
    fake.close()


@pytest.fixture()
def scheduler(fake_scheduler: FakeScheduler) -> FakeScheduler:
    """The module's fake scheduler, reset to its defaults for this test."""
    fake_scheduler.reset()
    return fake_scheduler


def gateway_config(fake: FakeScheduler, **overrides: object) -> GatewayConfig:
    return msgspec.structs.replace(GatewayConfig(scheduler_address=fake.address, stall_timeout_s=2.0), **overrides)


@pytest.fixture(scope="module")
def gateway_url(fake_scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> Iterator[str]:
    with running_gateway(gateway_config(fake_scheduler), tokenizer) as url:
        yield url


@pytest.fixture()
def client(gateway_url: str, scheduler: FakeScheduler) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway_url, timeout=20) as http:
        yield http
