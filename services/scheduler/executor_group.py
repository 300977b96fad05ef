"""What a scheduler sends its steps to: one executor process, or the T ranks of a
tensor-parallel group, and how a group comes together from its ranks' announcements.

Every rank gets every step (encoded once); rank 0's result is the one read, and the group
is lost as soon as any rank is. A group serves once all its ranks have announced
themselves, sized by the smallest capacity any reports (a block id must exist on every
rank). Plain data and rules: the service (`service.py`) owns the sockets and the clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from pagedserve.services.scheduler.status import executor_status
from pagedserve.shared.messages import ExecutorReady, ExecutorStatus


@dataclass
class Rank:
    identity: bytes  # its ROUTER identity
    ready: ExecutorReady  # as this rank announced itself
    last_heard: float  # monotonic


@dataclass
class ExecutorGroup:
    """One executor (a group of one rank) or a tensor-parallel group, rank 0 first."""

    ranks: list[Rank]
    ready: ExecutorReady  # rank 0's, carrying the smallest capacity of any rank

    @classmethod
    def single(cls, identity: bytes, ready: ExecutorReady, now: float) -> ExecutorGroup:
        return cls([Rank(identity, ready, now)], ready)

    @property
    def identity(self) -> bytes:
        """Rank 0's: the one whose results are read."""
        return self.ranks[0].identity

    @property
    def last_heard(self) -> float:
        """Of the rank heard from least recently: losing any rank loses the group."""
        return min(rank.last_heard for rank in self.ranks)

    def rank_of(self, identity: bytes) -> Rank | None:
        return next((rank for rank in self.ranks if rank.identity == identity), None)

    def statuses(self, now: float, heartbeat_timeout_s: float) -> list[ExecutorStatus]:
        """One per rank, for the admin page and the health counts."""
        return [
            executor_status(
                rank.ready.executor_id, rank.ready.device, rank.ready.num_blocks, rank.ready.model,
                now - rank.last_heard, heartbeat_timeout_s,
                rank.ready.group_id, rank.ready.rank, rank.ready.world_size,
            )
            for rank in self.ranks
        ]


class GroupAssembly:
    """Tensor-parallel groups whose ranks are announcing themselves: group id -> rank -> it."""

    def __init__(self) -> None:
        self._groups: dict[str, dict[int, Rank]] = {}

    def add(self, identity: bytes, ready: ExecutorReady, now: float) -> ExecutorGroup | None:
        """Record a rank's announcement; the whole group once its last rank has come."""
        ranks = self._groups.setdefault(ready.group_id, {})
        if any(r.ready.world_size != ready.world_size for r in ranks.values()):
            ranks.clear()  # left over from an earlier start of the group with another size
        ranks[ready.rank] = Rank(identity, ready, now)
        if len(ranks) < ready.world_size:
            return None
        del self._groups[ready.group_id]
        ordered = [ranks[r] for r in range(ready.world_size)]
        group_ready = msgspec.structs.replace(
            ordered[0].ready,
            executor_id=ready.group_id,
            num_blocks=min(r.ready.num_blocks for r in ordered),
            num_swap_blocks=min(r.ready.num_swap_blocks for r in ordered),
        )
        return ExecutorGroup(ordered, group_ready)
