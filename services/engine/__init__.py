"""In-process engine: scheduler core and model runner wired by plain calls, and the
`EngineConfig` both halves read.

`EngineConfig` is torch-free and imported at once (the executor and the CLI read it
without the scheduler or torch); the engine itself loads on first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pagedserve.services.engine.config import EngineConfig

if TYPE_CHECKING:
    from pagedserve.services.engine.llm_engine import Completion, CompletionOutput, LLMEngine

__all__ = ["Completion", "CompletionOutput", "EngineConfig", "LLMEngine"]


def __getattr__(name: str) -> Any:
    if name in ("Completion", "CompletionOutput", "LLMEngine"):
        from pagedserve.services.engine import llm_engine

        return getattr(llm_engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
