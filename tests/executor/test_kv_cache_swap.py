"""Preemption by swap in the executor: block rows copied between the paged KV cache and the
CPU swap pool (services/executor/kv_cache.py), in the order ModelRunner.execute applies
an ExecuteStep's swaps. No model is loaded: the runner is only asked to swap."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pagedserve.services.executor.kv_cache import allocate_kv_cache, copy_blocks, kv_bytes_per_block, num_swap_blocks_for_budget
from pagedserve.services.executor.model_runner import ModelRunner
from pagedserve.shared.messages import ExecuteStep

MODEL = SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=8)
BLOCK_SIZE = 4


def random_cache(num_blocks: int, dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cache = allocate_kv_cache(MODEL, num_blocks, BLOCK_SIZE, dtype, torch.device("cpu"))  # type: ignore[arg-type]
    for k, v in cache:
        k.normal_()
        v.normal_()
    return cache


def blocks(cache: list[tuple[torch.Tensor, torch.Tensor]], block_ids: list[int]) -> list[torch.Tensor]:
    """K and V of `block_ids`, for every layer: 2 * num_layers tensors."""
    return [tensor[block_ids].clone() for layer in cache for tensor in layer]


def test_swap_out_then_in_restores_every_layer_exactly() -> None:
    torch.manual_seed(0)
    device_cache, swap_cache = random_cache(8), random_cache(4)
    swapped = [6, 1, 3]
    before = blocks(device_cache, swapped)
    untouched = blocks(device_cache, [0, 2, 4, 5, 7])
    copy_blocks(device_cache, swap_cache, list(zip(swapped, [2, 0, 3])))
    assert all(torch.equal(a, b) for a, b in zip(blocks(device_cache, [0, 2, 4, 5, 7]), untouched))
    for k, v in device_cache:  # the freed blocks are reused: overwritten
        k[swapped] = 0.0
        v[swapped] = -1.0
    copy_blocks(swap_cache, device_cache, list(zip([2, 0, 3], [5, 7, 0])))  # fresh blocks
    assert all(torch.equal(a, b) for a, b in zip(blocks(device_cache, [5, 7, 0]), before))


def test_runner_swaps_out_before_it_swaps_in() -> None:
    # One step both swaps block 2 out (its owner is preempted) and swaps another request
    # into block 2: the old K/V must reach the swap pool before the new ones land.
    torch.manual_seed(1)
    runner = ModelRunner.__new__(ModelRunner)
    runner.requests = {}
    runner.kv_caches, runner.swap_caches = random_cache(4), random_cache(2)
    old = blocks(runner.kv_caches, [2])
    incoming = blocks(runner.swap_caches, [1])
    step = ExecuteStep(
        step_id=0, new_requests=[], cached_requests=[], num_scheduled_tokens=[], swap_out=[(2, 0)], swap_in=[(1, 2)]
    )
    assert runner.execute(step).sampled == []
    assert all(torch.equal(a, b) for a, b in zip(blocks(runner.swap_caches, [0]), old))
    assert all(torch.equal(a, b) for a, b in zip(blocks(runner.kv_caches, [2]), incoming))


def test_swap_pool_size_from_bytes() -> None:
    per_block = kv_bytes_per_block(MODEL, BLOCK_SIZE, torch.float32)  # type: ignore[arg-type]
    assert per_block == 2 * 3 * BLOCK_SIZE * 2 * 8 * 4
    assert num_swap_blocks_for_budget(MODEL, BLOCK_SIZE, torch.float32, 5 * per_block + 1) == 5  # type: ignore[arg-type]
    assert num_swap_blocks_for_budget(MODEL, BLOCK_SIZE, torch.float32, per_block - 1) == 0  # type: ignore[arg-type]


def test_kv_groups_share_cache_tensors_and_copy_each_once() -> None:
    """Layers 0, 2 global and 1, 3 with a window: two KV groups of two layers, whose layers
    share two K/V tensor pairs; a block costs two layers, and a copy moves each pair once."""
    from pagedserve.services.executor.kv_cache import kv_layout

    model = SimpleNamespace(num_layers=4, num_kv_heads=2, head_dim=8, layer_windows=(None, 8, None, 8))
    layout = kv_layout(model)  # type: ignore[arg-type]
    assert layout.windows == (None, 8) and layout.group_of_layer == (0, 1, 0, 1)
    cache = allocate_kv_cache(model, 6, BLOCK_SIZE, torch.float64, torch.device("cpu"), layout)  # type: ignore[arg-type]
    assert cache[0] is cache[1] and cache[2] is cache[3] and cache[0][0] is not cache[2][0]
    per_block = kv_bytes_per_block(model, BLOCK_SIZE, torch.float32, layout)  # type: ignore[arg-type]
    assert per_block == 2 * 2 * BLOCK_SIZE * 2 * 8 * 4  # two layers' K and V, not four
    for k, v in cache[::2]:
        k.normal_()
        v.normal_()
    before = blocks(cache[::2], [1, 4])
    copy_blocks(cache, cache, [(1, 4), (4, 5)])  # 4 -> 5 reads block 4 as it was: each pair copied once
    assert all(torch.equal(a[0], b[0]) for a, b in zip(blocks(cache[::2], [4]), before))
    assert all(torch.equal(a[0], b[1]) for a, b in zip(blocks(cache[::2], [5]), before))
