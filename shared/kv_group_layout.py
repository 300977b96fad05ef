"""Which KV group each layer of a model belongs to: layers that share an attention window
share block tables (vLLM's hybrid KV cache manager; the scheduler's side is
`services/scheduler/kv_groups.py`). Read by the scheduler (one block table per group) and
the executor (one slot mapping and table per group, caches laid out per group).

Memory: the executor lays the layers of every group over the same per-layer caches (layer
j of each group shares cache tensor j, `services/executor/kv_cache.py`), so one block id
costs `layers_per_group` layers of K/V whichever group holds it, and a block a sliding
group gives back is a block any group can take. For that the groups are equally sized:
each kind's layers are cut into groups of the greatest common divisor of the kinds' layer
counts (Gemma 3 270M: 15 sliding and 3 global layers -> 6 groups of 3). A model without
windows has one group of all its layers: the layout every model had before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


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
