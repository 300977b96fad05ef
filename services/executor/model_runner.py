"""Runs scheduler steps on the model: mirrors each request's tokens and block table,
builds the flattened varlen batch, runs the forward, samples.

It makes no scheduling decision: which requests, how many tokens, which blocks all come
in the `ExecuteStep`. It samples exactly for the requests whose scheduled tokens reach the
end of their known tokens, the same rule the scheduler applies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from kernels import kernel_module
from services.executor.attention_metadata import AttentionMetadata
from services.executor.kv_cache import allocate_kv_cache, copy_blocks, num_blocks_for_budget, num_swap_blocks_for_budget
from services.executor.llama import LlamaForCausalLM
from services.executor.model_config import ModelConfig, load_model_config
from services.executor.sampler import Sampler, beam_candidates
from services.executor.weight_loader import iter_weights
from services.executor.config import EngineConfig
from shared.messages import ExecuteStep, SampledToken, StepResult
from shared.model_source import ModelSource
from shared.sampling_params import SamplingParams


@dataclass
class RequestState:
    """The executor's mirror of one request (satisfies the sampler's SamplingRequest)."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    sampling_params: SamplingParams

    @property
    def is_beam(self) -> bool:
        """A beam of a beam search: not sampled; it reports its best next tokens, and the
        scheduler sends back the one it picked in `CachedRequestData.new_token_ids`."""
        return self.sampling_params.use_beam_search

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclass
class _ScheduledItem:
    state: RequestState
    num_computed_tokens: int
    num_new_tokens: int

    @property
    def seq_len(self) -> int:
        return self.num_computed_tokens + self.num_new_tokens

    @property
    def samples(self) -> bool:
        return self.seq_len == len(self.state.token_ids)


@dataclass
class StepTimings:
    num_steps: int = 0
    forward_s: float = 0.0
    history: list[float] = field(default_factory=list)


