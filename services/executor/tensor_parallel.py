"""The shard plan: which slice of every weight, and which heads, a tensor-parallel rank holds.

Megatron-style: q/k/v and gate/up are column-parallel (each rank holds some output rows:
its attention heads, its share of the MLP's intermediate columns), o and down are
row-parallel (the matching input columns), so a rank's attention and MLP run start to
finish on its own slice and only o's and down's outputs need a sum over ranks (one
all-reduce each, in `decoder.py`). Norms, embeddings and the LM head are replicated.

Heads: rank r holds query heads [r * H/T, (r+1) * H/T). KV heads are split the same way
when T divides their number K; when T exceeds K (T a multiple of K) each KV head is
replicated on T/K consecutive ranks, which are exactly the ranks whose query heads use it.
Each rank's paged KV cache holds its own KV heads under the same block ids, so the
scheduler's block tables know nothing of ranks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pagedserve.services.executor.model_config import ModelConfig


def valid_tensor_parallel_sizes(num_heads: int, num_kv_heads: int, intermediate_size: int) -> list[int]:
    """Every T the model splits into: T divides the query heads and the MLP width, and
    either divides the KV heads or is a multiple of them."""
    return [
        size
        for size in range(1, num_heads + 1)
        if num_heads % size == 0
        and intermediate_size % size == 0
        and (num_kv_heads % size == 0 or size % num_kv_heads == 0)
    ]


def _either(sizes: list[int]) -> str:
    """[1, 2, 4] -> "1, 2 or 4"."""
    names = [str(size) for size in sizes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    world_size: int
    head_dim: int
    num_heads_per_rank: int
    num_kv_heads_per_rank: int
    first_kv_head: int
    intermediate_per_rank: int

    @classmethod
    def for_model(cls, config: ModelConfig, rank: int = 0, world_size: int = 1) -> ShardPlan:
        """Refuses, naming the numbers and the sizes that would work, a model whose heads
        or MLP width do not split into `world_size` ranks."""
        valid = valid_tensor_parallel_sizes(config.num_heads, config.num_kv_heads, config.intermediate_size)
        if world_size not in valid:
            raise ValueError(
                f"tensor_parallel_size {world_size} does not split this model: it has {config.num_heads} attention "
                f"heads, {config.num_kv_heads} KV heads and an MLP width of {config.intermediate_size:,} (T must divide "
                f"the attention heads and the MLP width, and divide the KV heads or be a multiple of them); "
                f"tensor_parallel_size {_either(valid)} would work"
            )
        num_kv_heads_per_rank = max(1, config.num_kv_heads // world_size)
        if config.num_kv_heads >= world_size:
            first_kv_head = rank * num_kv_heads_per_rank
        else:  # each KV head replicated on world_size / num_kv_heads consecutive ranks
            first_kv_head = rank // (world_size // config.num_kv_heads)
        return cls(
            rank=rank,
            world_size=world_size,
            head_dim=config.head_dim,
            num_heads_per_rank=config.num_heads // world_size,
            num_kv_heads_per_rank=num_kv_heads_per_rank,
            first_kv_head=first_kv_head,
            intermediate_per_rank=config.intermediate_size // world_size,
        )

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The model as this rank sees it: its heads, KV heads and MLP columns (the model
        code and the KV cache read these numbers and need nothing else about ranks)."""
        return dataclasses.replace(
            config,
            num_heads=self.num_heads_per_rank,
            num_kv_heads=self.num_kv_heads_per_rank,
            intermediate_size=self.intermediate_per_rank,
        )

    def slice_of(self, hf_name: str) -> tuple[int, int, int] | None:
        """(dim, start, length) of this rank's slice of an HF-named weight or bias; None for
        a replicated one (norms, embeddings, LM head) and for everything when T = 1."""
        if self.world_size == 1:
            return None
        parts = hf_name.split(".")
        if len(parts) < 2:
            return None
        module, kind = parts[-2], parts[-1]
        q_rows = (self.rank * self.num_heads_per_rank * self.head_dim, self.num_heads_per_rank * self.head_dim)
        kv_rows = (self.first_kv_head * self.head_dim, self.num_kv_heads_per_rank * self.head_dim)
        mlp_rows = (self.rank * self.intermediate_per_rank, self.intermediate_per_rank)
        if module == "q_proj":
            return (0, *q_rows)
        if module in ("k_proj", "v_proj"):
            return (0, *kv_rows)
        if module in ("gate_proj", "up_proj"):
            return (0, *mlp_rows)
        if kind == "weight" and module == "o_proj":
            return (1, *q_rows)
        if kind == "weight" and module == "down_proj":
            return (1, *mlp_rows)
        return None  # o/down biases (none in these models) would be added once, after the sum
