"""The executor's persistent batch: the block table of every mirrored request as a row of
one preallocated int32 array, updated in place by each step's deltas, and the reused
buffers each step's flattened model inputs are computed into (vLLM v1's `InputBatch`,
reduced to what the paged kernels read).

Rows: a request takes a free row when it arrives (a `NewRequestData`, or a fork) and frees
it when dropped. A row holds the request's whole block table; its columns past the last
block are 0 (a freed row is zeroed), so every entry is a valid block id, which is all the
kernels ask of padding (`kernels/torch_ops.py`). The arrays grow (doubling) when more
requests, longer tables or more tokens than they were sized for arrive; nothing shrinks.

KV groups (sliding-window layers beside global ones, `services/scheduler/kv_groups.py`): a
request has a table per group, each a row of that group's array; a step gets a slot
mapping and decode/prefill tables per group (`AttentionMetadata.for_layer` picks a layer's).
With one group (every model without windows) nothing of this runs.

A step's inputs are computed for the whole batch at once with numpy, into host buffers
that, on CPU, are the very tensors the model reads; on an accelerator each buffer has a
device twin, which gets the step's prefix copied into it. Their shapes and dtypes are
`AttentionMetadata`'s, so the kernels see what a freshly built batch would give them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from pagedserve.services.executor.attention_metadata import AttentionMetadata
from pagedserve.services.executor.request_state import ScheduledRequest


@dataclass
class StepInputs:
    """What the model takes for one step (tensors on the model's device)."""

    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    attn_metadata: AttentionMetadata
    # int64 [num_requests], host: one past each request's last token in the flattened
    # batch. A view of a reused buffer: valid until the next step is prepared.
    query_end_loc: np.ndarray


class _StagedBuffer:
    """A flat host array written with numpy, and the tensor the model reads: that very
    memory on CPU; elsewhere a device twin that gets the used prefix copied in, so neither
    side is allocated per step."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        host = torch.zeros(size, dtype=dtype, pin_memory=device.type == "cuda")
        self.array: np.ndarray = host.numpy()
        self._device_twin = None if device.type == "cpu" else torch.zeros(size, dtype=dtype, device=device)

    def to_device(self, *shape: int) -> torch.Tensor:
        """The first prod(shape) elements, shaped, on the device. A blocking copy, as a
        fresh tensor's `.to(device)` was: the host side is rewritten by the next step."""
        host = torch.from_numpy(self.array[: math.prod(shape)].reshape(shape))
        if self._device_twin is None:
            return host
        on_device = self._device_twin[: host.numel()].view(shape)
        on_device.copy_(host)
        return on_device


class InputBatch:
    """The rows of the mirrored requests, by request id, and one step's input buffers."""

    def __init__(
        self, num_rows: int, max_blocks_per_row: int, max_num_tokens: int, block_size: int, device: torch.device,
        group_of_layer: tuple[int, ...] = (),
    ) -> None:
        """`group_of_layer`: each layer's KV group where there are several (else empty)."""
        self.block_size = block_size
        self.device = device
        self.group_of_layer = group_of_layer
        self.num_groups = max(group_of_layer, default=0) + 1
        self._row_of: dict[str, int] = {}
        self.block_table = np.zeros((0, max_blocks_per_row), dtype=np.int32)
        self.num_blocks = np.zeros(0, dtype=np.int32)  # per row: how many of its columns are the table
        # KV groups 1..: their tables and counts, as block_table and num_blocks are group 0's.
        self.group_block_tables: list[np.ndarray] = [self.block_table] * (self.num_groups - 1)
        self.group_num_blocks: list[np.ndarray] = [self.num_blocks] * (self.num_groups - 1)
        self._free_rows: list[int] = []  # a stack: any free row serves
        self._resize_rows(max(1, num_rows), max(1, max_blocks_per_row))
        self._resize_tokens(max(1, max_num_tokens))

    @property
    def num_requests(self) -> int:
        return len(self._row_of)

    def block_ids(self, request_id: str) -> list[int]:
        """The table in a request's row, as a list (to inspect it: kernels read the array)."""
        row = self._row_of[request_id]
        return self.block_table[row, : self.num_blocks[row]].tolist()

    # -- rows ------------------------------------------------------------------------------

    def group_block_ids(self, request_id: str, group: int) -> list[int]:
        """The table of KV group `group` (>= 1) in a request's row, as a list."""
        row = self._row_of[request_id]
        return self.group_block_tables[group - 1][row, : self.group_num_blocks[group - 1][row]].tolist()

    def add_request(
        self, request_id: str, block_ids: Sequence[int], group_block_ids: Sequence[Sequence[int]] = ()
    ) -> None:
        """Give a request a row holding `block_ids` (and the tables of KV groups 1..,
        `group_block_ids`), rewriting its row if it has one."""
        if len(group_block_ids) != self.num_groups - 1:
            raise ValueError(
                f"request {request_id}: {1 + len(group_block_ids)} block tables for {self.num_groups} KV groups"
            )
        row = self._row_of.get(request_id)
        if row is None:
            if not self._free_rows:
                self._resize_rows(2 * len(self.num_blocks), self.block_table.shape[1])
            row = self._row_of[request_id] = self._free_rows.pop()
        self._clear_row(row)
        self._write_blocks(row, 0, block_ids)
        for group, table in enumerate(group_block_ids, start=1):
            self._write_blocks(row, 0, table, group)

    def append_block_ids(
        self, request_id: str, new_block_ids: Sequence[int], num_replaced_blocks: int = 0, group: int = 0
    ) -> None:
        """Apply a `CachedRequestData`'s table delta (of KV group `group`): drop
        `num_replaced_blocks` from the end (copy-on-write: the first new id is the private
        copy), append the new ids."""
        if not new_block_ids and not num_replaced_blocks:
            return
        row = self._row_of[request_id]
        table, num_blocks = self._table(group)
        num_kept = int(num_blocks[row]) - num_replaced_blocks
        table[row, num_kept : num_blocks[row]] = 0
        self._write_blocks(row, num_kept, new_block_ids, group)

    def remove_request(self, request_id: str) -> None:
        row = self._row_of.pop(request_id)
        self._clear_row(row)
        self._free_rows.append(row)

    def clear(self) -> None:
        """Free every row."""
        for request_id in list(self._row_of):
            self.remove_request(request_id)

    def _table(self, group: int) -> tuple[np.ndarray, np.ndarray]:
        if group == 0:
            return self.block_table, self.num_blocks
        return self.group_block_tables[group - 1], self.group_num_blocks[group - 1]

    def _write_blocks(self, row: int, start: int, block_ids: Sequence[int], group: int = 0) -> None:
        end = start + len(block_ids)
        if end > self.block_table.shape[1]:
            self._resize_rows(len(self.num_blocks), max(end, 2 * self.block_table.shape[1]))
        table, num_blocks = self._table(group)
        table[row, start:end] = block_ids
        num_blocks[row] = end

    def _clear_row(self, row: int) -> None:
        for group in range(self.num_groups):
            table, num_blocks = self._table(group)
            table[row, : num_blocks[row]] = 0
            num_blocks[row] = 0

    # -- one step's inputs -----------------------------------------------------------------

    def prepare(self, scheduled: Sequence[ScheduledRequest]) -> StepInputs:
        """The flattened varlen batch of `scheduled`, which lists its decodes (one new
        token each) first: the decode kernel serves them, the prefill kernel the rest."""
        n = len(scheduled)
        nd = self._write_scheduled(scheduled)  # the decodes: requests 0 .. nd - 1
        num_prefills = n - nd
        rows, num_new = self._rows[:n], self._num_new[:n]
        query_start = self._query_start[: n + 1]
        num_tokens = int(query_start[n])
        seq_lens = self._seq_lens.array[:n]
        np.add(self._num_computed[:n], num_new, out=seq_lens)
        num_used_blocks = self._num_used_blocks[:n]
        np.floor_divide(seq_lens + (self.block_size - 1), self.block_size, out=num_used_blocks)
        self._check_blocks_cover(scheduled, rows, num_used_blocks)
        self._write_positions(n, num_tokens)
        self._write_slots(n, num_tokens, self.block_table, self._slot_mapping)

        # Each part's table: an index-select of its requests' rows, as wide as the
        # longest of them needs.
        max_decode_seq_len = int(seq_lens[:nd].max()) if nd else 0
        max_prefill_seq_len = int(seq_lens[nd:].max()) if num_prefills else 0
        decode_width = -(-max_decode_seq_len // self.block_size)
        prefill_width = -(-max_prefill_seq_len // self.block_size)
        decode_tables = self._decode_tables.array[: nd * decode_width].reshape(nd, decode_width)
        decode_tables[:] = self.block_table[rows[:nd], :decode_width]
        prefill_tables = self._prefill_tables.array[: num_prefills * prefill_width]
        prefill_tables = prefill_tables.reshape(num_prefills, prefill_width)
        prefill_tables[:] = self.block_table[rows[nd:], :prefill_width]
        # The prefill kernel's query_start_loc counts from the first prefill token.
        np.subtract(query_start[nd:], nd, out=self._prefill_query_start.array[: num_prefills + 1])

        seq_lens_on_device = self._seq_lens.to_device(n)
        meta = AttentionMetadata(
            slot_mapping=self._slot_mapping.to_device(num_tokens),
            num_decode_tokens=nd,
            decode_block_tables=self._decode_tables.to_device(nd, decode_width),
            decode_seq_lens=seq_lens_on_device[:nd],
            max_decode_seq_len=max_decode_seq_len,
            prefill_block_tables=self._prefill_tables.to_device(num_prefills, prefill_width),
            prefill_query_start_loc=self._prefill_query_start.to_device(num_prefills + 1),
            prefill_seq_lens=seq_lens_on_device[nd:],
            max_prefill_query_len=int(num_new[nd:].max()) if num_prefills else 0,
            max_prefill_seq_len=max_prefill_seq_len,
        )
        if self.num_groups > 1:
            meta.group_of_layer = self.group_of_layer
            meta.groups = [
                self._group_metadata(group, meta, n, nd, num_tokens, decode_width, prefill_width)
                for group in range(1, self.num_groups)
            ]
        return StepInputs(
            input_ids=self._input_ids.to_device(num_tokens),
            positions=self._positions.to_device(num_tokens),
            attn_metadata=meta,
            query_end_loc=query_start[1:],
        )

    def _group_metadata(
        self, group: int, meta: AttentionMetadata, n: int, nd: int, num_tokens: int, decode_width: int,
        prefill_width: int,
    ) -> AttentionMetadata:
        """KV group `group`'s slots and tables; lengths and query offsets are group 0's."""
        rows = self._rows[:n]
        table, num_blocks = self._table(group)
        short = num_blocks[rows] < self._num_used_blocks[:n]
        if short.any():
            raise ValueError(f"KV group {group}: a block table is shorter than its step needs ({int(short.argmax())})")
        slot_buffer, decode_buffer, prefill_buffer = self._group_buffers[group - 1]
        self._write_slots(n, num_tokens, table, slot_buffer)
        decode_buffer.array[: nd * decode_width].reshape(nd, decode_width)[:] = table[rows[:nd], :decode_width]
        prefill_tables = prefill_buffer.array[: (n - nd) * prefill_width].reshape(n - nd, prefill_width)
        prefill_tables[:] = table[rows[nd:], :prefill_width]
        return replace(
            meta,
            slot_mapping=slot_buffer.to_device(num_tokens),
            decode_block_tables=decode_buffer.to_device(nd, decode_width),
            prefill_block_tables=prefill_buffer.to_device(n - nd, prefill_width),
            group_of_layer=(),
            groups=[],
        )

    def _write_scheduled(self, scheduled: Sequence[ScheduledRequest]) -> int:
        """Write each request's row, counts, query start and new token ids into the step
        buffers (growing the token buffers if need be); return the number of decodes."""
        n = len(scheduled)
        rows, num_computed, num_new = self._rows[:n], self._num_computed[:n], self._num_new[:n]
        num_decodes = 0
        for i, item in enumerate(scheduled):
            rows[i] = self._row_of[item.state.request_id]
            num_computed[i] = item.num_computed_tokens
            num_new[i] = item.num_new_tokens
            num_decodes += item.num_new_tokens == 1
        query_start = self._query_start[: n + 1]
        np.cumsum(num_new, out=query_start[1:])
        num_tokens = int(query_start[n])
        if num_tokens > len(self._arange):
            self._resize_tokens(max(num_tokens, 2 * len(self._arange)))
        input_ids = self._input_ids.array
        for i, item in enumerate(scheduled):
            start, end = item.num_computed_tokens, item.seq_len
            if end - start == 1:
                input_ids[query_start[i]] = item.state.token_ids[start]
            else:
                input_ids[query_start[i] : query_start[i + 1]] = item.state.token_ids[start:end]
        return num_decodes

    def _write_positions(self, n: int, num_tokens: int) -> None:
        """Token t of request i sits at position num_computed[i] + (t - query_start[i])."""
        num_computed, num_new = self._num_computed[:n], self._num_new[:n]
        positions = self._positions.array[:num_tokens]
        np.subtract(
            self._arange[:num_tokens], np.repeat(self._query_start[:n] - num_computed, num_new), out=positions
        )

    def _write_slots(self, n: int, num_tokens: int, block_table: np.ndarray, buffer: _StagedBuffer) -> None:
        """Each token's K/V go to slot block_table[row, position // block_size] *
        block_size + position % block_size: computed for all the step's tokens at once."""
        rows, num_new = self._rows[:n], self._num_new[:n]
        positions = self._positions.array[:num_tokens]
        slot_mapping = buffer.array[:num_tokens]
        block_of_token = block_table[np.repeat(rows, num_new), positions // self.block_size]
        np.multiply(block_of_token, self.block_size, out=slot_mapping)
        slot_mapping += positions % self.block_size

    def _check_blocks_cover(
        self, scheduled: Sequence[ScheduledRequest], rows: np.ndarray, num_used_blocks: np.ndarray
    ) -> None:
        """The scheduler allocates the blocks a step writes; a table short of them would
        have the kernels read and write block 0 instead, so fail loudly."""
        short = self.num_blocks[rows] < num_used_blocks
        if short.any():
            i = int(short.argmax())
            raise ValueError(
                f"request {scheduled[i].state.request_id} runs tokens up to {scheduled[i].seq_len}, which need "
                f"{int(num_used_blocks[i])} blocks of {self.block_size}, but its block table "
                f"holds {int(self.num_blocks[rows[i]])}"
            )

    # -- sizing ----------------------------------------------------------------------------

    def _resize_rows(self, num_rows: int, max_blocks_per_row: int) -> None:
        """Grow to `num_rows` rows of `max_blocks_per_row` columns, keeping every row."""
        old_rows, old_width = self.block_table.shape

        def grown(table: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            new_table = np.zeros((num_rows, max_blocks_per_row), dtype=np.int32)
            new_table[:old_rows, :old_width] = table
            new_counts = np.zeros(num_rows, dtype=np.int32)
            new_counts[:old_rows] = counts
            return new_table, new_counts

        self.block_table, self.num_blocks = grown(self.block_table, self.num_blocks)
        for group in range(self.num_groups - 1):
            self.group_block_tables[group], self.group_num_blocks[group] = grown(
                self.group_block_tables[group], self.group_num_blocks[group]
            )
        self._free_rows += range(num_rows - 1, old_rows - 1, -1)
        # Per-step scratch, one entry per request of a step (at most one per row).
        self._rows = np.zeros(num_rows, dtype=np.int64)
        self._num_computed = np.zeros(num_rows, dtype=np.int64)
        self._num_new = np.zeros(num_rows, dtype=np.int64)
        self._num_used_blocks = np.zeros(num_rows, dtype=np.int64)
        self._query_start = np.zeros(num_rows + 1, dtype=np.int64)
        self._seq_lens = _StagedBuffer(num_rows, torch.int32, self.device)
        self._prefill_query_start = _StagedBuffer(num_rows + 1, torch.int32, self.device)
        self._decode_tables = _StagedBuffer(num_rows * max_blocks_per_row, torch.int32, self.device)
        self._prefill_tables = _StagedBuffer(num_rows * max_blocks_per_row, torch.int32, self.device)
        self._resize_group_buffers()

    def _resize_tokens(self, max_num_tokens: int) -> None:
        self._arange = np.arange(max_num_tokens, dtype=np.int64)
        self._input_ids = _StagedBuffer(max_num_tokens, torch.int64, self.device)
        self._positions = _StagedBuffer(max_num_tokens, torch.int64, self.device)
        self._slot_mapping = _StagedBuffer(max_num_tokens, torch.int64, self.device)
        self._resize_group_buffers()

    def _resize_group_buffers(self) -> None:
        """KV groups 1..: a slot mapping, decode tables and prefill tables each."""
        if self.num_groups == 1 or not hasattr(self, "_arange"):
            self._group_buffers: list[tuple[_StagedBuffer, _StagedBuffer, _StagedBuffer]] = []
            return
        table_size = self.block_table.size
        self._group_buffers = [
            (
                _StagedBuffer(len(self._arange), torch.int64, self.device),
                _StagedBuffer(table_size, torch.int32, self.device),
                _StagedBuffer(table_size, torch.int32, self.device),
            )
            for _ in range(self.num_groups - 1)
        ]
