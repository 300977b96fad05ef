"""Offline throughput: the in-process engine vs HF transformers `generate` on the same
chat prompts (the workload of NOTES.md: 64 prompts of 37-254 tokens, 128 new tokens each).

    python -m benchmarks.throughput [--num-prompts 64] [--max-tokens 128] [--hf-batch 8 32]

Prints a table of output tokens per second. HF runs with static batches (left padding),
which is how `generate` is used for offline work.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from services.engine import LLMEngine
from shared.config import EngineConfig
from shared.sampling_params import SamplingParams
from shared.tokenizer import encode_chat

TOPICS = ["paging", "the ocean", "prime numbers", "the French revolution", "compilers", "photosynthesis",
          "black holes", "bread baking", "chess openings", "volcanoes", "neural networks", "the Roman empire"]
FILLER = ("Please be thorough, give concrete examples, explain the key ideas step by step, mention common "
          "misconceptions, and finish with a short summary that a beginner could follow. ")


def make_prompts(tokenizer, num_prompts: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for i in range(num_prompts):
        text = f"Tell me about {TOPICS[i % len(TOPICS)]}. " + FILLER * rng.randint(0, 6)
        prompts.append(encode_chat(tokenizer, [{"role": "user", "content": text}]))
    return prompts


def bench_engine(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    completions = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(c.token_ids) for c in completions)


def bench_hf(source, prompts: list[list[int]], max_tokens: int, batch_size: int, pad_id: int) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32, **kwargs).eval()
    generated = 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=pad_id)
            generated += (out.shape[1] - width) * len(batch)
    return time.perf_counter() - start, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--hf-batch", type=int, nargs="*", default=[], help="also time HF generate at these batch sizes")
    args = parser.parse_args()

    engine = LLMEngine(EngineConfig(max_num_seqs=args.max_num_seqs))
    prompts = make_prompts(engine.tokenizer, args.num_prompts)
    lengths = [len(p) for p in prompts]
    print(f"{len(prompts)} prompts, {min(lengths)}-{max(lengths)} tokens, {args.max_tokens} new tokens each, "
          f"torch threads={torch.get_num_threads()}, device={engine.runner.device}, dtype={engine.runner.dtype}")
    rows = []
    elapsed, tokens = bench_engine(engine, prompts, args.max_tokens)
    rows.append((f"pagedserve engine (max_num_seqs={args.max_num_seqs})", elapsed, tokens))
    for batch in args.hf_batch:
        pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
        elapsed, tokens = bench_hf(engine.model_source, prompts, args.max_tokens, batch, pad)
        rows.append((f"HF generate, static batch {batch}", elapsed, tokens))
    print(f"\n| system | output tokens | seconds | output tok/s |\n|---|---|---|---|")
    for name, elapsed, tokens in rows:
        print(f"| {name} | {tokens} | {elapsed:.1f} | {tokens / elapsed:.1f} |")


if __name__ == "__main__":
    main()
