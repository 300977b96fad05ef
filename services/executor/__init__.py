"""The executor: the model over a paged KV cache, run step by step for a scheduler.

`ExecutorConfig` is torch-free (the CLI builds it in every process; its `EngineConfig` is
the engine package's); `ModelRunner` and `serve` load torch and are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pagedserve.services.executor.config import ExecutorConfig

if TYPE_CHECKING:
    from pagedserve.services.executor.model_runner import ModelRunner
    from pagedserve.services.executor.service import serve

__all__ = ["ExecutorConfig", "ModelRunner", "serve"]


def __getattr__(name: str) -> Any:
    if name == "ModelRunner":
        from pagedserve.services.executor.model_runner import ModelRunner

        return ModelRunner
    if name == "serve":
        from pagedserve.services.executor.service import serve

        return serve
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
