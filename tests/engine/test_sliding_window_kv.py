"""Sliding-window KV blocks freed, end to end on the in-process engine, greedy output equal
to HF transformers' in float64 token for token, with chunked prefill and a prefix hit (a hit
needs the window of the first token it leaves to compute, `kv_groups.py`):
- a tiny random Mistral (every layer a 7-token window: one sliding KV group), whose
  scheduler gives back the blocks each sequence's window has left while they decode, so six
  sequences of up to 65 tokens run at once in 24 blocks of 4 tokens (kept whole: 68);
- a tiny random Gemma 3 (a sliding and a global layer: two KV groups sharing one cache
  tensor), whose global group keeps every block while the sliding one keeps its window's.
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


def _engine(folder: Path, num_kv_blocks: int) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=str(folder), dtype="float64", block_size=BLOCK_SIZE, num_kv_blocks=num_kv_blocks,
            limits=SchedulingLimits(
                max_model_len=128, max_num_seqs=6, max_num_batched_tokens=16, enable_prefix_caching=True
            ),
        )
    )


def _run(engine: LLMEngine) -> tuple[list[list[int]], int, int, int]:
    """Greedy outputs of PROMPTS, the most sequences running at once, the most blocks in
    use, and the most blocks the first group's tables held at once."""
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(prompt, params) for prompt in PROMPTS]
    outputs: dict[str, list[int]] = {request_id: [] for request_id in ids}
    most_running = peak_used = peak_first_group = 0
    while engine.has_unfinished_requests():
        for delta in engine.step():
            outputs[delta.request_id] += delta.new_token_ids
        most_running = max(most_running, engine.scheduler.num_running)
        peak_used = max(peak_used, engine.scheduler.block_pool.num_used_blocks)
        peak_first_group = max(peak_first_group, sum(len(r.block_ids) for r in engine.scheduler.running))
    assert engine.scheduler.prefix_cache_stats.num_hit_tokens > 0
    assert engine.scheduler.block_pool.num_used_blocks == 0
    return [outputs[i] for i in ids], most_running, peak_used, peak_first_group


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
    engine = _engine(mistral_dir, num_kv_blocks=24)
    assert engine.runner.kv_layout.windows == (WINDOW,)
    outputs, most_running, peak_used, _ = _run(engine)
    assert outputs == expected
    kept_whole = sum(-(-(len(p) + NUM_NEW_TOKENS - 1) // BLOCK_SIZE) for p in PROMPTS)
    assert kept_whole == 68 and peak_used <= 24 and most_running == 6


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("windowed-gemma3")
    tokenizer = load_tokenizer(default_model_source())
    config = AutoConfig.for_model(
        "gemma3_text", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.1 if ("norm" in name or param.dim() == 1) else 0.15)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def test_a_global_and_a_sliding_group_share_the_cache_and_match_hf(gemma3_dir: Path) -> None:
    expected = hf_greedy_ignoring_eos(hf_float64(str(gemma3_dir)), PROMPTS, NUM_NEW_TOKENS)
    engine = _engine(gemma3_dir, num_kv_blocks=100)
    layout = engine.runner.kv_layout
    assert layout.windows == (None, WINDOW) and layout.group_of_layer == (1, 0)
    assert engine.runner.kv_caches[0] is engine.runner.kv_caches[1]  # one tensor pair for both layers
    outputs, most_running, peak_used, peak_global = _run(engine)
    assert outputs == expected
    # The global group holds every block; the sliding one only its windows' (2-3 blocks a
    # sequence, more while a prefill chunk runs): far from the global group's count again.
    assert most_running == 6 and peak_global >= 40 and peak_used < peak_global + 6 * 6
