"""Tokenizer and chat template from the model's own files (transformers), never a hub:
an HF folder's tokenizer files (its template in `chat_template.jinja` or
`tokenizer_config.json`) or a GGUF's `tokenizer.ggml.*` metadata (its template in
`tokenizer.chat_template`). A template file given by the user (`--chat-template`, vLLM's
flag) replaces the model's own: many GGUFs carry none (the Gemma 3 270M Q4_K_M, for one).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from pagedserve.shared.model_source import ModelSource
from pagedserve.shared.tokenizer_cache import load_gguf_tokenizer


def read_chat_template(path: str) -> str:
    """A Jinja chat template from a file, refused when missing or empty."""
    try:
        with open(path, encoding="utf-8") as file:
            template = file.read()
    except OSError as error:
        raise ValueError(f"cannot read the chat template file {path}: {error.strerror or error}") from None
    if not template.strip():
        raise ValueError(f"the chat template file {path} is empty")
    return template


def load_tokenizer(source: ModelSource, chat_template_file: str | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer; with `chat_template_file`, that template replaces its own."""
    template = read_chat_template(chat_template_file) if chat_template_file else None
    # Imported here, not at the top: AutoTokenizer imports torch, and importing the
    # gateway's modules must not (tests/test_import_boundaries.py). Loading a tokenizer
    # still does: transformers reads configs and GGUF files with torch at hand.
    from transformers import AutoTokenizer

    if source.gguf_file is not None:
        tokenizer = load_gguf_tokenizer(source.directory, source.gguf_file)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source.directory)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Exactly HF's tokenization of a raw prompt: `tokenizer(prompt).input_ids`."""
    return list(tokenizer(prompt).input_ids)


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Messages through the model's chat template, with the assistant turn opened."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding-like mapping; 4.x a plain list.
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids)
