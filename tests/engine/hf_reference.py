"""HF transformers as the reference for greedy outputs."""

from __future__ import annotations

import torch

NUM_NEW_TOKENS = 64


def hf_float64(directory: str, gguf_file: str | None = None):  # type: ignore[no-untyped-def]
    """HF transformers' model of a GGUF file or HF folder, in float64, for inference."""
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64, **kwargs).eval()


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """HF transformers' own greedy `generate`, one prompt at a time (no padding)."""
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


def hf_greedy_ignoring_eos(model, prompts: list[list[int]], num_new_tokens: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Exactly `num_new_tokens` argmax tokens after each prompt, an end-of-sequence token
    included like any other (what `ignore_eos` asks of us; `generate` would stop there or,
    with `min_new_tokens`, mask it). Prompts of one length run as one batch: no padding."""
    from transformers import DynamicCache

    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(index)
    outputs: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        for indices in by_length.values():
            input_ids = torch.tensor([prompts[i] for i in indices])
            cache = DynamicCache()
            generated = []
            for _ in range(num_new_tokens):
                logits = model(input_ids, cache=cache, use_cache=True).logits[:, -1]
                input_ids = logits.argmax(dim=-1, keepdim=True)
                generated.append(input_ids)
            for row, index in enumerate(indices):
                outputs[index] = torch.cat(generated, dim=1)[row].tolist()
    return outputs
