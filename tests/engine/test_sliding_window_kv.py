"""Sliding-window KV blocks freed, end to end: a tiny random Mistral (every layer a 7-token
window, one sliding KV group) on the in-process engine, whose scheduler gives back the
blocks each sequence's window has left while they decode, so six sequences of up to 65
tokens run at once in 24 blocks of 4 tokens (kept whole, they would need 68). Greedy output
equals HF transformers' in float64 token for token, with chunked prefill and prefix hits
(a hit needs the window of the first token it leaves to compute, `kv_groups.py`).

Models that mix windowed and global layers (Gemma 2/3) need the decoder to give each layer
its group's metadata before their groups split (`ModelRunner.kv_layout`); this test holds
the one-group case, which needs nothing of the decoder beyond the window keyword.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.shared.model_source import default_model_source
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits
from pagedserve.shared.tokenizer import load_tokenizer
from tests.engine.hf_reference import hf_float64, hf_greedy_ignoring_eos

pytestmark = pytest.mark.slow

WINDOW = 7  # not a multiple of the block size: windows start mid-block
BLOCK_SIZE = 4
NUM_NEW_TOKENS = 24
_BASE = [(j * 53 + 7) % 30000 + 100 for j in range(41)]
PROMPTS = [
    _BASE[:5],
    _BASE[3:16],
    _BASE[:30],
    _BASE[:28] + [777, 778, 779],  # shares 7 full blocks with the one before: a prefix hit
    _BASE,
    _BASE[10:19],
]


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    directory = tmp_path_factory.mktemp("windowed-mistral")
    tokenizer = load_tokenizer(default_model_source())
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=WINDOW,
        initializer_range=0.15, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(25)
    MistralForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def test_window_blocks_are_freed_and_greedy_output_equals_hf(mistral_dir: Path) -> None:
    expected = hf_greedy_ignoring_eos(hf_float64(str(mistral_dir)), PROMPTS, NUM_NEW_TOKENS)
    engine = LLMEngine(
        EngineConfig(
            model=str(mistral_dir), dtype="float64", block_size=BLOCK_SIZE, num_kv_blocks=24,
            limits=SchedulingLimits(
                max_model_len=128, max_num_seqs=6, max_num_batched_tokens=16, enable_prefix_caching=True
            ),
        )
    )
    assert engine.runner.kv_layout.windows == (WINDOW,)
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(prompt, params) for prompt in PROMPTS]
    outputs: dict[str, list[int]] = {request_id: [] for request_id in ids}
    most_running = peak_used = 0
    while engine.has_unfinished_requests():
        for delta in engine.step():
            outputs[delta.request_id] += delta.new_token_ids
        most_running = max(most_running, engine.scheduler.num_running)
        peak_used = max(peak_used, engine.scheduler.block_pool.num_used_blocks)
    assert [outputs[i] for i in ids] == expected
    kept_whole = sum(-(-(len(p) + NUM_NEW_TOKENS - 1) // BLOCK_SIZE) for p in PROMPTS)
    assert kept_whole == 68 and peak_used <= 24 and most_running == 6
    assert engine.scheduler.prefix_cache_stats.num_hit_tokens > 0
    assert engine.scheduler.block_pool.num_used_blocks == 0
