"""The model runner's side of parallel sampling, without a model: block copies
(copy-on-write) copy K and V of every layer before the step runs, a copy-on-write delta
replaces the last block of the mirrored table, and forked samples mirror their parent and
sample from its logits row with their own seeds."""

from __future__ import annotations

import torch

from pagedserve.services.executor.input_batch import InputBatch
from pagedserve.services.executor.model_runner import ModelRunner
from pagedserve.services.executor.request_state import RequestState
from pagedserve.services.executor.sampler import Sampler
from pagedserve.shared.messages import CachedRequestData, ExecuteStep, ForkedRequest, NewRequestData
from pagedserve.shared.sampling_params import SamplingParams

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 3, 6, 4, 2, 5
VOCAB_SIZE = 50


def bare_runner() -> ModelRunner:
    """A runner with a random KV cache and no model: enough for steps that compute nothing."""
    runner = object.__new__(ModelRunner)
    generator = torch.Generator().manual_seed(0)
    shape = (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    runner.kv_caches = [
        (torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)) for _ in range(NUM_LAYERS)
    ]
    runner.swap_caches = []
    runner.requests = {}
    runner.block_size = BLOCK_SIZE
    runner.device = torch.device("cpu")
    runner.input_batch = InputBatch(
        num_rows=1, max_blocks_per_row=1, max_num_tokens=1, block_size=BLOCK_SIZE, device=runner.device
    )
    runner.sampler = Sampler(VOCAB_SIZE)
    return runner


def test_block_copies_copy_k_and_v_of_every_layer_and_nothing_else() -> None:
    runner = bare_runner()
    before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    runner.execute(ExecuteStep(0, [], [], [], block_copies=[(1, 4), (2, 0)]))
    for (k, v), (k0, v0) in zip(runner.kv_caches, before):
        for cache, original in ((k, k0), (v, v0)):
            assert torch.equal(cache[4], original[1])
            assert torch.equal(cache[0], original[2])
            for untouched in (1, 2, 3, 5):
                assert torch.equal(cache[untouched], original[untouched])


def test_copy_on_write_delta_replaces_the_last_block_of_the_table() -> None:
    runner = bare_runner()
    params = SamplingParams()
    runner.execute(ExecuteStep(0, [NewRequestData("a", [1, 2, 3, 4, 5, 6], 6, [3, 1], 6, params)], [], [0]))
    runner.execute(ExecuteStep(1, [], [CachedRequestData("a", [5], 6, num_replaced_blocks=1)], [0]))
    assert runner.requests["a"].block_ids == [3, 5]


def test_forked_samples_mirror_the_parent_and_draw_from_its_row_with_their_own_seeds() -> None:
    runner = bare_runner()
    params = SamplingParams(seed=11, n=3, temperature=1.0)
    parent = RequestState("a", [7, 8, 9], 3, [2], params)
    other = RequestState("b", [1], 1, [4], SamplingParams(seed=5))
    runner.requests = {"a": parent, "b": other}
    logits = torch.randn(2, VOCAB_SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    step = ExecuteStep(0, [], [], [], forked_requests=[ForkedRequest("a#1", "a", 1), ForkedRequest("a#2", "a", 2)])
    expanded, states = runner._fork(step, logits, [parent, other])
    assert [s.request_id for s in states] == ["a", "b", "a#1", "a#2"]
    assert torch.equal(expanded[2], logits[0]) and torch.equal(expanded[3], logits[0])
    child = runner.requests["a#2"]
    assert child.token_ids == [7, 8, 9] and child.token_ids is not parent.token_ids
    assert child.block_ids == [2] and child.num_prompt_tokens == 3
    assert child.sampling_params.seed == 13 and child.sampling_params.n == 1
    # Sample i draws what a separate request seeded seed + i draws from the same logits.
    forked = runner.sampler(expanded, states)
    separate = [
        runner.sampler(logits[:1], [RequestState(f"s{i}", [7, 8, 9], 3, [2], params.for_sample(i))])[0]
        for i in range(3)
    ]
    assert [forked[0].token_id, forked[2].token_id, forked[3].token_id] == [t.token_id for t in separate]


def test_reset_forgets_every_request_and_frees_its_row() -> None:
    runner = bare_runner()
    params = SamplingParams()
    runner.execute(ExecuteStep(0, [NewRequestData("a", [1, 2, 3], 3, [3], 3, params)], [], [0]))
    runner.execute(ExecuteStep(1, [NewRequestData("b", [4, 5], 2, [1, 2], 2, params)], [], [0]))
    runner.reset()
    assert runner.requests == {} and runner.input_batch.num_requests == 0
    assert not runner.input_batch.block_table.any()


def test_the_batch_rows_follow_the_mirrored_block_tables() -> None:
    runner = bare_runner()
    params = SamplingParams(n=2)
    runner.execute(ExecuteStep(0, [NewRequestData("a", [1, 2, 3, 4, 5], 5, [3, 1], 5, params)], [], [0]))
    runner.execute(ExecuteStep(1, [], [CachedRequestData("a", [5, 2], 5, num_replaced_blocks=1)], [0]))
    assert runner.input_batch.block_ids("a") == runner.requests["a"].block_ids == [3, 5, 2]
    runner.execute(ExecuteStep(2, [], [], [], dropped_request_ids=["a"]))
    assert runner.input_batch.num_requests == 0
