"""The paged KV cache: per layer, K and V of shape [num_blocks, block_size, num_kv_heads, head_dim].

With several KV groups (sliding-window layers beside global ones, `shared/kv_group_layout.py`)
the layers of different groups share tensors: layer j of every group reads and writes cache
tensor j, and a block id belongs to one group at a time (the scheduler's pool hands each id
to one group's table), so a block costs one group's layers, not the model's, and a block a
window gives back serves any group. With one group every layer has tensors of its own, as
always.

The CPU swap pool of preemption by swap has the same layout, so a swap copies whole block
rows (`copy_blocks`) between the two, tensor by tensor."""

from __future__ import annotations

import torch

from pagedserve.services.executor.model_config import ModelConfig
from pagedserve.shared.kv_group_layout import KVGroupLayout


def kv_layout(config: ModelConfig) -> KVGroupLayout:
    """The model's KV groups, from its layers' windows."""
    return KVGroupLayout.for_windows(config.layer_windows or (None,) * config.num_layers)


def one_group(config: ModelConfig) -> KVGroupLayout:
    """Every layer in one group with tensors of its own (windows, if any, only mask)."""
    return KVGroupLayout.for_windows((None,) * config.num_layers)


def kv_bytes_per_block(
    config: ModelConfig, block_size: int, dtype: torch.dtype, layout: KVGroupLayout | None = None
) -> int:
    """One block id's K and V over the cache tensors (one group's layers)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    num_tensors = (layout or one_group(config)).layers_per_group
    return 2 * num_tensors * block_size * config.num_kv_heads * config.head_dim * element_size


def num_blocks_for_budget(
    config: ModelConfig, block_size: int, dtype: torch.dtype, kv_bytes: int, layout: KVGroupLayout | None = None
) -> int:
    per_block = kv_bytes_per_block(config, block_size, dtype, layout)
    num_blocks = kv_bytes // per_block
    if num_blocks < 1:
        raise ValueError(
            f"a KV budget of {kv_bytes:,} bytes holds no block: one block of {block_size} tokens "
            f"needs {per_block:,} bytes; raise --kv-cache-memory"
        )
    return int(num_blocks)


def num_swap_blocks_for_budget(
    config: ModelConfig, block_size: int, dtype: torch.dtype, swap_bytes: int, layout: KVGroupLayout | None = None
) -> int:
    """0 for a budget under one block: no swap pool, every preemption recomputes."""
    return int(swap_bytes // kv_bytes_per_block(config, block_size, dtype, layout))


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
    copied: set[int] = set()  # tensors shared by layers of several KV groups: copied once
    for src_layer, dst_layer in zip(source, destination):
        if id(dst_layer[0]) in copied:
            continue
        copied.add(id(dst_layer[0]))
        for src_cache, dst_cache in zip(src_layer, dst_layer):
            # [len(pairs), block_size, num_kv_heads, head_dim], gathered then moved once
            dst_cache[dst_ids] = src_cache[src_ids].to(dst_device)


def allocate_kv_cache(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
    layout: KVGroupLayout | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Layer i's (K, V); layers with the same index in their KV group share them."""
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    layout = layout or one_group(config)
    tensors = [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(layout.layers_per_group)
    ]
    return [tensors[slot] for slot in layout.slot_of_layer]
