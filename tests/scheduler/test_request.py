"""The request as the scheduler tracks it (services/scheduler/request.py): its counters,
and the messages built from it for the executor and the client."""

from __future__ import annotations

from pagedserve.services.scheduler.request import Request, RequestStatus
from pagedserve.shared.messages import CachedRequestData, NewRequestData, RequestDelta, SampledToken, TokenLogprobs
from pagedserve.shared.sampling_params import SamplingParams


def make_request() -> Request:
    req = Request("a", [5, 6, 7], SamplingParams(max_tokens=4), arrival_time=0.0)
    req.output_token_ids = [8]
    return req


def test_counters_and_status() -> None:
    req = make_request()
    assert (req.num_prompt_tokens, req.num_output_tokens, req.num_tokens) == (3, 1, 4)
    assert req.all_token_ids == [5, 6, 7, 8] and req.all_token_ids is not req.all_token_ids
    assert not req.is_finished and req.finish_reason is None
    req.status = RequestStatus.FINISHED_LENGTH
    assert req.is_finished and req.finish_reason == "length"


def test_new_request_data_carries_every_token_so_none_is_left_unsent() -> None:
    req = make_request()
    req.block_ids, req.num_computed_tokens, req.unsent_token_ids = [3, 1], 2, [8]
    data = req.new_request_data()
    assert data == NewRequestData("a", [5, 6, 7, 8], 3, [3, 1], 2, req.sampling_params)
    assert req.unsent_token_ids == []
    req.block_ids.append(9)
    assert data.block_ids == [3, 1]  # a copy: the message does not change with the table


def test_cached_request_data_sends_the_unsent_tokens_once() -> None:
    req = make_request()
    req.num_computed_tokens, req.unsent_token_ids = 3, [8]
    assert req.cached_request_data([4], 1) == CachedRequestData("a", [4], 3, num_replaced_blocks=1, new_token_ids=[8])
    assert req.cached_request_data([], 0).new_token_ids == []


def test_a_sample_reports_under_the_client_id_with_its_index_and_logprobs() -> None:
    req = make_request()
    req.parent_request_id, req.sample_index, req.num_cached_tokens = "client", 2, 16
    token = SampledToken("a#2", 8, -0.25, [8, 9], [-0.25, -1.5])
    assert req.delta(token) == RequestDelta(
        "client", [8], [TokenLogprobs(-0.25, [8, 9], [-0.25, -1.5])], num_cached_tokens=16, sample_index=2
    )
    assert req.delta(SampledToken("a#2", 8)).logprobs == []
    req.status = RequestStatus.FINISHED_ABORTED
    assert req.delta(None) == RequestDelta("client", [], finish_reason="abort", num_cached_tokens=16, sample_index=2)
