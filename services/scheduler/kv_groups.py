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

Memory: the executor lays the layers of every group over the same per-layer caches (layer
j of each group shares cache tensor j, `services/executor/kv_cache.py`), so one block id
costs `layers_per_group` layers of K/V whichever group holds it, and a block a sliding
group gives back is a block any group can take. For that the groups are equally sized:
each kind's layers are cut into groups of the greatest common divisor of the kinds' layer
counts (Gemma 3 270M: 15 sliding and 3 global layers -> 6 groups of 3).

Prefix caching hashes the same token blocks for every group (group 0 under the plain
hash, which is what the gateway routes by; group g > 0 under the hash with g appended),
and a hit must be held by every group: all of a global group's blocks before the hit's
end, and the blocks of a sliding group's window of the first token computed after it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pagedserve.services.scheduler.prefix_cache import BlockHash

# A sliding group's table entry for a block it gave back or never allocated. Only the
# scheduler sees it: the executor gets block 0 there, which no kernel reads (kernels skip
# every block before a query's window).
DROPPED = -1


@dataclass(frozen=True)
class KVGroupLayout:
    """Which KV group each layer belongs to, and each group's window (None: global)."""

    group_of_layer: tuple[int, ...]
    windows: tuple[int | None, ...]  # per group

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def layers_per_group(self) -> int:
        return len(self.group_of_layer) // len(self.windows)

    @property
    def slot_of_layer(self) -> tuple[int, ...]:
        """The index of each layer within its group: layers with the same index share a
        cache tensor."""
        seen = [0] * self.num_groups
        slots = []
        for group in self.group_of_layer:
            slots.append(seen[group])
            seen[group] += 1
        return tuple(slots)

    @classmethod
    def for_windows(cls, layer_windows: Sequence[int | None]) -> KVGroupLayout:
        """Groups for layers with these windows (None: global), equally sized. Global
        layers come first, so group 0 is global where any layer is."""
        if not layer_windows:
            raise ValueError("a model has at least one layer")
        if any(w is not None and w < 1 for w in layer_windows):
            raise ValueError(f"a sliding window holds at least 1 token: {list(layer_windows)}")
        kinds = sorted(set(layer_windows), key=lambda w: (w is not None, w or 0))
        counts = {kind: sum(1 for w in layer_windows if w == kind) for kind in kinds}
        size = math.gcd(*counts.values())
        group_of_layer: list[int] = []
        windows: list[int | None] = []
        first_group = {}
        for kind in kinds:
            first_group[kind] = len(windows)
            windows += [kind] * (counts[kind] // size)
        seen = dict.fromkeys(kinds, 0)
        for w in layer_windows:
            group_of_layer.append(first_group[w] + seen[w] // size)
            seen[w] += 1
        return cls(tuple(group_of_layer), tuple(windows))


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
