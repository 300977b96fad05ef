"""Shared fixtures for engine tests: the prompts, HF reference outputs, a random GQA Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedserve.shared.model_source import ModelSource, default_model_source
from pagedserve.shared.tokenizer import encode_chat, encode_prompt, load_tokenizer
from tests.engine.hf_reference import NUM_NEW_TOKENS, hf_float64, hf_greedy

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "1, 2, 3, 4,",
]
CHAT_PROMPTS = [
    "What is the capital of Japan?",
    "Explain in detail how virtual memory paging works in an operating system, why page tables "
    "are needed, what a TLB is, and how this relates to allocating memory for many concurrent "
    "programs. Give an example with numbers for the page size and the number of pages used.",
    "Write a short poem about the sea.",
    "List three prime numbers.",
]


def prompt_token_ids(source: ModelSource) -> list[list[int]]:
    """Eight prompts of very different lengths (5 to ~130 tokens)."""
    tokenizer = load_tokenizer(source)
    raw = [encode_prompt(tokenizer, p) for p in RAW_PROMPTS]
    chat = [encode_chat(tokenizer, [{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    return raw + chat


@pytest.fixture(scope="session")
def smollm2_prompts() -> list[list[int]]:
    return prompt_token_ids(default_model_source())


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_prompts: list[list[int]], hf_model_float64) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return hf_greedy(hf_model_float64, smollm2_prompts, NUM_NEW_TOKENS)


@pytest.fixture(scope="session")
def random_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small randomly initialised Llama with GQA (8 query heads, 2 KV heads) and llama3
    RoPE scaling, saved as an HF folder with safetensors and the SmolLM2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("random-llama")
    tokenizer = load_tokenizer(default_model_source())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        initializer_range=0.1,  # peaky logits: no greedy near-ties
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 50000.0,
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


RANDOM_LLAMA_PROMPTS = [
    [1] + [(i * 37 + j * 11) % 40000 + 100 for j in range(n)] for i, n in enumerate([3, 17, 40, 90, 5, 64, 130, 33])
]


@pytest.fixture(scope="session")
def random_llama_reference(random_llama_dir: Path) -> list[list[int]]:
    """HF's float64 greedy continuations of RANDOM_LLAMA_PROMPTS on the random GQA Llama
    (NUM_NEW_TOKENS each; a test wanting fewer takes a prefix: greedy is causal)."""
    return hf_greedy(hf_float64(str(random_llama_dir)), RANDOM_LLAMA_PROMPTS, NUM_NEW_TOKENS)
