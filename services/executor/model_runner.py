"""Runs scheduler steps on the model: mirrors each request's tokens and block table (the
latter as a row of the persistent batch, `input_batch.py`), computes the step's flattened
varlen inputs in place, runs the forward, samples.

It makes no scheduling decision: which requests, how many tokens, which blocks all come
in the `ExecuteStep`. It samples exactly for the requests whose scheduled tokens reach the
end of their known tokens, by the rule the scheduler applies too (`shared/step_rules.py`).
"""

from __future__ import annotations

import logging

import torch

from pagedserve.kernels.dispatch import kernel_module
from pagedserve.services.engine.config import EngineConfig
from pagedserve.services.executor.distributed import TensorParallelGroup
from pagedserve.services.executor.input_batch import InputBatch
from pagedserve.services.executor.kv_cache import (
    allocate_kv_cache,
    copy_blocks,
    kv_layout,
    num_blocks_for_budget,
    num_swap_blocks_for_budget,
    one_group,
)
from pagedserve.services.executor.decoder import DecoderForCausalLM
from pagedserve.services.executor.model_config import ModelConfig, load_model_config
from pagedserve.services.executor.prompt_logprobs import collect_prompt_logprobs, wants_prompt_logprobs
from pagedserve.services.executor.quantized_linear import int4_max_rows
from pagedserve.services.executor.request_state import RequestState, ScheduledRequest
from pagedserve.services.executor.sampler import Sampler, beam_candidates
from pagedserve.services.executor.step_paths import StepPaths
from pagedserve.services.executor.structured_output import StructuredOutput
from pagedserve.services.executor.tensor_parallel import ShardPlan
from pagedserve.services.executor.weight_loader import iter_weights
from pagedserve.shared.messages import CachedRequestData, ExecuteStep, SampledToken, StepResult
from pagedserve.shared.model_source import ModelSource

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, source: ModelSource, group: TensorParallelGroup | None = None) -> None:
        self.device = config.torch_device()
        self.dtype, dtype_reason = config.dtype_choice()
        # Which path a step of N rows takes (fused C step, int4, int8 LM head): `step_paths.py`.
        self.step_paths = StepPaths.from_env()
        # 4-bit GGUF weights: packed for steps of up to this many rows (0: none packed).
        self.int4_max_rows, weights_reason = int4_max_rows(
            config.weight_format, self.dtype, self.device, source.gguf_file is not None, self.step_paths
        )
        logger.info("serving in %s (%s); %s", str(self.dtype).removeprefix("torch."), dtype_reason, weights_reason)
        logger.info("step paths: %s", self.step_paths.describe())
        self.block_size = config.block_size
        # Tensor parallel (`tensor_parallel.py`): this rank's shard of the model and of the
        # KV cache; rank 0 alone samples and broadcasts the tokens (`distributed.py`).
        self.group = group or TensorParallelGroup(device=self.device)
        whole_model = load_model_config(source)
        self.shard_plan = ShardPlan.for_model(whole_model, self.group.rank, self.group.world_size)
        self.model_config: ModelConfig = self.shard_plan.local_config(whole_model)
        self.model = DecoderForCausalLM.build(
            self.model_config, iter_weights(source, whole_model, self.shard_plan, self.int4_max_rows > 0),
            self.dtype, self.device, self.group, self.int4_max_rows, self.step_paths,
        )
        mc = self.model_config
        limits = config.limits.resolved(mc.max_position_embeddings)
        assert limits.max_model_len is not None  # resolved
        self.max_model_len = limits.max_model_len
        self.eos_token_id: int | None = mc.eos_token_ids[0] if mc.eos_token_ids else None
        self.kernels = kernel_module(self.device, config.use_triton)
        # KV groups (`shared/kv_group_layout.py`): a sliding-window group gives its blocks back
        # as the window moves. Several groups need a model that gives each layer its group's
        # metadata (`AttentionMetadata.for_layer`, `reads_kv_groups`); otherwise one group,
        # whose windows, if any, only mask.
        self.kv_layout = kv_layout(mc)
        if self.kv_layout.num_groups > 1 and not getattr(self.model, "reads_kv_groups", False):
            self.kv_layout = one_group(mc)
        # A block id must exist on every rank: the group agrees on the smallest capacity.
        self.num_blocks = self.group.min_over_ranks(config.num_kv_blocks or self._num_blocks_from_memory(config))
        self.kv_caches = allocate_kv_cache(
            self.model_config, self.num_blocks, self.block_size, self.dtype, self.device, self.kv_layout
        )
        # Preemption by swap: a pool of the same blocks in CPU memory (on a CPU device this
        # is CPU memory too; the mechanism stays the same). The scheduler picks its ids.
        self.num_swap_blocks = self.group.min_over_ranks(
            num_swap_blocks_for_budget(
                self.model_config, self.block_size, self.dtype, config.swap_space_bytes, self.kv_layout
            )
        )
        self.swap_caches = allocate_kv_cache(
            self.model_config, self.num_swap_blocks, self.block_size, self.dtype, torch.device("cpu"), self.kv_layout
        )
        self.sampler = Sampler(self.model_config.vocab_size, self.eos_token_id)
        self.structured_output = StructuredOutput(source, self.model_config.vocab_size)
        self.requests: dict[str, RequestState] = {}
        # Sized for the scheduler's limits; it grows if a step brings more.
        self.input_batch = InputBatch(
            num_rows=limits.max_num_seqs,
            max_blocks_per_row=-(-self.max_model_len // self.block_size),
            max_num_tokens=limits.max_num_batched_tokens,
            block_size=self.block_size,
            device=self.device,
            group_of_layer=self.kv_layout.group_of_layer if self.kv_layout.num_groups > 1 else (),
        )

    def _num_blocks_from_memory(self, config: EngineConfig) -> int:
        if self.device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free_bytes * config.gpu_memory_utilization)
        else:
            budget = config.kv_cache_memory_bytes
        return num_blocks_for_budget(self.model_config, self.block_size, self.dtype, budget, self.kv_layout)

    def reset(self) -> None:
        """Forget every mirrored request (a new scheduler session: that scheduler sends
        each request afresh, as a NewRequestData). The caches keep their contents: a
        block is only read once a new table points at it again."""
        self.requests.clear()
        self.input_batch.clear()

    def execute(self, step: ExecuteStep) -> StepResult:
        # Beam forks copy their parents as they stand, before anything else changes them.
        for fork in step.beam_forks:
            self._add(self.requests[fork.parent_request_id].fork(fork.request_id))
        for request_id in step.dropped_request_ids:
            if self.requests.pop(request_id, None) is not None:
                self.input_batch.remove_request(request_id)
        # Swap-outs first: their blocks may be reallocated and written in this very step.
        copy_blocks(self.kv_caches, self.swap_caches, step.swap_out)
        copy_blocks(self.swap_caches, self.kv_caches, step.swap_in)
        # Copy-on-write of blocks shared by forked samples, before anything writes them.
        copy_blocks(self.kv_caches, self.kv_caches, step.block_copies)
        scheduled = self._apply_deltas(step)
        if not scheduled:
            return StepResult(step_id=step.step_id, sampled=[])
        # Decodes first: the decode kernel serves them in one batched call.
        scheduled.sort(key=lambda item: item.num_new_tokens != 1)
        inputs = self.input_batch.prepare(scheduled)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn_metadata, self.kernels)
        if self.group.is_driver and any(wants_prompt_logprobs(item) for item in scheduled):
            collect_prompt_logprobs(scheduled, inputs.query_end_loc, hidden, self.model.compute_logits)
        sample_rows = [row for row, item in enumerate(scheduled) if item.samples]
        if not sample_rows:
            return StepResult(step_id=step.step_id, sampled=[])
        if not self.group.is_driver:  # tensor parallel: rank 0 samples, this rank follows
            return self._follow_driver(step, [scheduled[row].state for row in sample_rows])
        last_token_index = torch.from_numpy(inputs.query_end_loc[sample_rows] - 1).to(self.device)
        logits = self.model.compute_logits(hidden[last_token_index])
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        states = [scheduled[row].state for row in sample_rows]
        if step.forked_requests:
            logits, states = self._fork(step, logits, states)
        sampled = self._sample(logits, states)
        if self.group.world_size > 1:  # the other ranks append the same tokens to their mirrors
            self.group.broadcast_token_ids([token.token_id for token in sampled[: _num_sampling(states)]])
        return StepResult(step_id=step.step_id, sampled=sampled)

    def _follow_driver(self, step: ExecuteStep, states: list[RequestState]) -> StepResult:
        """A rank other than 0: mirror this step's forks and append the tokens rank 0
        sampled (beams get theirs from the scheduler). Its result is empty: only rank 0's
        is read."""
        if step.forked_requests:
            states = self._mirror_forks(step, states)[1]
        sampling = [state for state in states if not state.is_beam]
        for state, token_id in zip(sampling, self.group.broadcast_token_ids([0] * len(sampling))):
            state.token_ids.append(token_id)
        return StepResult(step_id=step.step_id, sampled=[])

    def _add(self, state: RequestState) -> None:
        self.requests[state.request_id] = state
        self.input_batch.add_request(state.request_id, state.block_ids, state.group_block_ids)

    def _sample(self, logits: torch.Tensor, states: list[RequestState]) -> list[SampledToken]:
        """Sample a token for each request (appended to its mirror), or, for a beam,
        report its candidates (the scheduler appends the one it picks)."""
        beam_rows = [row for row, state in enumerate(states) if state.is_beam]
        if not beam_rows:
            sample_rows, beam_tokens = list(range(len(states))), []
        else:
            sample_rows = [row for row, state in enumerate(states) if not state.is_beam]
            beams = [states[row] for row in beam_rows]
            beam_tokens = beam_candidates(logits[torch.tensor(beam_rows, device=logits.device)], beams, self.eos_token_id)
            if sample_rows:
                logits = logits[torch.tensor(sample_rows, device=logits.device)]
        sample_states = [states[row] for row in sample_rows]
        constrained = any(state.grammar is not None for state in sample_states)
        token_mask = self.structured_output.bitmask_for(sample_states) if constrained else None
        sampled = self.sampler(logits, sample_states, token_mask) if sample_rows else []
        if constrained:
            self.structured_output.advance(sample_states, sampled, self.eos_token_id)
        for row, token in zip(sample_rows, sampled):
            state = states[row]
            if state.sampling_params.prompt_logprobs is not None and len(state.token_ids) == state.num_prompt_tokens:
                token.prompt_logprobs, state.prompt_logprobs = state.prompt_logprobs, []
            state.token_ids.append(token.token_id)
        return sampled + beam_tokens

    def _fork(
        self, step: ExecuteStep, logits: torch.Tensor, states: list[RequestState]
    ) -> tuple[torch.Tensor, list[RequestState]]:
        """Mirror the samples forked in this step (copies of their parents before this
        step's token) and give each its parent's logits row: [rows + forks, vocab]."""
        rows, states = self._mirror_forks(step, states)
        return logits[torch.tensor(rows, device=logits.device)], states

    def _mirror_forks(self, step: ExecuteStep, states: list[RequestState]) -> tuple[list[int], list[RequestState]]:
        """The forks of this step appended to `states`, and for each row its parent's row."""
        row_of = {state.request_id: row for row, state in enumerate(states)}
        rows = list(range(len(states)))
        states = list(states)
        for fork in step.forked_requests:
            parent = self.requests[fork.parent_request_id]
            child = parent.fork(fork.request_id, parent.sampling_params.for_sample(fork.sample_index))
            self._add(child)
            states.append(child)
            rows.append(row_of[parent.request_id])
        return rows, states

    def _apply_deltas(self, step: ExecuteStep) -> list[ScheduledRequest]:
        """Mirror the step's new requests and apply its deltas to the cached ones: the
        requests it runs, each with its tokens to compute (those with none left out)."""
        scheduled: list[ScheduledRequest] = []
        counts = iter(step.num_scheduled_tokens)
        for new in step.new_requests:
            state = RequestState.from_new_request(new)
            if new.sampling_params.structured_output is not None:
                # Compiles (once per grammar) while this step's forward runs.
                state.grammar = self.structured_output.new_state(new.sampling_params.structured_output)
            self._add(state)
            scheduled.append(ScheduledRequest(state, new.num_computed_tokens, next(counts)))
        for cached in step.cached_requests:
            state = self.requests[cached.request_id]
            if cached.num_replaced_blocks:  # copy-on-write: the copy replaces the shared block
                del state.block_ids[-cached.num_replaced_blocks :]
            state.block_ids.extend(cached.new_block_ids)
            self.input_batch.append_block_ids(cached.request_id, cached.new_block_ids, cached.num_replaced_blocks)
            if state.group_block_ids:  # KV groups 1.. (sliding-window models) get their deltas too
                self._apply_group_deltas(state, cached)
            state.token_ids.extend(cached.new_token_ids)
            scheduled.append(ScheduledRequest(state, cached.num_computed_tokens, next(counts)))
        return [item for item in scheduled if item.num_new_tokens > 0]

    def _apply_group_deltas(self, state: RequestState, cached: CachedRequestData) -> None:
        deltas = zip(state.group_block_ids, cached.group_new_block_ids, cached.group_num_replaced_blocks, strict=True)
        for group, (table, new_ids, num_replaced) in enumerate(deltas, start=1):
            del table[len(table) - num_replaced :]
            table.extend(new_ids)
            self.input_batch.append_block_ids(cached.request_id, new_ids, num_replaced, group)


def _num_sampling(states: list[RequestState]) -> int:
    """How many of a step's sampling rows draw a token (the rest are beams): `_sample`
    returns their tokens first."""
    return sum(not state.is_beam for state in states)
