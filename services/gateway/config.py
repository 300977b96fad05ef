"""The gateway's one typed config, built from CLI flags and environment variables here.

Secrets (API key, admin key) may come from the environment so they need not appear in a
process listing; a flag wins over the environment when both are given.
"""

from __future__ import annotations

import argparse
import os
import uuid

import msgspec

API_KEY_ENV = "PAGEDSERVE_API_KEY"
ADMIN_KEY_ENV = "PAGEDSERVE_ADMIN_KEY"


def default_gateway_id() -> str:
    """Unique per process: the scheduler's ROUTER routes replies by this identity, so two
    gateways sharing one would steal each other's tokens."""
    return f"gateway-{uuid.uuid4().hex[:12]}"


class GatewayConfig(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8000
    scheduler_address: str = "tcp://127.0.0.1:5555"
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
    redis_record_ttl_s: int = 24 * 3600
    curve_keys_dir: str | None = None  # CURVE-secure the scheduler link (shared/zmq_security.py)
    log_level: str = "info"

    def validate(self) -> None:
        """Raise ValueError for settings no gateway could run with."""
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be at least 1, got {self.max_n}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        for name in ("stall_timeout_s", "submit_timeout_s", "status_timeout_s", "request_timeout_s", "body_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    defaults = GatewayConfig(gateway_id="")
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--scheduler-address", default=defaults.scheduler_address, help="the scheduler's gateway ROUTER")
    parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), help="request metadata mirror (default: $REDIS_URL, else none)")
    parser.add_argument("--api-key", default=None, help=f"require this Bearer token on /v1 (default: ${API_KEY_ENV})")
    parser.add_argument("--admin-key", default=None, help=f"require this Bearer token on /admin/scheduler (default: ${ADMIN_KEY_ENV})")
    parser.add_argument("--gateway-id", default=None, help="ZMQ identity, unique per gateway (default: random)")
    parser.add_argument("--max-n", type=int, default=defaults.max_n)
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help="larger request bodies are a 413")
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout_s, metavar="SECONDS", help="a request body not received by then is a 408")
    parser.add_argument("--max-logprobs", type=int, default=defaults.max_logprobs)
    parser.add_argument("--stall-timeout", type=float, default=defaults.stall_timeout_s, metavar="SECONDS")
    parser.add_argument(
        "--request-timeout", type=float, default=defaults.request_timeout_s, metavar="SECONDS",
        help="default and ceiling of a request's deadline (its `timeout` field may shorten it)",
    )
    parser.add_argument("--zmq-curve-keys", default=None, metavar="DIR", help="CURVE keys from `pagedserve keys DIR`: encrypt and authenticate the scheduler link")
    parser.add_argument("--log-level", default=defaults.log_level, choices=["critical", "error", "warning", "info", "debug"])


def gateway_config_from_args(args: argparse.Namespace) -> GatewayConfig:
    config = GatewayConfig(
        host=args.host,
        port=args.port,
        scheduler_address=args.scheduler_address,
        model=args.model,
        redis_url=args.redis_url or None,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        admin_key=args.admin_key or os.environ.get(ADMIN_KEY_ENV) or None,
        gateway_id=args.gateway_id or default_gateway_id(),
        max_n=args.max_n,
        max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout,
        max_logprobs=args.max_logprobs,
        stall_timeout_s=args.stall_timeout,
        request_timeout_s=args.request_timeout,
        curve_keys_dir=args.zmq_curve_keys,
        log_level=args.log_level,
    )
    config.validate()
    return config
