"""Prompt logprobs on the whole engine equal HF transformers' log-softmax of the prompt
(float64 on both sides), through chunked prefill (a 32-token budget cuts the long prompt
into chunks), and for a prompt the prefix cache already holds: such a request is computed
whole rather than from the cache hits, as vLLM does, and reports every position.
"""

from __future__ import annotations

import pytest
import torch

from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits
from tests.engine.conftest import CHAT_PROMPTS
from pagedserve.shared.tokenizer import encode_chat

pytestmark = pytest.mark.slow

NUM_TOP = 3


def test_prompt_logprobs_equal_hf_log_softmax_even_for_cached_prompts(hf_model_float64) -> None:  # type: ignore[no-untyped-def]
    engine = LLMEngine(EngineConfig(dtype="float64", limits=SchedulingLimits(max_num_batched_tokens=32, enable_prefix_caching=True)))
    prompt = encode_chat(engine.tokenizer, [{"role": "user", "content": CHAT_PROMPTS[1]}])
    assert len(prompt) > 2 * 32
    with torch.no_grad():
        reference = hf_model_float64(torch.tensor([prompt])).logits[0].log_softmax(dim=-1)
    # Position p predicts token p + 1.
    expected = reference[:-1].gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    expected_top = reference[:-1].topk(NUM_TOP, dim=-1)
    # HF's greedy continuation, two tokens: what every request here must generate.
    greedy = [int(reference[-1].argmax())]
    with torch.no_grad():
        greedy.append(int(hf_model_float64(torch.tensor([prompt + greedy])).logits[0, -1].argmax()))

    # First without prompt logprobs: its blocks fill the prefix cache.
    [warm] = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
    assert warm.prompt_logprobs is None and warm.token_ids == greedy[:1]
    asking = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=NUM_TOP)
    plain = SamplingParams(max_tokens=2, temperature=0.0)
    # Twice in one batch beside a request that does use the cache.
    first, second, cached = engine.generate([prompt, prompt, prompt], [asking, asking, plain])
    assert cached.prompt_logprobs is None and cached.token_ids == greedy
    for completion in (first, second):
        entries = completion.prompt_logprobs
        assert entries is not None and len(entries) == len(prompt) - 1
        ours = torch.tensor([entry.logprob for entry in entries], dtype=torch.float64)
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
        assert [entry.top_token_ids for entry in entries] == expected_top.indices.tolist()
        ranks = [entry.rank for entry in entries]
        assert ranks == ((reference[:-1] > expected.unsqueeze(1)).sum(dim=1) + 1).tolist()
        assert completion.token_ids == greedy
    assert engine.scheduler.block_pool.num_used_blocks == 0
