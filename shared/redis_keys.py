"""The Redis keys schedulers write and gateways read, and the shape of a replica's record:
one definition for both ends.

- `replicas`: a set of every replica id that ever registered (gateways discover replicas
  here; a replica whose heartbeat is stale is skipped, and forgotten by gateways once
  long dead, but its id stays: it may come back).
- `replica:{id}`: a hash, the replica's registration and load (`ReplicaRecord`), rewritten
  by its scheduler about once a second (`heartbeat_at` says when).
- `prefix:{id}`: a sorted set, one member per full KV block the replica has cached (the
  block hash in hex, `shared/block_hashing.py`), scored by its last use.
"""

from __future__ import annotations

import msgspec

REPLICAS_KEY = "replicas"


def replica_key(replica_id: str) -> str:
    return f"replica:{replica_id}"


def prefix_cache_key(replica_id: str) -> str:
    return f"prefix:{replica_id}"


class ReplicaRecord(msgspec.Struct, forbid_unknown_fields=False):
    """`replica:{id}` as a gateway reads it (Redis hashes hold strings: `from_hash`
    converts). Fields a scheduler has not written yet keep their defaults."""

    replica_id: str
    gateway_address: str = ""  # where gateways connect (the scheduler's advertised ROUTER)
    heartbeat_at: float = 0.0  # wall clock of the latest report
    model: str = ""
    block_size: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    num_executors_alive: int = 0

    @property
    def load(self) -> int:
        """Requests running or queued: what a new request waits behind."""
        return self.num_running + self.num_waiting

    @classmethod
    def from_hash(cls, replica_id: str, fields: dict[bytes, bytes]) -> ReplicaRecord:
        decoded = {key.decode(): value.decode() for key, value in fields.items()}
        converted: dict[str, str | int | float] = {}
        for name, kind in (("gateway_address", str), ("heartbeat_at", float), ("model", str), ("block_size", int),
                           ("num_running", int), ("num_waiting", int), ("num_free_blocks", int), ("num_blocks", int),
                           ("num_executors_alive", int)):
            if name in decoded:
                try:
                    converted[name] = kind(float(decoded[name])) if kind is int else kind(decoded[name])
                except ValueError:
                    continue  # a malformed field keeps its default
        return cls(replica_id, **converted)  # type: ignore[arg-type]
