"""The persistent batch (services/executor/input_batch.py): rows updated in place by the
deltas, and each step's inputs equal, token for token, to a batch built afresh from the
mirrored block tables (the zero-padded construction the runner used before it kept one)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pagedserve.services.executor.input_batch import InputBatch, StepInputs
from pagedserve.services.executor.request_state import RequestState, ScheduledRequest
from pagedserve.shared.sampling_params import SamplingParams

BLOCK_SIZE = 4
CPU = torch.device("cpu")


def small_batch() -> InputBatch:
    """Sized for almost nothing, so that the tests grow every array."""
    return InputBatch(num_rows=1, max_blocks_per_row=1, max_num_tokens=1, block_size=BLOCK_SIZE, device=CPU)


def scheduled(
    request_id: str, num_tokens: int, block_ids: list[int], num_computed: int, num_new: int
) -> ScheduledRequest:
    state = RequestState(request_id, [1000 + 7 * t for t in range(num_tokens)], num_tokens, block_ids, SamplingParams())
    return ScheduledRequest(state, num_computed, num_new)


def fresh_inputs(items: list[ScheduledRequest]) -> dict[str, torch.Tensor]:
    """A step's inputs built from nothing but the items' own block lists."""
    bs = BLOCK_SIZE
    input_ids, positions, slots = [], [], []
    for item in items:
        for pos in range(item.num_computed_tokens, item.seq_len):
            input_ids.append(item.state.token_ids[pos])
            positions.append(pos)
            slots.append(item.state.block_ids[pos // bs] * bs + pos % bs)
    decodes = [item for item in items if item.num_new_tokens == 1]
    prefills = items[len(decodes) :]

    def table(part: list[ScheduledRequest]) -> torch.Tensor:
        width = max((-(-item.seq_len // bs) for item in part), default=0)
        rows = np.zeros((len(part), width), dtype=np.int32)
        for row, item in enumerate(part):
            used = -(-item.seq_len // bs)
            rows[row, :used] = item.state.block_ids[:used]
        return torch.from_numpy(rows)

    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "positions": torch.tensor(positions, dtype=torch.int64),
        "slot_mapping": torch.tensor(slots, dtype=torch.int64),
        "decode_block_tables": table(decodes),
        "decode_seq_lens": torch.tensor([i.seq_len for i in decodes], dtype=torch.int32),
        "prefill_block_tables": table(prefills),
        "prefill_query_start_loc": torch.tensor(
            np.concatenate([[0], np.cumsum([i.num_new_tokens for i in prefills])]), dtype=torch.int32
        ),
        "prefill_seq_lens": torch.tensor([i.seq_len for i in prefills], dtype=torch.int32),
    }


def assert_same_inputs(inputs: StepInputs, items: list[ScheduledRequest]) -> None:
    expected = fresh_inputs(items)
    meta = inputs.attn_metadata
    actual = {
        "input_ids": inputs.input_ids, "positions": inputs.positions, "slot_mapping": meta.slot_mapping,
        "decode_block_tables": meta.decode_block_tables, "decode_seq_lens": meta.decode_seq_lens,
        "prefill_block_tables": meta.prefill_block_tables, "prefill_query_start_loc": meta.prefill_query_start_loc,
        "prefill_seq_lens": meta.prefill_seq_lens,
    }
    for name, tensor in actual.items():
        want = expected[name]
        assert tensor.dtype == want.dtype and tensor.shape == want.shape, name
        assert tensor.is_contiguous(), name
        if name.endswith("block_tables"):
            # Entries past a sequence's last used block are padding: any valid block id
            # (the persistent row may hold the request's later blocks there, or 0).
            seq_lens = expected[name.replace("block_tables", "seq_lens")]
            for row, seq_len in enumerate(seq_lens.tolist()):
                used = -(-seq_len // BLOCK_SIZE)
                assert torch.equal(tensor[row, :used], want[row, :used]), (name, row)
                assert (tensor[row, used:] >= 0).all(), (name, row)
        else:
            assert torch.equal(tensor, want), name
    decodes = [i for i in items if i.num_new_tokens == 1]
    prefills = items[len(decodes) :]
    assert meta.num_decode_tokens == len(decodes)
    assert meta.max_decode_seq_len == max((i.seq_len for i in decodes), default=0)
    assert meta.max_prefill_seq_len == max((i.seq_len for i in prefills), default=0)
    assert meta.max_prefill_query_len == max((i.num_new_tokens for i in prefills), default=0)
    assert inputs.query_end_loc.tolist() == np.cumsum([i.num_new_tokens for i in items]).tolist()


def test_a_step_of_decodes_and_prefill_chunks_matches_a_fresh_batch() -> None:
    batch = small_batch()
    items = [
        scheduled("d1", 9, [5, 2, 7], 8, 1),
        scheduled("d2", 4, [3], 3, 1),
        scheduled("p1", 10, [1, 4, 6], 0, 10),
        scheduled("p2", 12, [8, 9, 10, 11], 5, 6),  # a chunk in the middle of its prompt
    ]
    for item in items:
        batch.add_request(item.state.request_id, item.state.block_ids)
    assert_same_inputs(batch.prepare(items), items)


def test_deltas_update_the_rows_in_place_over_many_steps() -> None:
    """Requests arrive, grow, copy-on-write their last block and leave at random; every
    step's inputs equal a fresh batch of the mirrored tables."""
    rng = random.Random(0)
    batch = small_batch()
    live: dict[str, ScheduledRequest] = {}
    next_block, next_id = 1, 0
    for _ in range(60):
        for request_id in [r for r in live if rng.random() < 0.15]:
            del live[request_id]
            batch.remove_request(request_id)
        for _ in range(rng.randint(0, 3)):
            num_tokens = rng.randint(1, 30)
            blocks = list(range(next_block, next_block + -(-num_tokens // BLOCK_SIZE) + rng.randint(0, 2)))
            next_block += len(blocks)
            live[f"r{next_id}"] = scheduled(f"r{next_id}", num_tokens, blocks, rng.randint(0, num_tokens - 1), 0)
            batch.add_request(f"r{next_id}", blocks)
            next_id += 1
        items = []
        for request_id, item in live.items():
            state = item.state
            num_computed = item.seq_len
            if num_computed == len(state.token_ids):
                state.token_ids.append(rng.randint(0, 99))  # the token the last step sampled
            num_new = rng.choice([1, 1, rng.randint(1, len(state.token_ids) - num_computed)])
            num_new = min(num_new, len(state.token_ids) - num_computed)
            num_replaced = int(rng.random() < 0.2)
            needed = -(-(num_computed + num_new) // BLOCK_SIZE) - (len(state.block_ids) - num_replaced)
            new_blocks = list(range(next_block, next_block + max(needed, num_replaced)))
            next_block += len(new_blocks)
            if num_replaced:
                del state.block_ids[-num_replaced:]
            state.block_ids.extend(new_blocks)
            batch.append_block_ids(request_id, new_blocks, num_replaced)
            live[request_id] = ScheduledRequest(state, num_computed, num_new)
            items.append(live[request_id])
        items.sort(key=lambda item: item.num_new_tokens != 1)
        for request_id, item in live.items():
            assert batch.block_ids(request_id) == item.state.block_ids
        if items:
            assert_same_inputs(batch.prepare(items), items)
    assert batch.num_requests == len(live)


def test_a_freed_row_is_zeroed_and_reused() -> None:
    batch = small_batch()
    batch.add_request("a", [3, 4, 5])
    batch.add_request("b", [6])
    batch.remove_request("a")
    assert not batch.block_table[:, 2:].any()
    batch.add_request("c", [7])
    assert batch.block_ids("c") == [7] and batch.block_ids("b") == [6]
    assert batch.block_table.shape[0] == 2  # c took a's row: nothing grew
    assert batch.num_requests == 2


def test_a_request_sent_again_rewrites_its_row() -> None:
    batch = small_batch()
    batch.add_request("a", [3, 4, 5])
    batch.add_request("a", [9])
    assert batch.block_ids("a") == [9] and batch.num_requests == 1
    assert not batch.block_table[:, 1:].any()


def test_clear_frees_every_row() -> None:
    batch = small_batch()
    for i in range(5):
        batch.add_request(f"r{i}", [i, i + 1])
    batch.clear()
    assert batch.num_requests == 0 and not batch.block_table.any()


def test_a_table_short_of_the_step_fails_with_numbers() -> None:
    batch = small_batch()
    item = scheduled("a", 9, [5, 2], 8, 1)
    batch.add_request("a", [5, 2])
    expected = "request a runs tokens up to 9, which need 3 blocks of 4, but its block table holds 2"
    with pytest.raises(ValueError, match=expected):
        batch.prepare([item])


def test_off_cpu_the_model_reads_device_twins_of_the_same_shapes_and_dtypes() -> None:
    """The path an accelerator takes (each host buffer copied into a device tensor), on
    PyTorch's meta device: shapes and dtypes without data."""
    meta_device = torch.device("meta")
    batch = InputBatch(num_rows=1, max_blocks_per_row=1, max_num_tokens=1, block_size=BLOCK_SIZE, device=meta_device)
    items = [scheduled("d", 9, [5, 2, 7], 8, 1), scheduled("p", 10, [1, 4, 6], 0, 10)]
    for item in items:
        batch.add_request(item.state.request_id, item.state.block_ids)
    inputs = batch.prepare(items)
    meta = inputs.attn_metadata
    expected = fresh_inputs(items)
    for name, tensor in [("input_ids", inputs.input_ids), ("positions", inputs.positions)] + [
        (name, getattr(meta, name)) for name in expected if name not in ("input_ids", "positions")
    ]:
        assert tensor.device.type == "meta", name
        assert tensor.dtype == expected[name].dtype and tensor.shape == expected[name].shape, name


def test_each_kv_group_gets_its_own_slots_and_tables() -> None:
    """Layers 0 and 2 in KV group 0, 1 and 3 in group 1: each group's slot mapping and
    tables come from its own rows, through deltas and copy-on-write of either table."""
    batch = InputBatch(num_rows=1, max_blocks_per_row=1, max_num_tokens=1, block_size=BLOCK_SIZE, device=CPU,
                       group_of_layer=(0, 1, 0, 1))
    tables = {"d": ([5, 2, 7], [0, 11, 12]), "p": ([1, 4, 6], [13, 14, 15]), "q": ([8, 9], [16, 17])}
    for request_id, (table, other) in tables.items():
        batch.add_request(request_id, table, [other])
    batch.append_block_ids("q", [18], 1, group=1)  # group 1 copies its last block
    batch.append_block_ids("q", [10], 0)
    tables["q"] = ([8, 9, 10], [16, 18])
    assert batch.block_ids("q") == [8, 9, 10] and batch.group_block_ids("q", 1) == [16, 18]
    counts = {"d": (9, 8, 1), "p": (10, 0, 10), "q": (8, 5, 3)}

    def items(group: int) -> list[ScheduledRequest]:
        return [scheduled(r, n, list(tables[r][group]), c, k) for r, (n, c, k) in counts.items()]

    inputs = batch.prepare(items(0))
    meta = inputs.attn_metadata
    assert [meta.for_layer(i) is meta for i in range(4)] == [True, False, True, False]
    assert_same_inputs(inputs, items(0))
    assert_same_inputs(StepInputs(inputs.input_ids, inputs.positions, meta.groups[0], inputs.query_end_loc), items(1))
    with pytest.raises(ValueError, match="2 block tables for 2 KV groups|1 block tables for 2 KV groups"):
        batch.add_request("x", [1])


def test_one_kv_group_has_no_group_metadata() -> None:
    batch = small_batch()
    batch.add_request("a", [3, 4])
    meta = batch.prepare([scheduled("a", 6, [3, 4], 0, 6)]).attn_metadata
    assert meta.groups == [] and meta.for_layer(7) is meta
