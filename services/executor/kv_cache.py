"""The paged KV cache: per layer, K and V of shape [num_blocks, block_size, num_kv_heads, head_dim]."""

from __future__ import annotations

import torch

from services.executor.model_config import ModelConfig


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


def allocate_kv_cache(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(config.num_layers)
    ]
