"""What every handler of one gateway app shares: config, tokenizer, the scheduler
connection, metrics, the Redis recorder. One object per app (on `app.state.gateway`),
so several apps can live in one process (tests do) without module-level globals."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from starlette.requests import Request
from transformers import PreTrainedTokenizerBase

from services.gateway.config import GatewayConfig
from services.gateway.detokenizer import TokenTexts
from services.gateway.errors import GatewayError
from services.gateway.metrics import GatewayMetrics
from services.gateway.request_records import RequestRecorder
from services.gateway.scheduler_client import SchedulerClient


@dataclass
class GatewayContext:
    config: GatewayConfig
    tokenizer: PreTrainedTokenizerBase
    model_name: str
    scheduler: SchedulerClient
    metrics: GatewayMetrics
    records: RequestRecorder
    token_texts: TokenTexts
    vocab_size: int
    started_at: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, model: str | None) -> None:
        """The `model` field is optional; when given it must name the one served model."""
        if model is not None and model != self.model_name:
            raise GatewayError(
                404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                param="model", code="model_not_found",
            )

    async def max_model_len(self) -> int:
        """The scheduler's context limit. Every info answer the client receives refreshes
        it (a restarted scheduler may have a new one), so usually no query is needed."""
        info = self.scheduler.latest_info
        if info is None or info.max_model_len <= 0:
            info = await self.scheduler.info(self.config.status_timeout_s)
        if info is None or info.max_model_len <= 0:
            raise GatewayError(
                503, f"the scheduler at {self.config.scheduler_address} is not answering (no context length known yet)",
                code="service_unavailable",
            )
        return info.max_model_len

    def replica_id(self) -> str | None:
        """The scheduler replica serving this gateway, as its latest info answer says
        (None before the first): request records name it."""
        info = self.scheduler.latest_info
        return info.replica_id if info is not None else None


def gateway_context(request: Request) -> GatewayContext:
    context: GatewayContext = request.app.state.gateway
    return context
