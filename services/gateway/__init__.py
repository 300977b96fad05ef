"""The API gateway: OpenAI-compatible HTTP in front of a scheduler (docs/architecture.md).

`create_app` and `serve` are imported on first use: they pull in transformers (seconds),
which building a config or `pagedserve --help` should not pay for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pagedserve.services.gateway.config import GatewayConfig, add_gateway_flags, gateway_config_from_args

if TYPE_CHECKING:
    from pagedserve.services.gateway.app import create_app
    from pagedserve.services.gateway.server import serve

__all__ = ["GatewayConfig", "add_gateway_flags", "create_app", "gateway_config_from_args", "serve"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from pagedserve.services.gateway.app import create_app

        return create_app
    if name == "serve":
        from pagedserve.services.gateway.server import serve

        return serve
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
