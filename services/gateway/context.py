"""What every handler of one gateway app shares: config, tokenizer, the replicas (one
scheduler connection each), metrics, the Redis recorder. One object per app (on `app.state.gateway`),
so several apps can live in one process (tests do) without module-level globals."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from starlette.requests import Request
from transformers import PreTrainedTokenizerBase

from pagedserve.services.gateway.config import GatewayConfig
from pagedserve.services.gateway.detokenizer import TokenTexts
from pagedserve.services.gateway.errors import GatewayError
from pagedserve.services.gateway.grammar_validator import GrammarValidator
from pagedserve.services.gateway.metrics import GatewayMetrics
from pagedserve.services.gateway.request_records import RequestRecorder
from pagedserve.services.gateway.replica_registry import ReplicaRegistry


@dataclass
class GatewayContext:
    config: GatewayConfig
    tokenizer: PreTrainedTokenizerBase
    model_name: str
    replicas: ReplicaRegistry
    metrics: GatewayMetrics
    records: RequestRecorder
    token_texts: TokenTexts
    vocab_size: int
    started_at: int = field(default_factory=lambda: int(time.time()))
    # Structured output: checks that a request's grammar compiles (a worker process).
    grammar_validator: GrammarValidator = field(default_factory=GrammarValidator)
    # The chat template for requests with tools or tool turns; None: the model's own.
    tool_template: str | None = None
    # The most bytes of text one token stands for: prompts are bounded by it before they
    # are tokenized (sampling.check_prompt_bytes). Computed once (0.1 s for 49k tokens).
    max_token_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.max_token_bytes = self.token_texts.longest_token_bytes()

    def check_model(self, model: str | None) -> None:
        """The `model` field is optional; when given it must name the one served model."""
        if model is not None and model != self.model_name:
            raise GatewayError(
                404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                param="model", code="model_not_found",
            )

    async def max_model_len(self) -> int:
        """The replicas' context limit (they serve one model). Every info answer a client
        receives refreshes it (a restarted scheduler may have a new one), so usually no
        query is needed."""
        info = self.replicas.first_info()
        if info is None:
            for replica in self.replicas.all():
                if replica.client.connected:
                    info = await replica.client.info(self.config.status_timeout_s)
                    if info is not None and info.max_model_len > 0:
                        break
        if info is None or info.max_model_len <= 0:
            raise GatewayError(503, self.no_replica_message() + " (no context length known yet)", code="service_unavailable")
        return info.max_model_len

    def no_replica_message(self) -> str:
        addresses = ", ".join(r.address for r in self.replicas.all()) or "none configured"
        return f"no scheduler replica is answering (replicas: {addresses}); retry shortly"


def gateway_context(request: Request) -> GatewayContext:
    context: GatewayContext = request.app.state.gateway
    return context