class ModelRunner:
    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        self.block_size = config.block_size
        self.model_config: ModelConfig = load_model_config(source)
        self.model = LlamaForCausalLM.build(
            self.model_config, iter_weights(source, self.model_config), self.dtype, self.device
        )
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.eos_token_id: int | None = mc.eos_token_ids[0] if mc.eos_token_ids else None
        self.kernels = kernel_module(self.device, config.use_triton)
        self.num_blocks = config.num_kv_blocks or self._num_blocks_from_memory(config)
        self.kv_caches = allocate_kv_cache(self.model_config, self.num_blocks, self.block_size, self.dtype, self.device)
        # Preemption by swap: a pool of the same blocks in CPU memory (on a CPU device this
        # is CPU memory too; the mechanism stays the same). The scheduler picks its ids.
        self.num_swap_blocks = num_swap_blocks_for_budget(
            self.model_config, self.block_size, self.dtype, config.swap_space_bytes
        )
        self.swap_caches = allocate_kv_cache(
            self.model_config, self.num_swap_blocks, self.block_size, self.dtype, torch.device("cpu")
        )
        self.sampler = Sampler(self.model_config.vocab_size)
        self.requests: dict[str, RequestState] = {}
        self.timings = StepTimings()

    def _num_blocks_from_memory(self, config: EngineConfig) -> int:
        if self.device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free_bytes * config.gpu_memory_utilization)
        else:
            budget = config.kv_cache_memory_bytes
        return num_blocks_for_budget(self.model_config, self.block_size, self.dtype, budget)

    def execute(self, step: ExecuteStep) -> StepResult:
        # Beam forks copy their parents as they stand, before anything else changes them.
        for fork in step.beam_forks:
            parent = self.requests[fork.parent_request_id]
            self.requests[fork.request_id] = RequestState(
                request_id=fork.request_id,
                token_ids=list(parent.token_ids),
                num_prompt_tokens=parent.num_prompt_tokens,
                block_ids=list(parent.block_ids),
                sampling_params=parent.sampling_params,
            )
        for request_id in step.dropped_request_ids:
            self.requests.pop(request_id, None)
        # Swap-outs first: their blocks may be reallocated and written in this very step.
        copy_blocks(self.kv_caches, self.swap_caches, step.swap_out)
        copy_blocks(self.swap_caches, self.kv_caches, step.swap_in)
        # Copy-on-write of blocks shared by forked samples, before anything writes them.
        copy_blocks(self.kv_caches, self.kv_caches, step.block_copies)
        items = self._apply_deltas(step)
        if not items:
            return StepResult(step_id=step.step_id, sampled=[])
        # Decodes first: the decode kernel serves them in one batched call.
        items.sort(key=lambda item: item.num_new_tokens != 1)
        input_ids, positions, meta = self._prepare_inputs(items)
        start = time.perf_counter()
        hidden = self.model(input_ids, positions, self.kv_caches, meta, self.kernels)
        token_ends = np.cumsum([item.num_new_tokens for item in items])
        sample_rows = [row for row, item in enumerate(items) if item.samples]
        sampling_items = [items[row] for row in sample_rows]
        sampled = []
        if sampling_items:
            last_token_index = torch.tensor(token_ends[sample_rows] - 1, device=self.device)
            logits = self.model.compute_logits(hidden[last_token_index])
            if logits.dtype not in (torch.float32, torch.float64):
                logits = logits.float()
            states = [item.state for item in sampling_items]
            if step.forked_requests:
                logits, states = self._fork(step, logits, states)
            sampled = self._sample(logits, states)
        self.timings.num_steps += 1
        self.timings.forward_s += time.perf_counter() - start
        return StepResult(step_id=step.step_id, sampled=sampled)

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
        sampled = self.sampler(logits, [states[row] for row in sample_rows]) if sample_rows else []
        for row, token in zip(sample_rows, sampled):
            states[row].token_ids.append(token.token_id)
        return sampled + beam_tokens

    def _fork(
        self, step: ExecuteStep, logits: torch.Tensor, states: list[RequestState]
    ) -> tuple[torch.Tensor, list[RequestState]]:
        """Mirror the samples forked in this step (copies of their parents before this
        step's token) and give each its parent's logits row: [rows + forks, vocab]."""
        row_of = {state.request_id: row for row, state in enumerate(states)}
        rows = list(range(len(states)))
        states = list(states)
        for fork in step.forked_requests:
            parent = self.requests[fork.parent_request_id]
            child = RequestState(
                request_id=fork.request_id,
                token_ids=list(parent.token_ids),
                num_prompt_tokens=parent.num_prompt_tokens,
                block_ids=list(parent.block_ids),
                sampling_params=parent.sampling_params.for_sample(fork.sample_index),
            )
            self.requests[child.request_id] = child
            states.append(child)
            rows.append(row_of[parent.request_id])
        return logits[torch.tensor(rows, device=logits.device)], states

    def _apply_deltas(self, step: ExecuteStep) -> list[_ScheduledItem]:
        items: list[_ScheduledItem] = []
        counts = iter(step.num_scheduled_tokens)
        for new in step.new_requests:
            state = RequestState(
                request_id=new.request_id,
                token_ids=list(new.token_ids),
                num_prompt_tokens=new.num_prompt_tokens,
                block_ids=list(new.block_ids),
                sampling_params=new.sampling_params,
            )
            self.requests[new.request_id] = state
            items.append(_ScheduledItem(state, new.num_computed_tokens, next(counts)))
        for cached in step.cached_requests:
            state = self.requests[cached.request_id]
            if cached.num_replaced_blocks:  # copy-on-write: the copy replaces the shared block
                del state.block_ids[-cached.num_replaced_blocks :]
            state.block_ids.extend(cached.new_block_ids)
            state.token_ids.extend(cached.new_token_ids)
            items.append(_ScheduledItem(state, cached.num_computed_tokens, next(counts)))
        return [item for item in items if item.num_new_tokens > 0]

    def _prepare_inputs(
        self, items: list[_ScheduledItem]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        token_chunks, position_chunks, slot_chunks = [], [], []
        for item in items:
            start, end = item.num_computed_tokens, item.seq_len
            token_chunks.append(item.state.token_ids[start:end])
            pos = np.arange(start, end, dtype=np.int64)
            blocks = np.asarray(item.state.block_ids, dtype=np.int64)
            position_chunks.append(pos)
            slot_chunks.append(blocks[pos // bs] * bs + pos % bs)
        input_ids = torch.tensor([t for chunk in token_chunks for t in chunk], dtype=torch.long)
        positions = torch.from_numpy(np.concatenate(position_chunks))
        slot_mapping = torch.from_numpy(np.concatenate(slot_chunks))

        decodes = [item for item in items if item.num_new_tokens == 1]
        prefills = items[len(decodes) :]
        query_start = np.zeros(len(prefills) + 1, dtype=np.int32)
        np.cumsum([item.num_new_tokens for item in prefills], out=query_start[1:])
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=slot_mapping.to(dev),
            num_decode_tokens=len(decodes),
            decode_block_tables=self._block_table_tensor(decodes).to(dev),
            decode_seq_lens=torch.tensor([i.seq_len for i in decodes], dtype=torch.int32).to(dev),
            max_decode_seq_len=max((i.seq_len for i in decodes), default=0),
            prefill_block_tables=self._block_table_tensor(prefills).to(dev),
            prefill_query_start_loc=torch.from_numpy(query_start).to(dev),
            prefill_seq_lens=torch.tensor([i.seq_len for i in prefills], dtype=torch.int32).to(dev),
            max_prefill_query_len=max((i.num_new_tokens for i in prefills), default=0),
            max_prefill_seq_len=max((i.seq_len for i in prefills), default=0),
        )
        return input_ids.to(dev), positions.to(dev), meta

    def _block_table_tensor(self, items: list[_ScheduledItem]) -> torch.Tensor:
        """[len(items), max blocks] int32, padded with block 0 (never read: masked by seq_lens)."""
        width = max((-(-item.seq_len // self.block_size) for item in items), default=0)
        table = np.zeros((len(items), width), dtype=np.int32)
        for row, item in enumerate(items):
            used = -(-item.seq_len // self.block_size)
            table[row, :used] = item.state.block_ids[:used]
        return torch.from_numpy(table)
