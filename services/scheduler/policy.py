"""The scheduler's rules as small pure functions: which requests are accepted, in which
order they are admitted and preempted, how much a step computes of one, when one stops.

No state: each takes a request (and the limits) and answers, so each rule is testable
alone and the scheduler reads as the sequence of decisions it makes.
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedserve.services.scheduler.config import SchedulerConfig
from pagedserve.services.scheduler.request import Request, RequestStatus


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the gateway answers 429 with Retry-After."""

    def __init__(self, num_waiting: int, max_num_waiting: int) -> None:
        self.num_waiting = num_waiting
        self.max_num_waiting = max_num_waiting
        super().__init__(
            f"waiting queue is full ({num_waiting:,} of {max_num_waiting:,} requests): "
            "retry later"
        )


def blocks_to_cover(num_tokens: int, block_size: int) -> int:
    """Blocks a block table needs to hold `num_tokens` slots (ceil division)."""
    return -(-num_tokens // block_size)


def num_tokens_to_schedule(req: Request, token_budget: int) -> int:
    """Everything not yet computed, as far as the step's budget reaches: a whole prompt,
    a chunk of one, or the single token of a decode (whose token may still be pending:
    sampled by a step in flight, which the executor runs first)."""
    return min(req.num_tokens_scheduled_for - req.num_computed_tokens, token_budget)


def ends_with_pending_tokens(req: Request, max_model_len: int) -> bool:
    """Whether the tokens pending for `req` (sampled by steps in flight) will end it by
    length: then scheduling it again would only compute a token to throw away. (A stop
    token or EOS cannot be foreseen: that surplus token is computed and discarded.)"""
    if not req.num_pending_tokens:
        return False
    num_output = req.num_output_tokens + req.num_pending_tokens
    return num_output >= req.sampling_params.max_tokens or req.num_tokens_scheduled_for >= max_model_len


def peak_kv_tokens(req: Request, max_model_len: int) -> int:
    """The most K/V slots the request can ever hold at once: its final length minus one,
    since the last sampled token is never fed back through the model."""
    final_len = min(req.num_prompt_tokens + req.sampling_params.max_tokens, max_model_len)
    return final_len - 1


def waiting_order_key(req: Request) -> tuple[int, int, float, int]:
    """Admission order: priority first (lower = sooner); within a priority, requests that
    were preempted go first (they already held a place and may be streaming), then FCFS."""
    was_preempted = req.num_preemptions > 0
    return (req.priority, 0 if was_preempted else 1, req.arrival_time, req.arrival_seq)


def preemption_order_key(req: Request) -> tuple[int, float, int]:
    """The largest key is preempted first: least important, then latest to arrive."""
    return (req.priority, req.arrival_time, req.arrival_seq)


def pick_preemption_victim(candidates: Sequence[Request]) -> Request:
    return max(candidates, key=preemption_order_key)


def stop_status(req: Request, token_id: int, max_model_len: int) -> RequestStatus | None:
    """Whether `token_id`, just appended to `req`'s output, ends the request."""
    params = req.sampling_params
    if token_id in params.stop_token_ids:
        return RequestStatus.FINISHED_STOPPED
    if token_id == req.eos_token_id and not params.ignore_eos:
        return RequestStatus.FINISHED_STOPPED
    if req.num_output_tokens >= params.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    if req.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None


def validate_request(req: Request, config: SchedulerConfig, num_blocks: int, block_size: int) -> None:
    """Reject, with numbers, a request that could never run to completion (ValueError).

    The KV check uses the request's peak footprint, not just its prompt: a request that
    outgrows the whole pool would preempt itself forever once it runs alone."""
    max_model_len = config.max_model_len
    num_prompt = req.num_prompt_tokens
    if num_prompt == 0:
        raise ValueError(f"request {req.request_id}: the prompt is empty")
    if num_prompt >= max_model_len:
        raise ValueError(
            f"request {req.request_id}: the prompt has {num_prompt:,} tokens but "
            f"max_model_len is {max_model_len:,} (prompt + output): at most "
            f"{max_model_len - 1:,} prompt tokens leave room for one generated token"
        )
    peak = peak_kv_tokens(req, max_model_len)
    # A beam search runs its beams as a gang (admitted and preempted together); resumed
    # after a preemption, each beam recomputes into blocks of its own, so the group must
    # fit with nothing shared.
    params = req.sampling_params
    width = params.beam_width
    if width * blocks_to_cover(peak, block_size) > num_blocks:
        beams = f" x {width} beams" if width > 1 else ""
        raise ValueError(
            f"KV cache holds {num_blocks:,} blocks ({num_blocks * block_size:,} tokens) but "
            f"request {req.request_id} needs {peak:,}{beams} ({num_prompt:,} prompt + "
            f"{peak - num_prompt:,} generated): shorten the prompt, lower max_tokens, or "
            "raise --kv-cache-memory"
        )
    # Samples and beams run at once (forked together, a search's beams as one gang).
    if max(params.n, width) > config.max_num_running:
        what = f"beam_width={width} beams" if params.use_beam_search else f"n={params.n} samples"
        raise ValueError(
            f"request {req.request_id}: {what} but at most "
            f"{config.max_num_running} sequences run at once (max_num_seqs "
            f"{config.limits.max_num_seqs}, max_num_batched_tokens {config.limits.max_num_batched_tokens})"
        )
