"""The scheduler and executor as real processes over real ZeroMQ sockets, driven by a
DEALER socket playing the gateway: outputs equal HF transformers' greedy tokens (float64
on both sides), malformed messages are dropped without harm, refused requests get a
RequestError. The cluster is the session's float64 one (its gateway beside ours)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from pagedserve.shared.messages import (
    AbortRequest,
    RequestDeltas,
    RequestError,
    SchedulerToGateway,
    StatusQuery,
    StatusSnapshot,
    SubmitRequest,
)
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.transport import decode, encode
from tests.cluster import Cluster, wait_until
from tests.engine.hf_reference import hf_greedy_ignoring_eos

pytestmark = pytest.mark.slow

PROMPTS = [[1, 504, 3575, 282, 4649, 314], [1, 19556, 28, 919, 359, 346, 47], [1] + list(range(300, 340))]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


class FakeGatewaySocket:
    """A real DEALER socket speaking the gateway protocol (the test is the gateway)."""

    def __init__(self, address: str) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.decoder = msgspec.msgpack.Decoder(SchedulerToGateway)

    def send(self, message: msgspec.Struct) -> None:
        self.sock.send_multipart(encode(message))

    def recv(self, timeout_s: float) -> Any:
        if not self.sock.poll(int(timeout_s * 1000)):
            raise TimeoutError("no message from the scheduler")
        return decode(self.sock.recv_multipart(), self.decoder)

    def status(self, timeout_s: float = 5) -> StatusSnapshot:
        self.send(StatusQuery(query_id=7))
        deadline = time.monotonic() + timeout_s
        while True:
            message = self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(message, StatusSnapshot):
                return message

    def close(self) -> None:
        self.sock.close()
        self.context.term()


@pytest.fixture(scope="module")
def cluster(float64_cluster: Cluster) -> Cluster:
    # float64, as the exactness tests: the defaults (bf16, int4 for small steps) are not
    # batch invariant, and requests sent one by one are batched otherwise than in HF.
    return float64_cluster  # the session's (tests/conftest.py)


@pytest.fixture()
def gateway(cluster: Cluster) -> Iterator[FakeGatewaySocket]:
    sock = FakeGatewaySocket(cluster.gateway_zmq)

    def executor_joined() -> bool:
        try:
            return any(e.alive for e in sock.status().executors)
        except TimeoutError:  # the scheduler process is still importing on a busy machine
            return False

    wait_until(executor_joined, 120, "an executor to join", interval_s=0.2)
    yield sock
    sock.close()


def collect(sock: FakeGatewaySocket, ids: set[str], timeout_s: float = 120) -> dict[str, Any]:
    outputs: dict[str, list[int]] = {i: [] for i in ids}
    finish: dict[str, str] = {}
    errors: dict[str, RequestError] = {}
    deadline = time.monotonic() + timeout_s
    while len(finish) + len(errors) < len(ids):
        message = sock.recv(max(0.01, deadline - time.monotonic()))
        if isinstance(message, RequestDeltas):
            for delta in message.deltas:
                outputs[delta.request_id].extend(delta.new_token_ids)
                if delta.finish_reason:
                    finish[delta.request_id] = delta.finish_reason
        elif isinstance(message, RequestError):
            errors[message.request_id] = message
    return {"outputs": outputs, "finish": finish, "errors": errors}


def test_outputs_equal_hf_greedy(gateway: FakeGatewaySocket, hf_model_float64) -> None:  # type: ignore[no-untyped-def]
    expected = hf_greedy_ignoring_eos(hf_model_float64, PROMPTS, GREEDY.max_tokens)
    for i, prompt in enumerate(PROMPTS):
        gateway.send(SubmitRequest(f"r{i}", prompt, GREEDY, arrival_time=time.time()))
    got = collect(gateway, {f"r{i}" for i in range(len(PROMPTS))})
    assert got["errors"] == {}
    assert [got["outputs"][f"r{i}"] for i in range(len(PROMPTS))] == expected
    assert set(got["finish"].values()) == {"length"}
    snapshot = gateway.status()
    assert snapshot.block_pool is not None
    assert snapshot.block_pool.num_free_blocks == snapshot.block_pool.num_blocks
    assert snapshot.steps.num_steps > 0


def test_malformed_messages_are_dropped(gateway: FakeGatewaySocket) -> None:
    gateway.sock.send_multipart([b"garbage"])
    gateway.sock.send_multipart([b"pagedserve.0", b"\x00"])
    gateway.sock.send_multipart(encode(StatusQuery(1))[:1] + [b"\xc1not msgpack"])
    gateway.send(SubmitRequest("after-garbage", PROMPTS[0], GREEDY, arrival_time=time.time()))
    got = collect(gateway, {"after-garbage"})
    assert len(got["outputs"]["after-garbage"]) == GREEDY.max_tokens


def test_refused_requests_get_errors(gateway: FakeGatewaySocket) -> None:
    snapshot = gateway.status()
    too_long = [1] * (snapshot.max_model_len + 1)
    gateway.send(SubmitRequest("too-long", too_long, GREEDY, arrival_time=time.time()))
    gateway.send(SubmitRequest("bad-params", PROMPTS[0], SamplingParams(max_tokens=0), arrival_time=time.time()))
    got = collect(gateway, {"too-long", "bad-params"})
    assert got["errors"]["too-long"].status_code == 400
    assert str(snapshot.max_model_len) in got["errors"]["too-long"].message.replace(",", "")
    assert got["errors"]["bad-params"].status_code == 400
    assert "max_tokens" in got["errors"]["bad-params"].message


def test_abort_frees_blocks(gateway: FakeGatewaySocket) -> None:
    long_run = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)
    gateway.send(SubmitRequest("to-abort", PROMPTS[2], long_run, arrival_time=time.time()))
    first = gateway.recv(60)
    assert isinstance(first, RequestDeltas) and first.deltas[0].request_id == "to-abort"
    gateway.send(AbortRequest(["to-abort"]))
    got = collect(gateway, {"to-abort"})
    assert got["finish"]["to-abort"] == "abort"
    pool = gateway.status().block_pool
    assert pool is not None and pool.num_free_blocks == pool.num_blocks


def test_the_replica_load_is_mirrored_to_redis_and_no_request_record(gateway: FakeGatewaySocket, cluster: Cluster) -> None:
    import redis

    client = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    gateway.send(SubmitRequest("mirrored", PROMPTS[0], SamplingParams(max_tokens=3, temperature=0.0), arrival_time=time.time()))
    got = collect(gateway, {"mirrored"})
    assert got["finish"]["mirrored"] in ("stop", "length")
    finished_at = time.time()

    def reported_since() -> bool:
        return float(client.hget("replica:replica-0", "heartbeat_at") or 0) > finished_at

    wait_until(reported_since, 10, "a load report after the request finished")
    assert client.hget("replica:replica-0", "num_blocks") not in (None, "0")
    # Request records are the gateway's alone (ours is none): the scheduler wrote none.
    assert client.keys("req:mirrored*") == []


def test_prefix_cache_hits_reported_and_mirrored_to_redis(gateway: FakeGatewaySocket, cluster: Cluster) -> None:
    import redis

    from pagedserve.services.scheduler.prefix_cache import extend_block_hashes

    prompt = [1] + list(range(700, 740))  # 41 tokens: two full 16-token blocks can be reused
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    cached_tokens: dict[str, int] = {}
    for request_id in ("prefix-first", "prefix-again"):
        gateway.send(SubmitRequest(request_id, prompt, params, arrival_time=time.time()))
        finished = False
        while not finished:
            message = gateway.recv(60)
            if isinstance(message, RequestDeltas):
                for delta in message.deltas:
                    cached_tokens[delta.request_id] = delta.num_cached_tokens
                    finished |= delta.request_id == request_id and delta.finish_reason is not None
    assert cached_tokens == {"prefix-first": 0, "prefix-again": 32}
    snapshot = gateway.status()
    assert snapshot.block_pool is not None and snapshot.block_pool.prefix_cache is not None
    assert snapshot.block_pool.prefix_cache.num_hit_tokens >= 32
    assert snapshot.block_pool.num_cached_blocks >= 2
    # Anyone holding the token ids can compute the same hashes and find this replica.
    hashes: list[bytes] = []
    extend_block_hashes(hashes, prompt, 16, (snapshot.model,))
    client = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    wait_until(
        lambda: all(client.zscore("prefix:replica-0", h.hex()) is not None for h in hashes), 10, "the prefix hashes in redis"
    )
