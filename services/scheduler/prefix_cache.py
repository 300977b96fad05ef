"""Automatic prefix caching: the identity of a full KV block, and what the cache reports.

A full block's hash is a chain over its tokens and every block before it; the function
lives in `shared/block_hashing.py` because the gateway routes by the very same hashes
(it is re-exported here for the scheduler's modules).

Only *full* blocks get a hash: a partial block's tokens are not final. Hashes depend on
token ids alone, never on where the K/V lives, so a request keeps its hashes across
preemption and computes one more each time a block's worth of tokens is known.

The block pool keeps the hash -> block map and the LRU of cached blocks, the KV cache
manager decides which blocks are registered and looked up, and counts the lookups in
`shared.messages.PrefixCacheStats` (also sent in the admin snapshot); this module holds
what depends on none of them.
"""

from __future__ import annotations

from typing import NamedTuple

from pagedserve.shared.block_hashing import BlockHash, extend_block_hashes, hash_block_tokens

__all__ = ["BlockHash", "PrefixCacheEvent", "extend_block_hashes", "hash_block_tokens"]


class PrefixCacheEvent(NamedTuple):
    """A change to the set of prefixes this replica holds, for the Redis mirror.

    `stored`: True when the block was cached or just reused by a hit (its last use is
    now), False when it was evicted and its K/V overwritten."""

    block_hash: BlockHash
    stored: bool
