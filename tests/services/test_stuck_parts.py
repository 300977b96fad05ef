"""Peers that are not our gateway (issue #26), on real processes (redis-server, scheduler,
executor): a submit naming a token id outside the vocabulary, sent straight to the
scheduler's gateway socket past every gateway check, is refused there with a 400; it
used to reach the executor, whose embedding lookup crashed it, taking every request on
the replica down with it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from pagedserve.shared.messages import SubmitRequest
from pagedserve.shared.sampling_params import SamplingParams
from tests.cluster import Cluster, wait_until
from tests.services.test_scheduler_executor import FakeGatewaySocket, collect

pytestmark = pytest.mark.slow

VOCAB_SIZE = 49152  # the embedded SmolLM2's


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGatewaySocket]:
    cluster = Cluster(tmp_path_factory.mktemp("stuck-parts"), with_gateway=False).start()
    sock = FakeGatewaySocket(cluster.gateway_zmq)
    try:

        def executor_joined() -> bool:
            try:
                return any(e.alive for e in sock.status().executors)
            except TimeoutError:  # the scheduler is still importing on a busy machine
                return False

        wait_until(executor_joined, 180, "an executor to join", interval_s=0.2)
        yield sock
    finally:
        sock.close()
        cluster.stop()


@pytest.mark.parametrize(
    "field",
    ["prompt", "stop_token_ids", "logit_bias"],
)
def test_a_token_id_outside_the_vocabulary_is_refused_at_the_scheduler_and_the_executor_lives(
    gateway: FakeGatewaySocket, field: str
) -> None:
    prompt, params = [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0)
    if field == "prompt":
        prompt = [1, VOCAB_SIZE + 1000, 3]
    elif field == "stop_token_ids":
        params = SamplingParams(max_tokens=2, temperature=0.0, stop_token_ids=[VOCAB_SIZE])
    else:
        params = SamplingParams(max_tokens=2, temperature=0.0, logit_bias={VOCAB_SIZE + 5: 1.0})
    gateway.send(SubmitRequest(f"hostile-{field}", prompt, params, arrival_time=time.time()))
    got = collect(gateway, {f"hostile-{field}"})
    error = got["errors"][f"hostile-{field}"]
    assert error.status_code == 400 and field in error.message and str(VOCAB_SIZE - 1) in error.message, error
    # The replica still serves.
    gateway.send(SubmitRequest(f"after-{field}", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0), arrival_time=time.time()))
    assert collect(gateway, {f"after-{field}"})["finish"][f"after-{field}"] in ("stop", "length")
    assert any(e.alive for e in gateway.status().executors)
