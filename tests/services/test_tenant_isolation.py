"""Tenants (issue #26), on real processes (redis-server, scheduler, executor, gateway):
a request's `cache_salt` (vLLM's field) keeps its prefix blocks apart from other salts',
so `cached_tokens` no longer tells one tenant what another sent, and the gateway routes
by the same salted hashes the scheduler stores in Redis."""

from __future__ import annotations

import random

import httpx
import pytest
import redis

from pagedserve.shared.block_hashing import prompt_block_hashes
from tests.cluster import Cluster, wait_until

BLOCK_SIZE = 16  # the scheduler's default


@pytest.fixture(scope="module")
def http(default_cluster: Cluster) -> httpx.Client:
    with httpx.Client(base_url=default_cluster.base_url, timeout=120) as client:
        yield client


def _cached_tokens(http: httpx.Client, prompt: list[int], cache_salt: str | None) -> int:
    body: dict = {"prompt": prompt, "max_tokens": 1, "temperature": 0}
    if cache_salt is not None:
        body["cache_salt"] = cache_salt
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_a_prefix_is_cached_only_for_requests_with_the_same_cache_salt(http: httpx.Client, default_cluster: Cluster) -> None:
    # A prompt no other test sends (token ids drawn at random): 2 full blocks and a bit.
    prompt = random.Random().sample(range(1000, 40000), 2 * BLOCK_SIZE + 5)
    assert _cached_tokens(http, prompt, "tenant-a") == 0
    # Another tenant, and a request without salt, learn nothing from tenant a's request...
    assert _cached_tokens(http, prompt, "tenant-b") == 0
    assert _cached_tokens(http, prompt, None) == 0
    # ... while tenant a's own next request hits its two blocks.
    assert _cached_tokens(http, prompt, "tenant-a") == 2 * BLOCK_SIZE

    # Routing reads the same salted hashes the scheduler stored.
    store = redis.Redis.from_url(default_cluster.redis_url, decode_responses=True)
    model = store.hget("replica:replica-0", "model")
    assert model
    salted = {salt: prompt_block_hashes(prompt, BLOCK_SIZE, model, salt) for salt in ("tenant-a", "tenant-b", None)}
    assert len({hashes[0] for hashes in salted.values()}) == 3  # three different first blocks
    for hashes in salted.values():
        wait_until(
            lambda hashes=hashes: all(store.zscore("prefix:replica-0", h.hex()) is not None for h in hashes), 10,
            "every salt's prefix hashes in Redis",
        )

