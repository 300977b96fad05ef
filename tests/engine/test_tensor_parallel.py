"""Tensor parallel on the whole engine: T ranks as real processes in a real gloo group give
the same tokens as one rank and as HF transformers, in float64.

One mixed batch per model exercises everything a rank must mirror: eight greedy prompts
(compared with HF), one of them sharing a long prefix with another (a prefix-cache hit),
parallel samples (n > 1, seeded: forks on every rank, rank 0's sampled tokens broadcast)
and a beam search (beam forks and the scheduler's picks on every rank), all under a small
token budget (chunked prefill). T = 2 runs a random GQA Llama saved as an HF folder (8
heads, 2 KV heads); T = 3 the embedded SmolLM2 (9 heads, 3 KV heads: one each).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.services.executor.model_config import load_model_config
from pagedserve.services.executor.tensor_parallel import ShardPlan, valid_tensor_parallel_sizes
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits
from tests.engine.conftest import RANDOM_LLAMA_PROMPTS
from tests.engine.hf_reference import NUM_NEW_TOKENS

Outputs = dict[tuple[int, int], list[int]]  # (prompt index, sample index) -> tokens


def mixed_batch(prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """The greedy prompts, then a prompt sharing the longest one's first 64 tokens, then
    n = 3 seeded samples and a beam search of the first two prompts."""
    longest = max(prompts, key=len)
    shared_prefix = longest[:64] + [(7 * j) % 5000 + 300 for j in range(20)]
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    batch = [*prompts, shared_prefix, prompts[0], prompts[1]]
    params = [greedy] * (len(prompts) + 1) + [
        SamplingParams(max_tokens=12, temperature=0.9, top_k=40, seed=11, n=3),
        SamplingParams(max_tokens=10, beam_width=3, n=2),
    ]
    return batch, params


def run(engine: LLMEngine, batch: list[list[int]], params: list[SamplingParams]) -> tuple[Outputs, dict[int, int]]:
    outputs: Outputs = {}
    cached: dict[int, int] = {}
    for index, delta in engine.stream(batch, params):
        outputs.setdefault((index, delta.sample_index), []).extend(delta.new_token_ids)
        cached[index] = max(cached.get(index, 0), delta.num_cached_tokens)
    pool = engine.scheduler.block_pool
    assert pool.num_free_blocks == pool.num_blocks, "a block leaked"
    return outputs, cached


def check_tensor_parallel(
    model: str | None, size: int, prompts: list[list[int]], reference: list[list[int]], max_tokens: int
) -> None:
    """T ranks == HF for the greedy prompts, T ranks == one rank for everything else
    (run apart from the greedy prompts there: in float64 the batch does not matter)."""
    batch, params = mixed_batch(prompts, max_tokens)
    config = dict(model=model, dtype="float64", limits=SchedulingLimits(max_num_batched_tokens=64))
    with LLMEngine(EngineConfig(**config, tensor_parallel_size=size)) as engine:
        assert engine.runner.model_config.num_heads * size == load_model_config(engine.model_source).num_heads
        parallel, cached = run(engine, batch, params)
        assert engine.runner.group.num_all_reduces > 0
    for index, ref in enumerate(reference):
        assert parallel[(index, 0)] == ref[:max_tokens], f"prompt {index} ({len(prompts[index])} tokens) diverged from HF"
    assert cached[len(prompts)] >= 48, "the prompt sharing a prefix was served from the prefix cache"
    assert len({tuple(parallel[(len(prompts) + 1, i)]) for i in range(3)}) > 1, "three different samples"
    extras = len(prompts) + 1  # the samples and the beam search
    with LLMEngine(EngineConfig(**config)) as engine:
        single, _ = run(engine, batch[extras:], params[extras:])
    assert {key: tokens for key, tokens in parallel.items() if key[0] >= extras} == {
        (index + extras, sample): tokens for (index, sample), tokens in single.items()
    }


def test_shard_plan_refuses_heads_that_do_not_split(random_llama_dir: Path) -> None:
    from pagedserve.shared.model_source import resolve_model_source

    random_llama = load_model_config(resolve_model_source(str(random_llama_dir)))  # 8 heads, 2 KV heads
    smollm2 = dataclasses.replace(random_llama, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536)
    assert valid_tensor_parallel_sizes(9, 3, 1536) == [1, 3]
    with pytest.raises(ValueError, match=r"9 attention heads, 3 KV heads.*tensor_parallel_size 1 or 3 would work"):
        ShardPlan.for_model(smollm2, 0, 2)
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 does not split.*8 attention heads.*1, 2, 4 or 8 would work"):
        LLMEngine(EngineConfig(model=str(random_llama_dir), tensor_parallel_size=3))  # before any process starts
    # T = 3 on SmolLM2: three query heads and one KV head a rank (head r // 1 = r).
    plan = ShardPlan.for_model(smollm2, 2, 3)
    assert (plan.num_heads_per_rank, plan.num_kv_heads_per_rank, plan.first_kv_head) == (3, 1, 2)
    assert plan.slice_of("model.layers.0.self_attn.q_proj.weight") == (0, 384, 192)
    assert plan.slice_of("model.layers.0.self_attn.o_proj.weight") == (1, 384, 192)
    assert plan.slice_of("model.layers.0.mlp.down_proj.weight") == (1, 1024, 512)
    assert plan.slice_of("model.embed_tokens.weight") is None
    # More ranks than KV heads: each KV head replicated on the ranks whose queries use it.
    gqa = dataclasses.replace(smollm2, num_heads=8, num_kv_heads=2)
    plans = [ShardPlan.for_model(gqa, rank, 4) for rank in range(4)]
    assert [(p.num_heads_per_rank, p.num_kv_heads_per_rank, p.first_kv_head) for p in plans] == [
        (2, 1, 0), (2, 1, 0), (2, 1, 1), (2, 1, 1)
    ]
    assert plans[3].slice_of("model.layers.1.self_attn.v_proj.weight") == (0, 64, 64)

@pytest.mark.slow
def test_two_ranks_random_gqa_llama_folder(random_llama_dir: Path, random_llama_reference: list[list[int]]) -> None:
    reference = [continuation[:32] for continuation in random_llama_reference]
    check_tensor_parallel(str(random_llama_dir), 2, RANDOM_LLAMA_PROMPTS, reference, 32)


@pytest.mark.slow
def test_three_ranks_smollm2(smollm2_prompts: list[list[int]], smollm2_reference: list[list[int]]) -> None:
    check_tensor_parallel(None, 3, smollm2_prompts, smollm2_reference, NUM_NEW_TOKENS // 2)
