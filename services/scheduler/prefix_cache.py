"""Automatic prefix caching: the identity of a full KV block, and what the cache reports.

A full block's hash is a chain: sha256 over (the previous block's hash, the block's token
ids, extra keys such as the model name). Two requests whose first k blocks hold the same
tokens therefore share the first k hashes, and equal hashes mean equal K/V (same model,
same tokens, same positions), so a cached block can stand in for computing it. The
encoding is MessagePack of a tuple (deterministic for ints, bytes and strings) and the hash
is sha256, not Python's `hash()`: the values are the same in every process and every run,
which is what lets them be mirrored to Redis and compared across replicas.

Only *full* blocks get a hash: a partial block's tokens are not final. Hashes depend on
token ids alone, never on where the K/V lives, so a request keeps its hashes across
preemption and computes one more each time a block's worth of tokens is known.

The block pool keeps the hash -> block map and the LRU of cached blocks, the KV cache
manager decides which blocks are registered and looked up, and counts the lookups in
`shared.messages.PrefixCacheStats` (also sent in the admin snapshot); this module holds
what depends on none of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import msgspec

BlockHash = bytes  # a sha256 digest, 32 bytes

_encoder = msgspec.msgpack.Encoder()


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple[str, ...] = ()
) -> BlockHash:
    """The hash of one full block: `parent_hash` is the previous block's (None for the
    first block of a sequence)."""
    return hashlib.sha256(_encoder.encode((parent_hash, list(token_ids), extra_keys))).digest()


def extend_block_hashes(
    block_hashes: list[BlockHash],
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: tuple[str, ...] = (),
) -> None:
    """Append the hashes of the full blocks of `token_ids` that `block_hashes` (the hashes
    of its leading blocks) does not have yet. Incremental: a call costs nothing until
    another block's worth of tokens is there."""
    num_full_blocks = len(token_ids) // block_size
    for index in range(len(block_hashes), num_full_blocks):
        parent = block_hashes[-1] if block_hashes else None
        start = index * block_size
        block_hashes.append(hash_block_tokens(parent, token_ids[start : start + block_size], extra_keys))


class PrefixCacheEvent(NamedTuple):
    """A change to the set of prefixes this replica holds, for the Redis mirror.

    `stored`: True when the block was cached or just reused by a hit (its last use is
    now), False when it was evicted and its K/V overwritten."""

    block_hash: BlockHash
    stored: bool
