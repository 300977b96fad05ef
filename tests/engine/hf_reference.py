"""HF transformers as the reference for greedy outputs."""

from __future__ import annotations

import torch

NUM_NEW_TOKENS = 64


def hf_greedy(directory: str, gguf_file: str | None, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """HF transformers' own greedy `generate`, one prompt at a time (no padding), float64."""
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64, **kwargs).eval()
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
            outputs.append(out[0, len(ids) :].tolist())
    return outputs
