"""The gateway's one typed config, built from CLI flags and environment variables here.

Secrets (API key, admin key) may come from the environment so they need not appear in a
process listing; a flag wins over the environment when both are given.
"""

from __future__ import annotations

import argparse
import os
import uuid
from typing import Literal

import msgspec

from pagedserve.services.config_flags import config_from_args

API_KEY_ENV = "PAGEDSERVE_API_KEY"
ADMIN_KEY_ENV = "PAGEDSERVE_ADMIN_KEY"


def default_gateway_id() -> str:
    """Unique per process: the scheduler's ROUTER routes replies by this identity, so two
    gateways sharing one would steal each other's tokens."""
    return f"gateway-{uuid.uuid4().hex[:12]}"


class GatewayConfig(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8000
    # One replica's scheduler, or several comma-separated (replicas registered in Redis
    # are discovered as well: services/gateway/replica_registry.py).
    scheduler_address: str = "tcp://127.0.0.1:5555"
    # Routing: a request costs a replica this many cached prompt tokens' worth of score
    # (services/gateway/router.py).
    routing_load_penalty_tokens: int = 32
    routing: str = "cache_aware"  # or "round_robin", the cache-blind baseline
    model: str | None = None  # GGUF file or HF folder; None: the embedded SmolLM2-135M-Instruct
    redis_url: str | None = None  # None: no request metadata mirrored anywhere
    api_key: str | None = None  # None: /v1 routes are open
    admin_key: str | None = None  # None: /admin/scheduler is open
    gateway_id: str = msgspec.field(default_factory=default_gateway_id)
    max_n: int = 16  # most choices (prompts x n) one HTTP request may fan out to
    max_body_bytes: int = 1 << 20  # larger bodies are refused (413) while they stream in
    body_timeout_s: float = 30.0  # a body not all received by then is a 408
    max_logprobs: int = 20
    max_stop_strings: int = 16
    # A request that has produced nothing for stall_timeout_s makes the gateway ask the
    # scheduler whether it still holds it (queueing under load is legitimate; a lost
    # request or a dead scheduler is not): an answer without it, or no answer, is a 503.
    stall_timeout_s: float = 10.0
    submit_timeout_s: float = 5.0  # waiting for a connected scheduler to take a message
    status_timeout_s: float = 1.0  # /health, /metrics, /admin/scheduler, stall checks
    # End to end, after which the request is aborted at the scheduler; a request's own
    # `timeout` field may shorten it, never lengthen it.
    request_timeout_s: float = 600.0
    # A streamed chunk not written within this (the client stopped reading and the
    # socket's buffers are full) ends the stream and aborts the request.
    stream_write_timeout_s: float = 30.0
    redis_record_ttl_s: int = 24 * 3600
    curve_keys_dir: str | None = None  # CURVE-secure the scheduler link (shared/zmq_security.py)
    log_level: str = "info"
    # Chat template for requests with tools (services/gateway/chat_template.py): "auto"
    # uses the model's own when it renders tools, else the Hermes-style fallback.
    tool_chat_template: Literal["auto", "hermes", "model"] = "auto"
    # A request's `priority` jumps queues and escapes preemption: honoured only under
    # "priority"; with "fcfs" a non-zero one is a 400 (vLLM's rule) and requests are
    # served in arrival order.
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    # A Jinja chat template file replacing the model's own (vLLM's --chat-template): for
    # models that carry none, whose chat requests are otherwise a 400 naming this flag.
    chat_template: str | None = None

    @property
    def scheduler_addresses(self) -> list[str]:
        return [address.strip() for address in self.scheduler_address.split(",") if address.strip()]

    def validate(self) -> None:
        """Raise ValueError for settings no gateway could run with."""
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if not self.scheduler_addresses:
            raise ValueError("scheduler_address must name at least one scheduler")
        if self.routing not in ("cache_aware", "round_robin"):
            raise ValueError(f"routing must be cache_aware or round_robin, got {self.routing!r}")
        if self.routing_load_penalty_tokens < 0:
            raise ValueError(f"routing_load_penalty_tokens must be >= 0, got {self.routing_load_penalty_tokens}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be at least 1, got {self.max_n}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        for name in (
            "stall_timeout_s", "submit_timeout_s", "status_timeout_s", "request_timeout_s", "body_timeout_s",
            "stream_write_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    """Every gateway flag. Each flag's dest is its GatewayConfig field's name
    (services/config_flags.py): `gateway_config_from_args` and `pagedserve up` rely on it."""
    defaults = GatewayConfig(gateway_id="")
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument(
        "--scheduler-address", default=defaults.scheduler_address,
        help="the scheduler's gateway ROUTER; several replicas: comma-separated (with --redis-url, replicas "
        "registered in Redis are discovered too)",
    )
    parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), help="request metadata mirror (default: $REDIS_URL, else none)")
    parser.add_argument("--api-key", default=None, help=f"require this Bearer token on /v1 (default: ${API_KEY_ENV})")
    parser.add_argument("--admin-key", default=None, help=f"require this Bearer token on /admin/scheduler (default: ${ADMIN_KEY_ENV})")
    parser.add_argument("--gateway-id", default=None, help="ZMQ identity, unique per gateway (default: random)")
    parser.add_argument(
        "--zmq-curve-keys", dest="curve_keys_dir", default=None, metavar="DIR",
        help="CURVE keys from `pagedserve keys DIR`: encrypt and authenticate the scheduler link",
    )
    add_gateway_serving_flags(parser)


def add_gateway_serving_flags(parser: argparse.ArgumentParser) -> None:
    """How the gateway serves (routing, request limits, timeouts): `pagedserve up` offers
    these as they are, and hands them to its gateway."""
    defaults = GatewayConfig(gateway_id="")
    parser.add_argument(
        "--routing", default=defaults.routing, choices=["cache_aware", "round_robin"],
        help="how requests pick a replica: the longest cached prefix discounted by load, or in turn (a baseline)",
    )
    parser.add_argument(
        "--routing-load-penalty", dest="routing_load_penalty_tokens", type=int,
        default=defaults.routing_load_penalty_tokens, metavar="TOKENS",
        help="routing score: cached prompt tokens on a replica minus this per request running or waiting there",
    )
    parser.add_argument("--max-n", type=int, default=defaults.max_n)
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help="larger request bodies are a 413")
    parser.add_argument(
        "--body-timeout", dest="body_timeout_s", type=float, default=defaults.body_timeout_s, metavar="SECONDS",
        help="a request body not received by then is a 408",
    )
    parser.add_argument("--max-logprobs", type=int, default=defaults.max_logprobs)
    parser.add_argument("--stall-timeout", dest="stall_timeout_s", type=float, default=defaults.stall_timeout_s, metavar="SECONDS")
    parser.add_argument(
        "--request-timeout", dest="request_timeout_s", type=float, default=defaults.request_timeout_s, metavar="SECONDS",
        help="default and ceiling of a request's deadline (its `timeout` field may shorten it)",
    )
    parser.add_argument(
        "--stream-write-timeout", dest="stream_write_timeout_s", type=float, default=defaults.stream_write_timeout_s,
        metavar="SECONDS",
        help="a streamed chunk the client has not taken within this ends its stream and aborts the request",
    )
    parser.add_argument("--log-level", default=defaults.log_level, choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument(
        "--scheduling-policy", default=defaults.scheduling_policy, choices=["fcfs", "priority"],
        help="fcfs: requests served in arrival order, a request's `priority` is a 400; priority: its `priority` "
        "(lower first) orders queues and preemption",
    )
    parser.add_argument(
        "--tool-chat-template", default=defaults.tool_chat_template, choices=["auto", "hermes", "model"],
        help="chat template for requests with tools: the model's own if it renders tools (auto), always the "
        "Hermes-style <tool_call> fallback (hermes), or always the model's (model)",
    )
    parser.add_argument(
        "--chat-template", default=None, metavar="FILE",
        help="a Jinja chat template replacing the model's own (for models without one: their chat requests are "
        "a 400 otherwise)",
    )


def gateway_config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The flags' config; the keys fall back to the environment (a flag wins), the id to a
    fresh random one."""
    config = config_from_args(
        GatewayConfig,
        args,
        redis_url=args.redis_url or None,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        admin_key=args.admin_key or os.environ.get(ADMIN_KEY_ENV) or None,
        gateway_id=getattr(args, "gateway_id", None) or default_gateway_id(),
    )
    config.validate()
    return config
