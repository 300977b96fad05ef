"""What one step's attention needs to find each token's K/V in the paged cache.

The flattened batch is ordered decodes first (one query token each, served by the decode
kernel) then prefill chunks (varlen, served by the prefill/extend kernel).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [num_tokens]: where each new token's K/V goes
    num_decode_tokens: int
    # Decode part: one row per decoding sequence.
    decode_block_tables: torch.Tensor  # int32 [num_decodes, max_blocks]
    decode_seq_lens: torch.Tensor  # int32 [num_decodes]
    max_decode_seq_len: int
    # Prefill part: query_start_loc is relative to the first prefill token.
    prefill_block_tables: torch.Tensor  # int32 [num_prefills, max_blocks]
    prefill_query_start_loc: torch.Tensor  # int32 [num_prefills + 1]
    prefill_seq_lens: torch.Tensor  # int32 [num_prefills]
    max_prefill_query_len: int
    max_prefill_seq_len: int
    # Several KV groups (sliding-window layers beside global ones): each layer's group, and
    # the metadata of groups 1.. (this object is group 0's); empty with one group.
    group_of_layer: tuple[int, ...] = ()
    groups: list[AttentionMetadata] = field(default_factory=list)

    def for_layer(self, layer_index: int) -> AttentionMetadata:
        """The slots and block tables layer `layer_index` reads and writes: its KV group's."""
        if not self.groups:
            return self
        group = self.group_of_layer[layer_index]
        return self if group == 0 else self.groups[group - 1]

    @property
    def num_prefills(self) -> int:
        return int(self.prefill_seq_lens.shape[0])
