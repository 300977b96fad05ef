"""Running the gateway: uvicorn around `create_app`."""

from __future__ import annotations

import logging

import uvicorn

from pagedserve.services.gateway.app import create_app
from pagedserve.services.gateway.config import GatewayConfig


def serve(config: GatewayConfig) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM: uvicorn drains open requests first)."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(config)
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        # Streams can be long; give them a bounded while to finish on shutdown.
        timeout_graceful_shutdown=10,
    )
