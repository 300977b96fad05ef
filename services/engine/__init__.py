"""In-process engine: scheduler core and model runner wired by plain calls."""

from pagedserve.services.engine.llm_engine import Completion, CompletionOutput, LLMEngine

__all__ = ["Completion", "CompletionOutput", "LLMEngine"]
