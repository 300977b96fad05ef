"""The paged KV cache: per layer, K and V of shape [num_blocks, block_size, num_kv_heads, head_dim].

The CPU swap pool of preemption by swap has the same layout, so a swap copies whole block
rows (`copy_blocks`) between the two, layer by layer."""

from __future__ import annotations

import torch

from pagedserve.services.executor.model_config import ModelConfig


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element_size


def num_blocks_for_budget(config: ModelConfig, block_size: int, dtype: torch.dtype, kv_bytes: int) -> int:
    per_block = kv_bytes_per_block(config, block_size, dtype)
    num_blocks = kv_bytes // per_block
    if num_blocks < 1:
        raise ValueError(
            f"a KV budget of {kv_bytes:,} bytes holds no block: one block of {block_size} tokens "
            f"needs {per_block:,} bytes; raise --kv-cache-memory"
        )
    return int(num_blocks)


def num_swap_blocks_for_budget(config: ModelConfig, block_size: int, dtype: torch.dtype, swap_bytes: int) -> int:
    """0 for a budget under one block: no swap pool, every preemption recomputes."""
    return int(swap_bytes // kv_bytes_per_block(config, block_size, dtype))


def copy_blocks(
    source: list[tuple[torch.Tensor, torch.Tensor]],
    destination: list[tuple[torch.Tensor, torch.Tensor]],
    pairs: list[tuple[int, int]],
) -> None:
    """Copy K and V of block `src` of `source` into block `dst` of `destination`, for every
    (src, dst) pair and every layer. The caches may live on different devices (swap)."""
    if not pairs:
        return
    src_device, dst_device = source[0][0].device, destination[0][0].device
    src_ids = torch.tensor([src for src, _ in pairs], dtype=torch.long, device=src_device)
    dst_ids = torch.tensor([dst for _, dst in pairs], dtype=torch.long, device=dst_device)
    for src_layer, dst_layer in zip(source, destination):
        for src_cache, dst_cache in zip(src_layer, dst_layer):
            # [len(pairs), block_size, num_kv_heads, head_dim], gathered then moved once
            dst_cache[dst_ids] = src_cache[src_ids].to(dst_device)


def allocate_kv_cache(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(config.num_layers)
    ]
