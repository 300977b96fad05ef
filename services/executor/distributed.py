"""The process group of one replica's tensor-parallel ranks: set-up, the two collectives
the model and the sampler need, teardown.

Every rank of a replica is its own executor process. They meet through
`torch.distributed` (gloo on CPU, NCCL on CUDA), at a `tcp://host:port` rendezvous or,
without one, the usual torch env vars (`MASTER_ADDR`, `MASTER_PORT`): never a home-made
collective. The group's timeout bounds every collective, so a rank that dies or hangs
makes the others fail their step within `timeout_s` instead of waiting forever; the
executor then exits and its group is restarted as a whole (`pagedserve up`).

Who samples: rank 0 alone. The other ranks compute no logits; rank 0 broadcasts the
token ids it sampled and they append them to their request mirrors. All-reduced hidden
states are bitwise equal on every rank, so identical samplers would agree too, but only
as long as every sampler input (seeded generators, grammar matchers, penalties) stays
identical on every rank forever: one broadcast of a few ints a step is simpler to prove.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class TensorParallelGroup:
    """This process's place in its replica's group of ranks. With `world_size` 1 (no group)
    every collective is a no-op, so the model code is the same for T = 1 and T > 1."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device or torch.device("cpu")
        # Time spent inside all-reduces (gloo's are synchronous on CPU, so wall time is
        # their cost); for benchmarks/tensor_parallel.py.
        self.num_all_reduces = 0
        self.all_reduce_s = 0.0
        self._threads_before: int | None = None  # restored by close (an engine's process lives on)

    @property
    def is_driver(self) -> bool:
        """Rank 0: computes the logits, samples, answers the scheduler."""
        return self.rank == 0

    @classmethod
    def join(
        cls, rank: int, world_size: int, init_address: str | None, device: torch.device, timeout_s: float
    ) -> TensorParallelGroup:
        """Join (and, with rank 0, host) the rendezvous; returns once all ranks are in.
        `init_address` None: torch's env:// (MASTER_ADDR, MASTER_PORT)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a group of {world_size} ranks (0 .. {world_size - 1})")
        if world_size == 1:
            return cls(0, 1, device)
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group: one replica's rank per process")
        backend = "nccl" if device.type == "cuda" else "gloo"
        threads_before = torch.get_num_threads()
        if device.type == "cpu":
            # Ranks on one host share its cores: T ranks of all-cores threads each would
            # oversubscribe them and wait on each other at every all-reduce.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        log.info("rank %d/%d: joining the %s group at %s", rank, world_size, backend, init_address or "env://")
        dist.init_process_group(
            backend=backend,
            init_method=init_address or "env://",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        group = cls(rank, world_size, device)
        group._threads_before = threads_before
        return group

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place (a row-parallel layer's partial products)."""
        if self.world_size == 1:
            return tensor
        started = time.perf_counter()
        dist.all_reduce(tensor)
        self.all_reduce_s += time.perf_counter() - started
        self.num_all_reduces += 1
        return tensor

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's `value` (KV blocks that fit: a block id must exist
        on every rank)."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    def broadcast_token_ids(self, token_ids: list[int]) -> list[int]:
        """Rank 0's sampled token ids to every rank. Every rank knows how many (the step
        says which requests sample), so only the ids cross: rank 0 passes its list, the
        others a list of that length, filled on return."""
        if self.world_size == 1 or not token_ids:
            return token_ids
        tensor = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, src=0)
        return tensor.tolist()
