"""A fake paged KV cache for the scheduler tests' fake executors: the token id whose K/V
each slot (block * block_size + offset) holds, in the device pool and the CPU swap pool.

It is how those tests catch a block reused while somebody still reads it, a prefix-cache
hit on the wrong block, or a wrong copy-on-write, swap or fork: a request checks, when
it samples, that its block table holds exactly its tokens."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FakeKVCache:
    block_size: int
    slots: dict[int, int] = field(default_factory=dict)
    swap_slots: dict[int, int] = field(default_factory=dict)

    def write(self, block_ids: list[int], token_ids: list[int], start: int, end: int) -> None:
        """Store token_ids[start:end] at their positions through the block table."""
        for position in range(start, end):
            self.slots[self._slot(block_ids, position)] = token_ids[position]

    def read(self, block_ids: list[int], length: int) -> list[int | None]:
        """What attention would read for positions 0 .. length-1 (None: never written)."""
        return [self.slots.get(self._slot(block_ids, position)) for position in range(length)]

    def apply_copies(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]], block_copies: list[tuple[int, int]]) -> None:
        """The real executor's order: every swap-out, every swap-in, then copy-on-write."""
        self._copy(self.slots, self.swap_slots, swap_out)
        self._copy(self.swap_slots, self.slots, swap_in)
        self._copy(self.slots, self.slots, block_copies)

    def _slot(self, block_ids: list[int], position: int) -> int:
        return block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def _copy(self, source: dict[int, int], destination: dict[int, int], pairs: list[tuple[int, int]]) -> None:
        for src, dst in pairs:
            for offset in range(self.block_size):
                token = source.get(src * self.block_size + offset)
                if token is None:
                    destination.pop(dst * self.block_size + offset, None)
                else:
                    destination[dst * self.block_size + offset] = token
