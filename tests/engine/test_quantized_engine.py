"""The engine with `--weight-format quantized` (every 4-bit GGUF linear through the int4
kernels: decode steps as the fused C step of `kernels/fused_decode.py`, float32 activations
rounded to bf16 at each matmul's input on CPUs with AVX512-BF16;
prefill through torch's int4 kernel, bf16 activations; the LM head through the int8 one for
small steps) in `--dtype auto` (bf16 on a CPU with AMX or AVX512-BF16)
against HF's float64 greedy output of the same GGUF (its 4-bit weights dequantized: the
weights the fp32 engine computes with, without fp32's own near-ties). bf16 legitimately
flips near-ties, after which two free-running greedy continuations part ways and compare
nothing more. So the engine is teacher-forced along the reference continuation: each
decode step gets HF's token whatever it sampled, and its logits at every position are
compared with HF's float64 logits there: top-1 agreement and KL divergence, with bounds
from the measured worst case."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.services.executor.quantized_linear import Int4Linear, Int8Linear
from pagedserve.services.executor.sampler import Sampler
from pagedserve.shared.sampling_params import SamplingParams
from tests.engine.hf_reference import NUM_NEW_TOKENS

pytestmark = pytest.mark.slow

# Teacher-forced along HF's float64 greedy continuations of the 8 prompts (393 positions),
# measured on an AMD EPYC Zen 4 with AVX512-BF16 (bf16 activations, int4 weights, fused C
# decode step): top-1 agreement 0.990 (4 positions differ, near-ties after bf16 rounding),
# KL(HF || ours) mean 0.00061 and max 0.0068 nats. The bounds leave room for other CPUs'
# rounding (float32 activations where there is no AVX512-BF16 err less) and little for a
# kernel that skews logits, which the free-running floor this test had before (half the
# tokens before the first divergence, each prompt's first one) could let pass.
TEACHER_FORCED_TOP1_FLOOR = 0.95
TEACHER_FORCED_MEAN_KL_CEILING = 0.005
TEACHER_FORCED_MAX_KL_CEILING = 0.05


def expected_auto_dtype() -> torch.dtype:
    """`--dtype auto` on this CPU, derived here rather than from the code under test: bf16
    where the CPU has native bf16 dot products (AMX or AVX512-BF16) and torch's oneDNN
    uses them, else float32."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    native = bool(flags & {"amx_bf16", "avx512_bf16"})
    return torch.bfloat16 if native and torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


class TeacherForcing:
    """Wraps the engine's real sampler: records each sequence's logits row, then replaces
    the token it sampled with the reference's next token, so every later step (the fused
    decode step included) runs on the reference continuation. Sequences are told apart
    by their prompt."""

    def __init__(self, sampler: Sampler, prompts: list[list[int]], continuations: list[list[int]]) -> None:
        self.sampler = sampler
        self.by_prompt = {tuple(p): i for i, p in enumerate(prompts)}
        self.continuations = continuations
        self.logits: list[list[torch.Tensor]] = [[] for _ in prompts]

    def __call__(self, logits, states, token_mask):  # type: ignore[no-untyped-def]
        sampled = self.sampler(logits, states, token_mask)
        for row, (state, token) in enumerate(zip(states, sampled)):
            index = self.by_prompt[tuple(state.token_ids[: state.num_prompt_tokens])]
            position = len(state.token_ids) - state.num_prompt_tokens
            self.logits[index].append(logits[row].detach().to(torch.float64).clone())
            token.token_id = self.continuations[index][position]
        return sampled


def test_quantized_engine_agrees_with_the_dequantized_reference(
    smollm2_prompts: list[list[int]], smollm2_reference: list[list[int]], hf_model_float64, caplog: pytest.LogCaptureFixture  # type: ignore[no-untyped-def]
) -> None:
    with caplog.at_level(logging.INFO):
        engine = LLMEngine(EngineConfig(weight_format="quantized", kv_cache_memory_bytes=64 << 20))
    expected_dtype = expected_auto_dtype()
    runner = engine.runner
    assert runner.dtype == expected_dtype
    int4 = [m for m in runner.model.modules() if isinstance(m, Int4Linear)]
    assert len(int4) == 4 * runner.model_config.num_layers and all(m.dense is None for m in int4)
    # The head, tied to the Q8_0 embedding, requantized to int8 for small steps; dense the same tensor.
    head = runner.model.lm_head
    assert isinstance(head, Int8Linear) and head.dense.data_ptr() == runner.model.embed_tokens.weight.data_ptr()
    logged = [r.getMessage() for r in caplog.records if "serving in" in r.getMessage()]
    assert len(logged) == 1 and str(expected_dtype).removeprefix("torch.") in logged[0] and "int4" in logged[0]
    # Decode steps of the 8 prompts (and fewer, as they finish) run as the fused C step.
    assert runner.model.fused_decoder is not None and runner.model.fused_max_rows >= len(smollm2_prompts)
    assert any("one fused C call" in r.getMessage() for r in caplog.records)

    # Teacher-forced along the reference: HF's float64 logits at every position it generated.
    forcing = TeacherForcing(runner.sampler, smollm2_prompts, smollm2_reference)
    runner.sampler = forcing
    forced = engine.generate(smollm2_prompts, SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0))
    assert [c.token_ids for c in forced] == smollm2_reference  # the forcing held
    num_agreeing, kls = 0, []
    with torch.no_grad():
        for prompt, continuation, ours in zip(smollm2_prompts, smollm2_reference, forcing.logits):
            reference = hf_model_float64(torch.tensor([prompt + continuation[:-1]])).logits[0, len(prompt) - 1 :]
            ours_t = torch.stack(ours)
            assert ours_t.shape == reference.shape
            num_agreeing += int((ours_t.argmax(-1) == reference.argmax(-1)).sum())
            p_log = reference.log_softmax(-1)
            kls.append((p_log.exp() * (p_log - ours_t.log_softmax(-1))).sum(-1))
    kl = torch.cat(kls)
    top1 = num_agreeing / kl.numel()
    print(f"teacher-forced over {kl.numel()} positions: top-1 agreement {top1:.4f}, "
          f"KL(HF || ours) mean {kl.mean():.5f} max {kl.max():.5f} (dtype {runner.dtype})")
    assert top1 >= TEACHER_FORCED_TOP1_FLOOR, top1
    assert kl.mean() <= TEACHER_FORCED_MEAN_KL_CEILING, float(kl.mean())
    assert kl.max() <= TEACHER_FORCED_MAX_KL_CEILING, float(kl.max())
