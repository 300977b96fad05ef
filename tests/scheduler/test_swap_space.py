"""Swap space bookkeeping (services/scheduler/swap_space.py): swap blocks taken and given
back, and the copies each step carries, in order."""

from __future__ import annotations

from pagedserve.services.scheduler.request import Request
from pagedserve.services.scheduler.swap_space import SwapSpace
from pagedserve.shared.sampling_params import SamplingParams


def make_request(request_id: str, block_ids: list[int]) -> Request:
    req = Request(request_id, [1, 2, 3], SamplingParams(), arrival_time=0.0)
    req.block_ids = list(block_ids)
    return req


def test_without_a_swap_pool_nothing_can_be_swapped() -> None:
    space = SwapSpace(0, 4)
    assert space.pool is None and not space.can_hold(make_request("a", [0]))


def test_swap_out_then_in_records_both_copies_and_frees_the_swap_blocks() -> None:
    space = SwapSpace(4, 4)
    req = make_request("a", [7, 3, 5])
    assert space.can_hold(req) and not space.can_hold(make_request("big", [0, 1, 2, 3, 4]))
    space.swap_out(req)
    assert space.pool is not None and space.pool.num_used_blocks == 3
    swap_block_ids = list(req.swap_block_ids)
    assert space.take_swap_out() == list(zip([7, 3, 5], swap_block_ids))
    assert space.take_swap_out() == []
    assert not space.can_hold(make_request("b", [0, 1]))  # one swap block left
    req.block_ids = [9, 1, 2]  # fresh device blocks
    space.swap_in(req)
    assert space.take_swap_in() == list(zip(swap_block_ids, [9, 1, 2]))
    assert req.swap_block_ids == [] and space.pool.num_used_blocks == 0
    assert (space.num_swap_outs_total, space.num_swap_ins_total) == (1, 1)


def test_release_gives_back_what_a_request_holds_once() -> None:
    space = SwapSpace(2, 4)
    req = make_request("a", [0, 1])
    space.swap_out(req)
    space.release(req)
    space.release(req)  # nothing left: no double free
    assert space.pool is not None and space.pool.num_free_blocks == 2
