"""Random paged KV caches for the kernel tests, poisoned where no real token sits.

Every slot that holds no real token (block tails past seq_len, the padding block 0 of every
block table, blocks nobody owns, and with a sliding window every slot before the window, whose
wholly-outside blocks the table points at block 0 as the scheduler leaves them) is NaN in the cache a kernel under test reads, so a single
unmasked read, or a masked NaN multiplied by a zero probability, turns its output NaN. The
torch reference, which by design gathers whole blocks and masks scores, gets the same cache
with those NaNs replaced by large finite garbage.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pytest
import torch

GARBAGE = 1e3  # what the torch reference sees where the kernel under test sees NaN


def seeded_generator(request: pytest.FixtureRequest) -> torch.Generator:
    """Seeded from the test id, so every parameter set draws its own, reproducible inputs."""
    # On the default device: a test that makes its tensors on a GPU draws them there.
    return torch.Generator(device=torch.get_default_device()).manual_seed(zlib.crc32(request.node.nodeid.encode()))


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-5}
    return {"rtol": 1e-2, "atol": 1e-2}


@dataclass
class PagedCache:
    key_cache: torch.Tensor  # NaN wherever no real token sits: what the kernel reads
    value_cache: torch.Tensor
    reference_key_cache: torch.Tensor  # the same with the NaNs replaced by GARBAGE
    reference_value_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq], padding = block 0
    seq_lens: torch.Tensor  # int32 [num_seqs]


def paged_cache(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    extra_table_columns: int = 1,
    first_visible: list[int] | None = None,
) -> PagedCache:
    """Random contexts in shuffled, non-contiguous physical blocks (block 0 reserved as the
    padding target). Tables get `extra_table_columns` padding columns beyond the longest
    sequence, so every row has padding entries a kernel could wrongly follow.

    `first_visible[i]`: sequence i keeps real tokens only from that position on (what a
    sliding-window layer's queries can still read); the slots before are NaN and the table
    entries of blocks wholly before it point at block 0, as for blocks the scheduler freed."""
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = 1 + sum(blocks_per_seq) + 2  # + blocks nobody owns
    physical = torch.randperm(num_blocks - 1, generator=generator) + 1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)
    block_tables = torch.zeros(
        len(seq_lens), max(blocks_per_seq) + extra_table_columns, dtype=torch.int32
    )
    taken = 0
    for seq, seq_len in enumerate(seq_lens):
        table = physical[taken : taken + blocks_per_seq[seq]]
        taken += blocks_per_seq[seq]
        block_tables[seq, : len(table)] = table.to(torch.int32)
        positions = torch.arange(seq_len)
        blocks, offsets = table[positions // block_size], positions % block_size
        kv_shape = (seq_len, num_kv_heads, head_dim)
        key_cache[blocks, offsets] = torch.randn(kv_shape, generator=generator).to(dtype)
        value_cache[blocks, offsets] = torch.randn(kv_shape, generator=generator).to(dtype)
        if first_visible is not None and first_visible[seq] > 0:
            dropped = positions[: first_visible[seq]]
            key_cache[blocks[dropped], offsets[dropped]] = float("nan")
            value_cache[blocks[dropped], offsets[dropped]] = float("nan")
            block_tables[seq, : first_visible[seq] // block_size] = 0
    return PagedCache(
        key_cache,
        value_cache,
        torch.nan_to_num(key_cache, nan=GARBAGE),
        torch.nan_to_num(value_cache, nan=-GARBAGE),
        block_tables,
        torch.tensor(seq_lens, dtype=torch.int32),
    )
