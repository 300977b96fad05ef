"""Tokenizer and chat template from the model's own files (transformers), never a hub."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from pagedserve.shared.model_source import ModelSource


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    # Imported here, not at the top: AutoTokenizer imports torch, and importing the
    # gateway's modules must not (tests/test_import_boundaries.py). Loading a tokenizer
    # still does: transformers reads configs and GGUF files with torch at hand.
    from transformers import AutoTokenizer

    if source.gguf_file is not None:
        return AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    return AutoTokenizer.from_pretrained(source.directory)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Exactly HF's tokenization of a raw prompt: `tokenizer(prompt).input_ids`."""
    return list(tokenizer(prompt).input_ids)


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Messages through the model's chat template, with the assistant turn opened."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding-like mapping; 4.x a plain list.
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids)
