"""`--zmq-curve-keys` wired through the services: a CURVE scheduler answers a gateway and
registers an executor that hold the client keys, and a gateway without them (or with a
key the scheduler does not know) gets no answer. No model is loaded: the executor side is
its I/O loop alone, announcing a made-up capacity."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from pagedserve.services.executor.scheduler_link import SchedulerLink
from pagedserve.services.gateway.scheduler_client import SchedulerClient
from pagedserve.services.launcher import free_port
from pagedserve.services.scheduler.service import SchedulerService, SchedulerServiceConfig
from pagedserve.shared.messages import ExecutorReady, StatusSnapshot
from pagedserve.shared.zmq_security import CurveEndpoint, curve_client, generate_curve_keys
from tests.cluster import wait_until


@dataclass
class CurveScheduler:
    config: SchedulerServiceConfig
    keys_dir: Path


@pytest.fixture()
def curve_scheduler(tmp_path: Path) -> Iterator[CurveScheduler]:
    keys_dir = tmp_path / "keys"
    generate_curve_keys(keys_dir)
    config = SchedulerServiceConfig(
        gateway_address=f"tcp://127.0.0.1:{free_port()}",
        executor_address=f"tcp://127.0.0.1:{free_port()}",
        curve_keys_dir=str(keys_dir),
    )
    context: zmq.Context[Any] = zmq.Context()
    service = SchedulerService(config, context)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), name="curve-scheduler", daemon=True)
    thread.start()
    yield CurveScheduler(config, keys_dir)
    stop.set()
    thread.join(timeout=5)
    service.close()
    context.term()


def gateway_status(address: str, curve: CurveEndpoint | None, timeout_s: float) -> StatusSnapshot | None:
    async def ask() -> StatusSnapshot | None:
        client = SchedulerClient(address, "gateway-curve-test", submit_timeout_s=timeout_s, curve=curve)
        await client.start()
        try:
            return await client.status(timeout_s)
        finally:
            await client.close()

    return asyncio.run(ask())


def test_a_gateway_with_the_client_keys_is_answered(curve_scheduler: CurveScheduler) -> None:
    snapshot = gateway_status(curve_scheduler.config.gateway_address, curve_client(curve_scheduler.keys_dir), 5.0)
    assert snapshot is not None and snapshot.executors == []


def test_a_gateway_without_the_right_keys_gets_no_answer(curve_scheduler: CurveScheduler) -> None:
    address = curve_scheduler.config.gateway_address
    assert gateway_status(address, None, 1.0) is None
    public_key, secret_key = zmq.curve_keypair()
    stranger = CurveEndpoint(public_key, secret_key, curve_client(curve_scheduler.keys_dir).server_key)
    assert gateway_status(address, stranger, 1.0) is None


def test_an_executor_with_the_client_keys_registers(curve_scheduler: CurveScheduler) -> None:
    context: zmq.Context[Any] = zmq.Context()
    ready = ExecutorReady("executor-curve", 64, 16, "test-model", "cpu", 512, None)
    link = SchedulerLink(
        context, curve_scheduler.config.executor_address, ready, heartbeat_interval_s=1.0,
        curve=curve_client(curve_scheduler.keys_dir),
    )
    stop = threading.Event()
    io_thread = threading.Thread(target=link.run, args=(stop,), daemon=True)
    io_thread.start()
    try:
        gateway_curve = curve_client(curve_scheduler.keys_dir)

        def registered() -> bool:
            snapshot = gateway_status(curve_scheduler.config.gateway_address, gateway_curve, 2.0)
            return snapshot is not None and [e.executor_id for e in snapshot.executors] == ["executor-curve"]

        wait_until(registered, 10, "the CURVE executor to register")
    finally:
        stop.set()
        io_thread.join(timeout=5)
        link.close()
        context.term()
