"""The gateway's Starlette app: routes, auth, error shapes, and the lifespan that owns the
scheduler connection and the Redis writer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
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

from services.gateway.admin import admin_page, scheduler_status
from services.gateway.auth import BearerAuthMiddleware
from services.gateway.chat_completions import create_chat_completion
from services.gateway.completions import create_completion
from services.gateway.config import GatewayConfig
from services.gateway.context import GatewayContext, gateway_context
from services.gateway.detokenizer import TokenTexts
from services.gateway.errors import GatewayError, gateway_error_handler, http_exception_handler, unexpected_error_handler
from services.gateway.metrics import GatewayMetrics
from services.gateway.openapi import openapi_route
from services.gateway.openai_protocol import ModelCard, ModelList
from services.gateway.request_records import RequestRecorder
from services.gateway.scheduler_client import SchedulerClient
from shared.model_source import resolve_model_source
from shared.tokenizer import load_tokenizer
from shared.zmq_security import curve_client

log = logging.getLogger(__name__)


async def list_models(request: Request) -> Response:
    context = gateway_context(request)
    info = context.scheduler.latest_info
    max_model_len = info.max_model_len if info is not None and info.max_model_len > 0 else None
    card = ModelCard(context.model_name, "model", context.started_at, "pagedserve", max_model_len)
    return Response(msgspec.json.encode(ModelList("list", [card])), media_type="application/json")


async def health(request: Request) -> Response:
    """200 only when the scheduler answers within status_timeout_s and has a live
    executor: a gateway that cannot generate should be taken out of rotation. Redis is
    reported but never fails the check (it is optional): Redis down is "degraded", 200."""
    context = gateway_context(request)
    info, redis_state = await asyncio.gather(
        context.scheduler.info(context.config.status_timeout_s), context.records.health()
    )
    num_alive = info.num_executors_alive if info is not None else 0
    if info is None:
        scheduler_state = "not answering"
    elif num_alive == 0:
        scheduler_state = "no live executor"
    else:
        scheduler_state = "ok"
    ok = scheduler_state == "ok"
    body = {
        "status": ("degraded" if redis_state == "degraded" else "ok") if ok else "unavailable",
        "scheduler": scheduler_state,
        "executors_alive": num_alive,
        "redis": redis_state,
        "gateway_id": context.config.gateway_id,
    }
    return Response(msgspec.json.encode(body), 200 if ok else 503, media_type="application/json")


async def metrics(request: Request) -> Response:
    context = gateway_context(request)
    context.metrics.refresh(await context.scheduler.info(context.config.status_timeout_s, max_age_s=0.5))
    return Response(context.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def create_app(config: GatewayConfig, *, tokenizer: PreTrainedTokenizerBase | None = None) -> Starlette:
    """The app for `config`. Loading the tokenizer takes seconds; pass one already loaded
    (for the same model) to skip that, as tests running several apps do."""
    config.validate()
    source = resolve_model_source(config.model)
    if tokenizer is None:
        tokenizer = load_tokenizer(source)
    model_name = source.name
    context = GatewayContext(
        config=config,
        tokenizer=tokenizer,
        model_name=model_name,
        scheduler=SchedulerClient(
            config.scheduler_address, config.gateway_id, config.submit_timeout_s,
            curve=curve_client(config.curve_keys_dir) if config.curve_keys_dir else None,
        ),
        metrics=GatewayMetrics(model_name),
        records=RequestRecorder(config.redis_url, config.redis_record_ttl_s),
        token_texts=TokenTexts(tokenizer),
        vocab_size=len(tokenizer),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await context.scheduler.start()
        await context.records.start()
        # Learn max_model_len early so the first request need not ask; no answer is fine
        # (the scheduler may start after us), the first request will ask again.
        warm_up = asyncio.create_task(context.scheduler.info(config.status_timeout_s))
        log.info("gateway %s serving %s, scheduler at %s", config.gateway_id, model_name, config.scheduler_address)
        try:
            yield
        finally:
            warm_up.cancel()
            await context.records.close()
            await context.scheduler.close()

    routes = [
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
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
