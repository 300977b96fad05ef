"""Every supported family (llama with Llama 3 RoPE scaling, mistral, qwen2, qwen3, gemma2,
gemma3_text, phi3 with LongRoPE) against HF transformers, token for token, in float64, on a
tiny random model transformers builds itself (`family_models.py`).

One engine per family runs one mixed batch that exercises the whole serving path: greedy
prompts that hit the prefix cache (a warm-up request cached their shared prefix), prompts
longer than the sliding window, chunked prefill (a 32-token budget), a KV pool small
enough to preempt, n = 3 seeded samples (equal to the same seeds sent as separate
requests) and a beam search (equal to HF's). Then the GGUF path: the model written as
GGUF with `gguf`'s writer loads to the folder's weights and generates what HF
transformers generates from the same GGUF.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.services.executor.model_config import load_model_config
from pagedserve.services.executor.weight_loader import iter_weights
from pagedserve.shared.model_source import resolve_model_source
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits
from pagedserve.shared.tokenizer import load_tokenizer
from tests.engine.family_models import (
    FAMILY_CONFIGS, GGUF_ARCH, WINDOW, build_hf_folder, hf_beam_search, hf_greedy, hf_model, write_gguf,
)

pytestmark = pytest.mark.slow

MAX_TOKENS = 16
CHUNK_BUDGET = 32


def _ids(seed: int, length: int) -> list[int]:
    return [(seed * 37 + j * 11) % 300 + 3 for j in range(length)]


SHARED_PREFIX = [1] + _ids(1, 35)  # two full blocks and more, longer than the window
WARM_UP = SHARED_PREFIX + _ids(2, 4)
GREEDY_PROMPTS = [SHARED_PREFIX + _ids(3, 12), [1] + _ids(4, 2), [1] + _ids(5, 69), SHARED_PREFIX + _ids(6, 30)]
SAMPLED_PROMPT = [1] + _ids(7, 24)
BEAM_PROMPT = [1] + _ids(8, 8)
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
SAMPLED = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9, seed=7, n=3, ignore_eos=True)
BEAM = SamplingParams(max_tokens=10, beam_width=3, n=2, length_penalty=1.0, early_stopping=False)


@dataclass
class Family:
    model_type: str
    folder: Path
    greedy_reference: list[list[int]]  # WARM_UP, then GREEDY_PROMPTS
    beam_reference: list[list[int]]


@pytest.fixture(scope="module", params=list(FAMILY_CONFIGS))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    model_type = request.param
    folder = build_hf_folder(model_type, tmp_path_factory.mktemp(model_type))
    model = hf_model(folder)
    greedy = hf_greedy(model, [WARM_UP, *GREEDY_PROMPTS], MAX_TOKENS)
    beams = hf_beam_search(model, BEAM_PROMPT, BEAM, model.config.eos_token_id)
    return Family(model_type, folder, greedy, beams)


def test_prompts_reach_past_the_window() -> None:
    assert max(len(p) for p in GREEDY_PROMPTS) > 3 * WINDOW and len(SHARED_PREFIX) > WINDOW
    assert max(len(p) for p in GREEDY_PROMPTS) > 2 * CHUNK_BUDGET


def test_family_matches_hf_over_a_mixed_batch(family: Family) -> None:
    engine = LLMEngine(
        EngineConfig(
            model=str(family.folder), dtype="float64", num_kv_blocks=14,
            limits=SchedulingLimits(max_num_batched_tokens=CHUNK_BUDGET),
        )
    )
    assert engine.generate([WARM_UP], GREEDY)[0].token_ids == family.greedy_reference[0]
    stats = engine.scheduler.prefix_cache_stats
    hits_before = stats.num_hit_tokens
    prompts = [*GREEDY_PROMPTS, SAMPLED_PROMPT, BEAM_PROMPT]
    completions = engine.generate(prompts, [GREEDY] * len(GREEDY_PROMPTS) + [SAMPLED, BEAM])
    pool = engine.scheduler.block_pool
    assert pool.num_used_blocks == 0
    for prompt, completion, reference in zip(GREEDY_PROMPTS, completions, family.greedy_reference[1:]):
        assert completion.token_ids == reference, f"{family.model_type}: prompt of {len(prompt)} tokens diverged"
    assert [output.token_ids for output in completions[-1].outputs] == family.beam_reference
    assert stats.num_hit_tokens - hits_before >= 2 * pool.block_size  # the shared prefix's full blocks
    assert engine.scheduler.num_preemptions_total > 0
    forked = [output.token_ids for output in completions[-2].outputs]
    separate = engine.generate([SAMPLED_PROMPT] * 3, [SAMPLED.for_sample(i) for i in range(3)])
    assert forked == [completion.token_ids for completion in separate]
    assert len({tuple(tokens) for tokens in forked}) > 1  # the seeds differ


def test_gguf_loads_the_same_weights_and_matches_hf_on_it(family: Family, tmp_path: Path) -> None:
    if family.model_type not in GGUF_ARCH:
        # llama.cpp writes Mistral as a "llama" GGUF: the llama family's case covers it.
        assert family.model_type == "mistral"
        return
    gguf_path = write_gguf(family.folder, tmp_path / f"{family.model_type}.gguf")
    gguf_source, folder_source = resolve_model_source(str(gguf_path)), resolve_model_source(str(family.folder))
    gguf_config, folder_config = load_model_config(gguf_source), load_model_config(folder_source)
    assert gguf_config.model_type == family.model_type
    assert gguf_config.sliding_window == folder_config.sliding_window
    from_gguf = dict(iter_weights(gguf_source, gguf_config))
    from_folder = {name: tensor.to(torch.float32) for name, tensor in iter_weights(folder_source, folder_config)}
    assert sorted(from_gguf) == sorted(from_folder) or (
        folder_config.tie_word_embeddings and sorted(from_gguf) == sorted(set(from_folder) - {"lm_head.weight"})
    )
    for name, tensor in from_gguf.items():
        torch.testing.assert_close(tensor, from_folder[name], rtol=0, atol=1e-6, msg=name)
    tokenizer = load_tokenizer(gguf_source)
    assert tokenizer.chat_template  # taken from the GGUF's tokenizer.chat_template
    prompts = [GREEDY_PROMPTS[1], GREEDY_PROMPTS[2]]
    reference = hf_greedy(hf_model(gguf_path.parent, gguf_path.name), prompts, MAX_TOKENS)
    engine = LLMEngine(EngineConfig(model=str(gguf_path), dtype="float64", limits=SchedulingLimits(max_num_batched_tokens=CHUNK_BUDGET)))
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == reference


@pytest.mark.parametrize(
    "model_type, off_because",
    [("llama", None), ("mistral", None), ("gemma3_text", "it implements plain Llama layers, not gemma3_text's")],
)
def test_fused_decode_step_only_for_plain_llama_layers(
    model_type: str, off_because: str | None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """4-bit GGUF weights stay packed; the fused C decode step takes Llama layers (with one
    window for all, Mistral's) and gives the torch layers' greedy tokens, past the window
    too; it is off, with the reason logged, for layers it does not implement. (Mistral's
    GGUF is written as its own architecture so that its window survives; llama.cpp would
    write a llama.)"""
    folder = build_hf_folder(model_type, tmp_path / "folder")
    gguf_path = write_gguf(folder, tmp_path / "gguf" / "model.gguf", quantize=True)
    with caplog.at_level(logging.INFO, logger="pagedserve.services.executor.decoder"):
        engine = LLMEngine(
            EngineConfig(model=str(gguf_path), dtype="float32", weight_format="quantized", limits=SchedulingLimits(enable_prefix_caching=False))
        )
    model = engine.runner.model
    assert model.int4_max_rows > 0  # the weights are packed: only the layers decide
    prompts = [GREEDY_PROMPTS[1], GREEDY_PROMPTS[2]]  # 3 tokens, and 70: 3.5 windows
    if off_because is not None:
        assert model.fused_decoder is None
        assert f"the fused C step is off ({off_because})" in caplog.text
        assert all(len(c.token_ids) >= 1 for c in engine.generate(prompts, GREEDY))
        return
    assert "plain Llama layers" not in caplog.text and "windows" not in caplog.text
    if model.fused_decoder is None:  # off for a reason of this machine's (no C compiler, ...), logged
        assert "the fused C step is off" in caplog.text
        return
    fused = [c.token_ids for c in engine.generate(prompts, GREEDY)]
    model.fused_decoder = None  # the same packed weights through the torch layers
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == fused


def test_family_splits_over_two_tensor_parallel_ranks(family: Family) -> None:
    """T = 2 ranks as real processes (gloo): each holds half the heads (Qwen3's one KV head
    replicated), its q/k norms whole, Phi-3's fused checkpoints split before slicing, and
    the greedy outputs still equal HF's."""
    engine = LLMEngine(
        EngineConfig(
            model=str(family.folder), dtype="float64", tensor_parallel_size=2,
            limits=SchedulingLimits(max_num_batched_tokens=CHUNK_BUDGET),
        )
    )
    with engine:
        completions = engine.generate(GREEDY_PROMPTS, GREEDY)
    assert [c.token_ids for c in completions] == family.greedy_reference[1:]
