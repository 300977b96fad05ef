"""The scheduler's pure rules (services/scheduler/policy.py), one at a time, without a
scheduler."""

from __future__ import annotations

import pytest

from pagedserve.services.scheduler.config import SchedulerConfig
from pagedserve.services.scheduler.policy import (
    QueueFullError,
    blocks_to_cover,
    num_tokens_to_schedule,
    peak_kv_tokens,
    pick_preemption_victim,
    stop_status,
    validate_request,
    waiting_order_key,
)
from pagedserve.services.scheduler.request import Request, RequestStatus
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits

EOS = 0


def make_request(
    request_id: str = "r",
    prompt_len: int = 8,
    arrival_time: float = 0.0,
    priority: int = 0,
    arrival_seq: int = 0,
    **params: object,
) -> Request:
    req = Request(
        request_id,
        list(range(10, 10 + prompt_len)),
        SamplingParams(**params),  # type: ignore[arg-type]
        arrival_time=arrival_time,
        eos_token_id=EOS,
        priority=priority,
    )
    req.arrival_seq = arrival_seq
    return req


@pytest.mark.parametrize(("num_tokens", "expected"), [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_blocks_to_cover_is_ceil_division(num_tokens: int, expected: int) -> None:
    assert blocks_to_cover(num_tokens, 4) == expected


def test_a_step_schedules_what_is_left_within_the_budget() -> None:
    req = make_request(prompt_len=10)
    req.num_computed_tokens = 4
    assert (num_tokens_to_schedule(req, 100), num_tokens_to_schedule(req, 3)) == (6, 3)


def test_peak_kv_tokens_stops_at_max_model_len_and_never_stores_the_last_token() -> None:
    req = make_request(prompt_len=10, max_tokens=5)
    assert (peak_kv_tokens(req, 100), peak_kv_tokens(req, 12)) == (14, 11)


def test_waiting_order_is_priority_then_preempted_then_arrival() -> None:
    late = make_request("late", arrival_time=2.0, arrival_seq=0)
    early = make_request("early", arrival_time=1.0, arrival_seq=1)
    tie = make_request("tie", arrival_time=1.0, arrival_seq=2)
    preempted = make_request("preempted", arrival_time=3.0, arrival_seq=3)
    preempted.num_preemptions = 1
    urgent = make_request("urgent", arrival_time=4.0, priority=-1, arrival_seq=4)
    ordered = sorted([late, early, tie, preempted, urgent], key=waiting_order_key)
    assert [r.request_id for r in ordered] == ["urgent", "preempted", "early", "tie", "late"]


def test_the_victim_is_the_least_important_then_the_latest() -> None:
    a = make_request("a", arrival_time=0.0, priority=1, arrival_seq=0)
    b = make_request("b", arrival_time=5.0, arrival_seq=1)
    c = make_request("c", arrival_time=5.0, arrival_seq=2)
    assert pick_preemption_victim([a, b, c]) is a
    assert pick_preemption_victim([b, c]) is c


def test_stop_status_in_order_of_precedence() -> None:
    req = make_request(prompt_len=8, max_tokens=3, stop_token_ids=[7])
    req.output_token_ids = [20]
    assert stop_status(req, 20, 100) is None
    assert stop_status(req, EOS, 100) == RequestStatus.FINISHED_STOPPED
    assert stop_status(req, 7, 100) == RequestStatus.FINISHED_STOPPED
    assert stop_status(req, 20, 9) == RequestStatus.FINISHED_LENGTH  # 8 + 1 tokens reach max_model_len
    req.output_token_ids = [20, 21, 22]
    assert stop_status(req, 22, 100) == RequestStatus.FINISHED_LENGTH
    ignoring = make_request(ignore_eos=True)
    ignoring.output_token_ids = [EOS]
    assert stop_status(ignoring, EOS, 100) is None


def test_validation_rejects_with_numbers() -> None:
    config = SchedulerConfig(limits=SchedulingLimits(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64))
    with pytest.raises(ValueError, match="the prompt is empty"):
        validate_request(make_request(prompt_len=0), config, num_blocks=100, block_size=4)
    with pytest.raises(ValueError, match="has 64 tokens but max_model_len is 64"):
        validate_request(make_request(prompt_len=64), config, num_blocks=100, block_size=4)
    # Peak 8 + 16 - 1 = 23 tokens: 6 blocks of 4, and 3 beams need 18 of them.
    validate_request(make_request(max_tokens=16, beam_width=3), config, num_blocks=18, block_size=4)
    with pytest.raises(ValueError, match=r"holds 17 blocks \(68 tokens\) but request r needs 23 x 3 beams"):
        validate_request(make_request(max_tokens=16, beam_width=3), config, num_blocks=17, block_size=4)
    with pytest.raises(ValueError, match="n=5 samples but at most 4 sequences run at once"):
        validate_request(make_request(n=5), config, num_blocks=100, block_size=4)


def test_queue_full_error_carries_its_numbers() -> None:
    error = QueueFullError(1024, 1024)
    assert (error.num_waiting, error.max_num_waiting) == (1024, 1024)
    assert "1,024 of 1,024" in str(error)
