"""The in-process engine: scheduler core + model runner wired by function calls.

Tests, benchmarks and the Python API use it; the services put ZeroMQ between the same
two objects and add nothing else. Each `step()` is schedule -> execute -> update.

With `tensor_parallel_size` T > 1 this process is rank 0 of a real torch.distributed group
and ranks 1 .. T-1 are child processes (`rank_workers.py`) sent every step; `close()` (or
leaving a `with` block) ends them and the group.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from pagedserve.services.engine.config import EngineConfig
from pagedserve.services.executor.distributed import TensorParallelGroup
from pagedserve.services.executor.model_config import load_model_config
from pagedserve.services.executor.model_runner import ModelRunner
from pagedserve.services.executor.rank_workers import RankWorkers
from pagedserve.services.executor.tensor_parallel import ShardPlan
from pagedserve.services.scheduler.request import Request
from pagedserve.services.scheduler.config import SchedulerConfig
from pagedserve.services.scheduler.scheduler import Scheduler
from pagedserve.shared.messages import RequestDelta, TokenLogprobs
from pagedserve.shared.model_source import resolve_model_source
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.tokenizer import encode_prompt, load_tokenizer

Prompt = str | list[int]


@dataclass
class CompletionOutput:
    """One sample of a prompt (`SamplingParams.n` of them)."""

    index: int  # the sample index, 0 .. n-1
    token_ids: list[int] = field(default_factory=list)  # generated only (EOS included if hit)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""


@dataclass
class Completion:
    """A prompt's samples; `token_ids`, `logprobs`, `finish_reason` and `text` are those
    of the first (the only one unless n > 1)."""

    request_id: str
    prompt: Prompt
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=lambda: [CompletionOutput(0)])
    # With SamplingParams.prompt_logprobs: prompt tokens 1.. (token 0 has none).
    prompt_logprobs: list[TokenLogprobs] | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def logprobs(self) -> list[TokenLogprobs]:
        return self.outputs[0].logprobs

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def text(self) -> str:
        return self.outputs[0].text


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.model_source = resolve_model_source(self.config.model)
        if self.config.tensor_parallel_size > 1:
            # Refuse a size the model does not split into before starting anything.
            ShardPlan.for_model(load_model_config(self.model_source), 0, self.config.tensor_parallel_size)
        self.tokenizer = load_tokenizer(self.model_source)
        self.rank_workers: RankWorkers | None = None
        group: TensorParallelGroup | None = None
        if self.config.tensor_parallel_size > 1:
            self.rank_workers = RankWorkers(self.config)
            try:
                group = TensorParallelGroup.join(
                    0, self.config.tensor_parallel_size, self.rank_workers.init_address,
                    self.config.torch_device(), self.config.collective_timeout_s,
                )
            except BaseException:
                self.rank_workers.close()
                raise
        try:
            self.runner = ModelRunner(self.config, self.model_source, group)
        except BaseException:
            self.close_group(group)
            raise
        self.max_model_len = self.runner.max_model_len
        self.eos_token_id = self.runner.eos_token_id
        self.scheduler = Scheduler(
            SchedulerConfig(limits=self.config.limits.resolved(self.max_model_len), model=self.model_source.name),
            num_blocks=self.runner.num_blocks,
            block_size=self.config.block_size,
            num_swap_blocks=self.runner.num_swap_blocks,
            kv_group_windows=self.runner.kv_layout.windows,
        )
        self._ids = itertools.count()

    def close(self) -> None:
        """End the tensor-parallel ranks and the group (nothing to do for T = 1)."""
        self.close_group(self.runner.group)

    def close_group(self, group: TensorParallelGroup | None) -> None:
        if self.rank_workers is not None:
            self.rank_workers.close()
            self.rank_workers = None
        if group is not None:
            group.close()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def model_name(self) -> str:
        return self.model_source.name

    def tokenize(self, prompt: Prompt) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else encode_prompt(self.tokenizer, prompt)

    def add_request(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
    ) -> str:
        sampling_params.validate()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        self.scheduler.add_request(
            Request(
                request_id,
                prompt_token_ids,
                sampling_params,
                arrival_time=time.monotonic(),
                eos_token_id=self.eos_token_id,
                priority=priority,
            )
        )
        return request_id

    def abort(self, request_ids: Sequence[str]) -> list[RequestDelta]:
        return self.scheduler.abort_requests(list(request_ids))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestDelta]:
        step = self.scheduler.schedule()
        if self.rank_workers is not None:
            self.rank_workers.send(step)
        result = self.runner.execute(step)
        return self.scheduler.update_from_output(step, result)

    def stream(
        self, prompts: Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams]
    ) -> Iterator[tuple[int, RequestDelta]]:
        """Run the prompts together; yield (prompt index, delta) as each step produces tokens.
        With `n > 1` a prompt is one request whose `n` samples share its prompt's K/V;
        `delta.sample_index` says which sample a delta belongs to."""
        params = _per_prompt(sampling_params, len(prompts))
        index_of = {
            self.add_request(self.tokenize(prompt), p): i for i, (prompt, p) in enumerate(zip(prompts, params))
        }
        pending = set(index_of)  # until the core flags a request's last delta
        try:
            while pending:
                for delta in self.step():
                    if delta.request_id in index_of:
                        yield index_of[delta.request_id], delta
                        if delta.request_finished:
                            pending.discard(delta.request_id)
        finally:
            if pending:  # the consumer stopped early: give the blocks back
                self.abort(sorted(pending))

    def generate(
        self, prompts: Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        """One Completion per prompt, with `n` outputs each (`SamplingParams.n`)."""
        params = _per_prompt(sampling_params, len(prompts))
        completions = [
            Completion(
                request_id="",
                prompt=prompt,
                prompt_token_ids=self.tokenize(prompt),
                outputs=[CompletionOutput(i) for i in range(p.n)],
            )
            for prompt, p in zip(prompts, params)
        ]
        for index, delta in self.stream([c.prompt_token_ids for c in completions], params):
            completion = completions[index]
            completion.request_id = delta.request_id
            output = completion.outputs[delta.sample_index]
            output.token_ids.extend(delta.new_token_ids)
            output.logprobs.extend(delta.logprobs)
            if params[index].prompt_logprobs is not None and completion.prompt_logprobs is None:
                completion.prompt_logprobs = delta.prompt_logprobs
            if delta.finish_reason is not None:
                output.finish_reason = delta.finish_reason
        for completion in completions:
            for output in completion.outputs:
                output.text = self.tokenizer.decode(output.token_ids, skip_special_tokens=True)
        return completions


def _per_prompt(params: SamplingParams | Sequence[SamplingParams], count: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return list(params)
