"""KV groups: layers that share an attention window share block tables (vLLM's hybrid KV
cache manager), and the pure rules of which blocks a sliding-window group still needs.

A model whose layers all attend to every earlier token (every Llama today) has one group,
global. Gemma 2/3 interleave sliding-window layers (a query at position p sees keys at
p - window < k <= p, Hugging Face's rule) with global ones: each kind gets groups of its
own, so a request holds one block table per group. A global group's table holds every
block of the request's tokens; a sliding group's table keeps only the blocks a query of
the request can still read: the blocks wholly before the window of the next token to be
computed go back to the pool (`DROPPED` in the table), and a request admitted after a long
cached prefix, or recomputed after preemption, never allocates them at all.

Which layer is in which group, and how the executor lays groups over its caches so that a
block given back by any group serves any other: `shared/kv_group_layout.py` (the executor
reads it too).

Prefix caching hashes the same token blocks for every group (group 0 under the plain
hash, which is what the gateway routes by; group g > 0 under the hash with g appended),
and a hit must be held by every group: all of a global group's blocks before the hit's
end, and the blocks of a sliding group's window of the first token computed after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.services.scheduler.prefix_cache import BlockHash
from pagedserve.shared.kv_group_layout import KVGroupLayout

__all__ = ["DROPPED", "CachedPrefix", "KVGroupLayout", "first_needed_block", "group_block_hash"]

# A sliding group's table entry for a block it gave back or never allocated. Only the
# scheduler sees it: the executor gets block 0 there, which no kernel reads (kernels skip
# every block before a query's window).
DROPPED = -1


def first_needed_block(num_computed_tokens: int, window: int | None, block_size: int) -> int:
    """The first block a group must hold when the next token computed sits at position
    `num_computed_tokens`: 0 for a global group; for a sliding one, the block of the first
    key that token's window reaches (later tokens reach only later keys)."""
    if window is None:
        return 0
    return max(0, num_computed_tokens - window + 1) // block_size


def group_block_hash(block_hash: BlockHash, group: int) -> BlockHash:
    """The prefix-cache key of a block of group `group`: each group holds its own copy of
    the same tokens' K/V (other layers), so each needs its own key; group 0 keeps the plain
    hash (the one the gateway routes by)."""
    return block_hash if group == 0 else block_hash + group.to_bytes(2, "little")


@dataclass
class CachedPrefix:
    """A prefix-cache hit as every group holds it: `num_blocks` whole blocks of tokens, and
    per group the table up to there (DROPPED where a sliding group needs nothing)."""

    num_blocks: int
    block_tables: list[list[int]]

    def __len__(self) -> int:
        """Blocks of tokens the hit covers (the scheduler counts hit tokens by this)."""
        return self.num_blocks

    def held_block_ids(self) -> list[int]:
        return [b for table in self.block_tables for b in table if b != DROPPED]
