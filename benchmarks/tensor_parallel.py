"""Tensor parallel: tok/s at T = 1 and T = 2, all-reduce time a step.

Real processes, a real gloo group on CPU (NCCL on CUDA).

    python -m benchmarks.tensor_parallel [--sizes 1 2] [--num-requests 16] [--max-tokens 64]
    python -m benchmarks.tensor_parallel --model DIR     # an HF folder whose heads split by T

Without --model it builds a random Llama near the embedded SmolLM2's shape, with 8 query
and 4 KV heads of 64 (SmolLM2's 9 heads do not split in two), saved as an HF folder in a
temporary directory. The same requests run at each T, greedy, EOS ignored.

What the CPU figure means: the ranks of one host share its cores (each gets cores / T
threads), so T = 2 cannot beat T = 1 there; it pays the all-reduces (two a layer) and a
token broadcast a step on top of the same arithmetic. On CPU, tensor parallel is for
correctness and for models too big for one host's memory; the speed-up is a GPU matter
(each rank on its own device, NCCL all-reduces). The all-reduce time per step is rank 0's
wall time inside `all_reduce` (gloo's is synchronous), waiting for the slower rank
included.

On a machine shared with other work, run it with OMP_NUM_THREADS=1 (one thread a rank,
for T = 1 too): two threads on contended cores spin in OpenMP and made T = 1 look six
times slower than it is. Measured here (2 busy cores, OMP_NUM_THREADS=1, 16 requests of
16-128 prompt tokens, 48 output tokens each, float32): T = 1 70.9 tok/s, T = 2 55.8 tok/s,
60 all-reduces a step taking 125 ms of a 287 ms step (about 2.1 ms each, 44 %).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.shared.sampling_params import SamplingParams


def save_random_llama(directory: Path) -> None:
    """Near SmolLM2's shape (MLP 1536, 30 layers, head_dim 64) with 8 heads and 4 KV heads
    (hidden 512 instead of 576), so that T = 2 and T = 4 split it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pagedserve.shared.model_source import default_model_source
    from pagedserve.shared.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(default_model_source())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def bench(model: str, size: int, requests: list[list[int]], max_tokens: int, dtype: str) -> dict[str, float]:
    config = EngineConfig(model=model, dtype=dtype, tensor_parallel_size=size, kv_cache_memory_bytes=256 << 20)
    with LLMEngine(config) as engine:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        engine.generate(requests[:1], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
        group = engine.runner.group
        reduce_s_before, reduces_before = group.all_reduce_s, group.num_all_reduces
        for prompt in requests:
            engine.add_request(prompt, params)
        num_steps, num_tokens = 0, 0
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            num_tokens += sum(len(delta.new_token_ids) for delta in engine.step())
            num_steps += 1
        elapsed_s = time.perf_counter() - start
        reduce_s = group.all_reduce_s - reduce_s_before
        return {
            "tensor_parallel_size": size,
            "output_tokens": num_tokens,
            "seconds": round(elapsed_s, 2),
            "tok_per_s": round(num_tokens / elapsed_s, 1),
            "steps": num_steps,
            "all_reduces_per_step": round((group.num_all_reduces - reduces_before) / num_steps, 1),
            "all_reduce_ms_per_step": round(1000 * reduce_s / num_steps, 2),
            "all_reduce_share": round(reduce_s / elapsed_s, 3),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF folder or GGUF (default: a random 8-head Llama of SmolLM2's size)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            model = str(Path(scratch) / "random-llama-8-heads")
            save_random_llama(Path(model))
        rng = random.Random(0)
        requests = [[rng.randrange(100, 40000) for _ in range(rng.randint(16, 128))] for _ in range(args.num_requests)]
        rows = [bench(model, size, requests, args.max_tokens, args.dtype) for size in args.sizes]
    print(f"{'T':>2} {'tok/s':>8} {'steps':>6} {'all-reduces/step':>17} {'all-reduce ms/step':>19} {'share':>6}")
    for row in rows:
        print(f"{row['tensor_parallel_size']:>2} {row['tok_per_s']:>8} {row['steps']:>6} {row['all_reduces_per_step']:>17} "
              f"{row['all_reduce_ms_per_step']:>19} {row['all_reduce_share']:>6}")
    print(json.dumps({"benchmark": "tensor_parallel", "rows": rows}))


if __name__ == "__main__":
    main()
