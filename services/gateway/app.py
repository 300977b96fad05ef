"""The gateway's Starlette app: routes, auth, error shapes, and the lifespan that owns the
replicas' connections and the Redis writer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from transformers import PreTrainedTokenizerBase

from pagedserve.services.gateway.admin import admin_page, scheduler_status
from pagedserve.services.gateway.auth import BearerAuthMiddleware
from pagedserve.services.gateway.chat_completions import create_chat_completion
from pagedserve.services.gateway.completions import create_completion
from pagedserve.services.gateway.config import GatewayConfig
from pagedserve.services.gateway.chat_template import tool_template
from pagedserve.services.gateway.context import GatewayContext, gateway_context
from pagedserve.services.gateway.detokenizer import TokenTexts
from pagedserve.services.gateway.errors import GatewayError, gateway_error_handler, http_exception_handler, unexpected_error_handler
from pagedserve.services.gateway.metrics import GatewayMetrics
from pagedserve.services.gateway.openapi import openapi_route
from pagedserve.services.gateway.openai_protocol import ModelCard, ModelList
from pagedserve.services.gateway.request_records import RequestRecorder
from pagedserve.services.gateway.tokenize import detokenize, tokenize
from pagedserve.services.gateway.replica_registry import Replica, ReplicaRegistry
from pagedserve.shared.model_source import resolve_model_source
from pagedserve.shared.tokenizer import load_tokenizer, read_chat_template
from pagedserve.shared.zmq_security import curve_client

log = logging.getLogger(__name__)


async def list_models(request: Request) -> Response:
    context = gateway_context(request)
    info = context.replicas.first_info()
    max_model_len = info.max_model_len if info is not None and info.max_model_len > 0 else None
    card = ModelCard(context.model_name, "model", context.started_at, "pagedserve", max_model_len)
    return Response(msgspec.json.encode(ModelList("list", [card])), media_type="application/json")


async def health(request: Request) -> Response:
    """200 when some replica's scheduler answers within status_timeout_s and has a live
    executor: a gateway that cannot generate should be taken out of rotation. Each
    replica is listed with its state. Redis is reported but never fails the check (it is
    optional): Redis down is "degraded", 200, and routing falls back to the last loads."""
    context = gateway_context(request)
    replicas = context.replicas.all()
    states, redis_state = await asyncio.gather(
        asyncio.gather(*(_replica_state(context, replica) for replica in replicas)), context.records.health()
    )
    if redis_state == "ok" and context.replicas.redis_enabled and not context.replicas.redis_healthy:
        await context.replicas.refresh()  # a health check is what tells routing Redis is back
        redis_state = "ok" if context.replicas.redis_healthy else "degraded"
    ok_states = [state for state in states if state["scheduler"] == "ok"]
    ok = bool(ok_states)
    if ok:
        scheduler_state = "ok"
    elif any(state["scheduler"] == "no live executor" for state in states):
        scheduler_state = "no live executor"
    else:
        scheduler_state = "not answering"
    degraded = redis_state == "degraded" or len(ok_states) < len(states)
    body = {
        "status": ("degraded" if degraded else "ok") if ok else "unavailable",
        "scheduler": scheduler_state,
        "executors_alive": sum(int(state["executors_alive"]) for state in states),
        "redis": redis_state,
        "gateway_id": context.config.gateway_id,
        "replicas": states,
    }
    return Response(msgspec.json.encode(body), 200 if ok else 503, media_type="application/json")


async def _replica_state(context: GatewayContext, replica: Replica) -> dict[str, str | int]:
    asked_at = time.time()
    # A replica not connected is not asked: its answer would only be a timeout.
    info = await replica.client.info(context.config.status_timeout_s) if replica.client.connected else None
    replica.saw_info(info, asked_at)
    num_alive = info.num_executors_alive if info is not None else 0
    if info is None:
        state = "not answering"
    elif num_alive == 0:
        state = "no live executor"
    else:
        state = "ok"
    return {
        "replica_id": replica.replica_id, "address": replica.address, "scheduler": state, "executors_alive": num_alive,
        "load": replica.load, "routable": int(replica.routable),
    }


async def metrics(request: Request) -> Response:
    context = gateway_context(request)
    replicas = context.replicas.all()
    infos = await asyncio.gather(*(
        replica.client.info(context.config.status_timeout_s, max_age_s=0.5) if replica.client.connected else _none()
        for replica in replicas
    ))
    context.metrics.refresh_replicas([(replica.replica_id, info) for replica, info in zip(replicas, infos)])
    return Response(context.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _none() -> None:
    return None


def create_app(config: GatewayConfig, *, tokenizer: PreTrainedTokenizerBase | None = None) -> Starlette:
    """The app for `config`. Loading the tokenizer takes seconds; pass one already loaded
    (for the same model) to skip that, as tests running several apps do."""
    config.validate()
    source = resolve_model_source(config.model)
    if tokenizer is None:
        tokenizer = load_tokenizer(source, config.chat_template)
    elif config.chat_template:
        tokenizer.chat_template = read_chat_template(config.chat_template)
    model_name = source.name
    context = GatewayContext(
        config=config,
        tokenizer=tokenizer,
        model_name=model_name,
        replicas=ReplicaRegistry(
            config.scheduler_addresses, config.gateway_id, config.redis_url, submit_timeout_s=config.submit_timeout_s,
            curve=curve_client(config.curve_keys_dir) if config.curve_keys_dir else None,
            load_penalty_tokens=config.routing_load_penalty_tokens, policy=config.routing,
        ),
        metrics=GatewayMetrics(model_name),
        records=RequestRecorder(config.redis_url, config.redis_record_ttl_s),
        token_texts=TokenTexts(tokenizer),
        vocab_size=len(tokenizer),
        tool_template=tool_template(tokenizer, config.tool_chat_template),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await context.replicas.start()
        await context.records.start()
        # Learn max_model_len early so the first request need not ask; no answer is fine
        # (the scheduler may start after us), the first request will ask again.
        warm_up = asyncio.gather(*(r.client.info(config.status_timeout_s) for r in context.replicas.all()))
        log.info(
            "gateway %s serving %s, replicas at %s", config.gateway_id, model_name,
            ", ".join(r.address for r in context.replicas.all()),
        )
        try:
            yield
        finally:
            warm_up.cancel()
            await context.grammar_validator.close()
            await context.records.close()
            await context.replicas.close()

    routes = [
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/openapi.json", openapi_route(config), methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/admin", admin_page, methods=["GET"]),
        Route("/admin/scheduler", scheduler_status, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(BearerAuthMiddleware, api_key=config.api_key, admin_key=config.admin_key)],
        exception_handlers={
            GatewayError: gateway_error_handler,
            HTTPException: http_exception_handler,
            Exception: unexpected_error_handler,
        },
        lifespan=lifespan,
    )
    app.state.gateway = context
    return app
