"""`logit_bias` and `min_tokens` on the whole engine equal HF transformers' own logits
processors (SequenceBiasLogitsProcessor, MinNewTokensLengthLogitsProcessor) in greedy
float64 generation, token for token, in one mixed batch beside a plain greedy request
(which must come out as if alone: rows without them pay nothing and change nothing).
"""

from __future__ import annotations

import pytest
import torch

from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits
from pagedserve.shared.tokenizer import encode_chat, encode_prompt

pytestmark = pytest.mark.slow


def hf_generate(hf_model, prompt: list[int], max_new_tokens: int, stop_ids: list[int], processors: list) -> list[int]:  # type: ignore[no-untyped-def]
    from transformers import LogitsProcessorList

    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=stop_ids[0],
            logits_processor=LogitsProcessorList(processors),
        )
    row = out[0, len(prompt) :].tolist()
    for i, token in enumerate(row):
        if token in stop_ids:
            return row[: i + 1]
    return row


def test_logit_bias_and_min_tokens_equal_hf_processors(hf_model_float64) -> None:  # type: ignore[no-untyped-def]
    from transformers import MinNewTokensLengthLogitsProcessor, SequenceBiasLogitsProcessor

    engine = LLMEngine(EngineConfig(dtype="float64", limits=SchedulingLimits(max_num_batched_tokens=64)))
    eos = engine.eos_token_id
    assert eos is not None
    tokenizer = engine.tokenizer
    capital = encode_prompt(tokenizer, "The capital of France is")
    chat = encode_chat(tokenizer, [{"role": "user", "content": "List three prime numbers."}])
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    plain = engine.generate([capital, chat], [greedy, SamplingParams(max_tokens=40, temperature=0.0)])
    [plain_capital, plain_chat] = [c.token_ids for c in plain]
    assert plain_chat[-1] == eos and len(plain_chat) < 40, plain_chat  # it stops by itself

    # Ban the first two tokens greedy picks, push another one up.
    bias = {plain_capital[0]: -100.0, plain_capital[1]: -100.0, tokenizer.encode(" Lyon")[0]: 7.5}
    biased = SamplingParams(max_tokens=12, temperature=0.0, logit_bias=bias)
    # Hold back EOS (and a stop id) for longer than the model would talk.
    stop_id = tokenizer.encode(".")[0]
    min_tokens = len(plain_chat) + 4
    held = SamplingParams(max_tokens=min_tokens + 3, temperature=0.0, min_tokens=min_tokens, stop_token_ids=[stop_id])
    outputs = engine.generate([capital, chat, capital], [biased, held, greedy])
    ours_biased, ours_held, ours_plain = [c.token_ids for c in outputs]

    hf_biased = hf_generate(
        hf_model_float64, capital, 12, [eos], [SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()})]
    )
    hf_held = hf_generate(
        hf_model_float64, chat, min_tokens + 3, [eos, stop_id],
        [MinNewTokensLengthLogitsProcessor(len(chat), min_tokens, [eos, stop_id])],
    )
    assert ours_biased == hf_biased
    assert ours_biased[0] not in (plain_capital[0], plain_capital[1]) and ours_biased != plain_capital[:12]
    assert ours_held == hf_held
    assert len(ours_held) >= min_tokens and eos not in ours_held[: min_tokens] and stop_id not in ours_held[:min_tokens]
    assert ours_plain == plain_capital  # the untouched row
    assert engine.scheduler.block_pool.num_used_blocks == 0
