"""API key on /v1, admin key on /admin/scheduler, both Bearer tokens; /health and
/metrics stay open for orchestrators and scrapers."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from transformers import PreTrainedTokenizerBase

from pagedserve.services.gateway.auth import bearer_token_matches
from tests.gateway.conftest import gateway_config, running_gateway
from tests.gateway.fake_scheduler import FakeScheduler, one_token_per_step
from tests.gateway.test_validation import assert_openai_error

API_KEY = "sk-test-api"
ADMIN_KEY = "admin-secret"


@pytest.fixture(scope="module")
def secured_url(fake_scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> Iterator[str]:
    with running_gateway(gateway_config(fake_scheduler, api_key=API_KEY, admin_key=ADMIN_KEY), tokenizer) as url:
        yield url


@pytest.fixture()
def secured(secured_url: str, scheduler: FakeScheduler) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=secured_url, timeout=20) as http:
        yield http


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("headers", [{}, bearer("wrong"), {"Authorization": API_KEY}, {"Authorization": f"Basic {API_KEY}"}, bearer(ADMIN_KEY)])
def test_v1_routes_need_the_api_key(secured: httpx.Client, scheduler: FakeScheduler, headers: dict[str, str]) -> None:
    for response in (
        secured.get("/v1/models", headers=headers),
        secured.post("/v1/completions", json={"prompt": "p"}, headers=headers),
        secured.post("/v1/chat/completions", json={"messages": []}, headers=headers),
        secured.get("/v1/unknown", headers=headers),
    ):
        assert_openai_error(response, 401, code="invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer"
    assert scheduler.submits == []


def test_the_right_api_key_is_let_through(secured: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    scheduler.script = one_token_per_step(tokenizer("fine").input_ids)
    models = secured.get("/v1/models", headers=bearer(API_KEY))
    assert models.status_code == 200
    assert models.json()["data"][0]["id"] == "SmolLM2-135M-Instruct"
    response = secured.post("/v1/completions", json={"prompt": "p", "max_tokens": 4}, headers=bearer(API_KEY))
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == "fine"


def test_health_and_metrics_need_no_key(secured: httpx.Client, scheduler: FakeScheduler) -> None:
    assert secured.get("/health").status_code == 200
    assert secured.get("/metrics").status_code == 200


def test_admin_status_needs_the_admin_key(secured: httpx.Client, scheduler: FakeScheduler) -> None:
    for headers in ({}, bearer(API_KEY), bearer("nope")):
        assert_openai_error(secured.get("/admin/scheduler", headers=headers), 401)
    response = secured.get("/admin/scheduler", headers=bearer(ADMIN_KEY))
    assert response.status_code == 200
    snapshot = response.json()
    assert snapshot["max_model_len"] == scheduler.max_model_len
    assert snapshot["block_pool"]["block_owners"][:3] == ["req-a", "req-a", "*"]
    assert snapshot["executors"][0]["alive"] is True


def test_admin_page_is_self_contained(secured: httpx.Client, scheduler: FakeScheduler) -> None:
    response = secured.get("/admin")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "/admin/scheduler" in page and "block_owners" in page and "localStorage" in page
    assert "http://" not in page and "https://" not in page and "<script src" not in page and "<link" not in page


def test_admin_status_is_open_without_an_admin_key(client: httpx.Client, scheduler: FakeScheduler) -> None:
    assert client.get("/admin/scheduler").status_code == 200


def test_bearer_token_matches() -> None:
    assert bearer_token_matches("Bearer k1", "k1")
    assert bearer_token_matches("bearer k1", "k1")
    assert not bearer_token_matches("Bearer k2", "k1")
    assert not bearer_token_matches("Bearer ", "k1")
    assert not bearer_token_matches(None, "k1")
    assert not bearer_token_matches("Bearer ключ", "k1")
