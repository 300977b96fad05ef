"""Tests for `kernels/torch_ops.py` against a naive, obviously-correct reference.

The reference keeps every sequence's K/V contiguous ([seq_len, num_kv_heads, head_dim]) and
computes attention one query token and one head at a time in float64, so it shares no
code path (no block tables, no batching, no masking tricks) with the implementation.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pytest
import torch

from pagedserve.kernels import torch_ops


def _generator(request: pytest.FixtureRequest) -> torch.Generator:
    """Seeded from the test id, so every parameter set draws its own, reproducible inputs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@dataclass
class PagedContexts:
    """Per-sequence contiguous K/V and the same data scattered into a paged cache."""

    keys: list[torch.Tensor]  # [seq_len, num_kv_heads, head_dim] each
    values: list[torch.Tensor]
    key_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq], padding = block 0
    seq_lens: torch.Tensor  # int32 [num_seqs]


def _paged_contexts(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    generator: torch.Generator,
) -> PagedContexts:
    """Scatter random contexts into shuffled physical blocks with explicit Python loops.

    Block 0 is the padding target of every block table and is never allocated; it and the
    unwritten tails of last blocks hold large garbage, so reading them would show.
    """
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = 1 + sum(blocks_per_seq) + 3  # + a few blocks nobody owns
    physical = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = (1e3 * torch.randn(shape, generator=generator)).to(dtype)
    value_cache = (1e3 * torch.randn(shape, generator=generator)).to(dtype)
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    keys, values = [], []
    for seq, seq_len in enumerate(seq_lens):
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=generator).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=generator).to(dtype)
        table = [physical.pop() for _ in range(blocks_per_seq[seq])]
        block_tables[seq, : len(table)] = torch.tensor(table, dtype=torch.int32)
        for position in range(seq_len):
            block, offset = table[position // block_size], position % block_size
            key_cache[block, offset] = k[position]
            value_cache[block, offset] = v[position]
        keys.append(k)
        values.append(v)
    return PagedContexts(
        keys, values, key_cache, value_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32)
    )


def _naive_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, sliding_window: int | None = None
) -> torch.Tensor:
    """query [q_len, num_heads, d], key/value [seq_len, num_kv_heads, d]; the queries are
    the last q_len positions and each sees positions 0..its own, or with a sliding window
    the positions p with position - sliding_window < p <= position (written from HF's rule,
    `kv_idx > q_idx - sliding_window`). Returns float64."""
    q_len, num_heads, head_dim = query.shape
    seq_len, num_kv_heads, _ = key.shape
    group = num_heads // num_kv_heads
    out = torch.zeros(q_len, num_heads, head_dim, dtype=torch.float64)
    for i in range(q_len):
        position = seq_len - q_len + i
        for head in range(num_heads):
            kv_head = head // group
            q = query[i, head].double()
            seen = [t for t in range(position + 1) if sliding_window is None or t > position - sliding_window]
            scores = [float(q @ key[t, kv_head].double()) * scale for t in seen]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            total = sum(weights)
            for t, w in zip(seen, weights):
                out[i, head] += (w / total) * value[t, kv_head].double()
    return out


def _drop_outside_windows(
    ctx: PagedContexts, first_visible: list[int], generator: torch.Generator
) -> None:
    """What the scheduler leaves of a sliding-window layer's cache: every slot before a
    sequence's first visible position overwritten with large garbage, and the table entries
    of blocks wholly before it pointed at block 0 (freed blocks go back to the pool, block
    0 stands in), so an implementation that reads outside the window gets it wrong."""
    block_size = ctx.key_cache.shape[1]
    for seq, first in enumerate(first_visible):
        for position in range(first):
            block = int(ctx.block_tables[seq, position // block_size])
            garbage = 1e3 * torch.randn(2, *ctx.key_cache.shape[2:], generator=generator)
            ctx.key_cache[block, position % block_size] = garbage[0].to(ctx.key_cache.dtype)
            ctx.value_cache[block, position % block_size] = garbage[1].to(ctx.value_cache.dtype)
        ctx.block_tables[seq, : first // block_size] = 0


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}


# ----------------------------------------------------------------------------------------


def test_reshape_and_cache_writes_slots_and_skips_negative(request: pytest.FixtureRequest) -> None:
    gen = _generator(request)
    num_blocks, block_size, num_kv_heads, head_dim = 5, 8, 2, 16
    num_tokens = 12
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[2, 7]] = -1  # padding tokens
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"))
    value_cache = torch.full(shape, float("nan"))

    torch_ops.reshape_and_cache(key, value, key_cache, value_cache, slots)

    expected_k = torch.full(shape, float("nan"))
    expected_v = torch.full(shape, float("nan"))
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected_k[slot // block_size, slot % block_size] = key[token]
            expected_v[slot // block_size, slot % block_size] = value[token]
    torch.testing.assert_close(key_cache, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(value_cache, expected_v, rtol=0, atol=0, equal_nan=True)


def test_reshape_and_cache_casts_to_cache_dtype(request: pytest.FixtureRequest) -> None:
    gen = _generator(request)
    key = torch.randn(3, 1, 8, generator=gen)
    value = torch.randn(3, 1, 8, generator=gen)
    key_cache = torch.zeros(2, 4, 1, 8, dtype=torch.float16)
    value_cache = torch.zeros_like(key_cache)
    torch_ops.reshape_and_cache(key, value, key_cache, value_cache, torch.tensor([5, 0, 3]))
    assert torch.equal(key_cache[1, 1], key[0].half())
    assert torch.equal(value_cache[0, 3], value[2].half())


@pytest.mark.parametrize(
    ("seq_lens", "num_heads", "num_kv_heads", "block_size", "dtype"),
    [
        # lengths: one token, exactly one/two blocks, mid-block
        ([1, 8, 13, 16], 2, 2, 8, torch.float32),
        ([16, 21, 5], 6, 2, 16, torch.float32),  # GQA 3
        ([3, 32, 40], 8, 1, 16, torch.float32),  # GQA 8 (MQA)
        ([9, 24], 4, 2, 8, torch.float16),
    ],
)
def test_paged_decode_matches_naive(
    request: pytest.FixtureRequest,
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    block_size: int,
    dtype: torch.dtype,
) -> None:
    gen = _generator(request)
    head_dim = 16
    ctx = _paged_contexts(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen)
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5

    out = torch_ops.paged_decode_attention(
        query, ctx.key_cache, ctx.value_cache, ctx.block_tables, ctx.seq_lens, scale, max(seq_lens)
    )

    assert out.shape == query.shape and out.dtype == dtype
    for seq in range(len(seq_lens)):
        expected = _naive_attention(query[seq : seq + 1], ctx.keys[seq], ctx.values[seq], scale)
        torch.testing.assert_close(out[seq].double(), expected[0], **_tolerance(dtype))


@pytest.mark.parametrize(
    ("seq_and_query_lens", "num_heads", "num_kv_heads", "block_size", "dtype"),
    [
        # (seq_len, q_len): whole prompt on a block boundary, extension of a cached prefix
        # ending mid-block, a single new token, a sequence with no new tokens this step.
        ([(16, 16), (21, 5), (9, 1), (12, 0)], 2, 2, 8, torch.float32),
        ([(32, 7), (5, 5)], 6, 2, 16, torch.float32),  # GQA 3
        ([(20, 20), (17, 3)], 8, 1, 8, torch.float32),  # GQA 8
        ([(24, 9)], 4, 2, 8, torch.bfloat16),
    ],
)
def test_paged_prefill_matches_naive(
    request: pytest.FixtureRequest,
    seq_and_query_lens: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    block_size: int,
    dtype: torch.dtype,
) -> None:
    gen = _generator(request)
    head_dim = 16
    seq_lens = [s for s, _ in seq_and_query_lens]
    query_lens = [q for _, q in seq_and_query_lens]
    ctx = _paged_contexts(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to(dtype)
    query_start_loc = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    scale = head_dim**-0.5

    out = torch_ops.paged_prefill_attention(
        query,
        ctx.key_cache,
        ctx.value_cache,
        ctx.block_tables,
        query_start_loc,
        ctx.seq_lens,
        scale,
        max(query_lens),
        max(seq_lens),
    )

    assert out.shape == query.shape and out.dtype == dtype
    for seq, (start, end) in enumerate(zip(query_start_loc[:-1].tolist(), query_start_loc[1:].tolist())):
        expected = _naive_attention(query[start:end], ctx.keys[seq], ctx.values[seq], scale)
        torch.testing.assert_close(out[start:end].double(), expected, **_tolerance(dtype))


def test_prefill_of_one_token_equals_decode(request: pytest.FixtureRequest) -> None:
    """A decode step is a prefill with q_len 1: both kernels must agree on it."""
    gen = _generator(request)
    seq_lens = [7, 16, 30]
    ctx = _paged_contexts(seq_lens, 2, 16, 8, torch.float32, gen)
    query = torch.randn(len(seq_lens), 4, 16, generator=gen)
    decode = torch_ops.paged_decode_attention(
        query, ctx.key_cache, ctx.value_cache, ctx.block_tables, ctx.seq_lens, 0.25, max(seq_lens)
    )
    prefill = torch_ops.paged_prefill_attention(
        query,
        ctx.key_cache,
        ctx.value_cache,
        ctx.block_tables,
        torch.arange(len(seq_lens) + 1, dtype=torch.int32),
        ctx.seq_lens,
        0.25,
        1,
        max(seq_lens),
    )
    torch.testing.assert_close(decode, prefill, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_size", [8, 16])
def test_length_buckets_cover_every_row_once_within_the_padding_bound(request: pytest.FixtureRequest, block_size: int) -> None:
    gen = _generator(request)
    seq_lens = torch.randint(1, 700, (57,), generator=gen).tolist()
    groups = torch_ops.length_buckets(seq_lens, block_size, max_padding=0.3)
    assert sorted(row for group in groups for row in group) == list(range(len(seq_lens)))
    blocks = [-(-n // block_size) for n in seq_lens]
    for group in groups:
        longest = blocks[group[0]]
        assert all(blocks[row] <= longest for row in group)
        assert all(blocks[row] >= 0.7 * longest for row in group)
    assert 1 < len(groups) < len(seq_lens)  # neither one padded batch nor one call per row


def test_paged_decode_of_many_mixed_lengths_matches_naive(request: pytest.FixtureRequest) -> None:
    """Enough rows of spread-out lengths that the batch splits into several length groups."""
    gen = _generator(request)
    seq_lens = torch.randint(1, 120, (24,), generator=gen).tolist()
    ctx = _paged_contexts(seq_lens, 3, 16, 8, torch.float32, gen)
    query = torch.randn(len(seq_lens), 9, 16, generator=gen)
    assert len(torch_ops.length_buckets(seq_lens, 8)) > 1
    out = torch_ops.paged_decode_attention(
        query, ctx.key_cache, ctx.value_cache, ctx.block_tables, ctx.seq_lens, 0.25, max(seq_lens)
    )
    for seq in range(len(seq_lens)):
        expected = _naive_attention(query[seq : seq + 1], ctx.keys[seq], ctx.values[seq], 0.25)
        torch.testing.assert_close(out[seq].double(), expected[0], **_tolerance(torch.float32))


# Windows: 1 (only the token itself), smaller than a block, a block boundary, mid-context,
# equal to the longest context, larger than every context.
@pytest.mark.parametrize(
    ("seq_lens", "num_heads", "num_kv_heads", "block_size", "sliding_window", "dtype"),
    [
        ([1, 8, 13, 40], 2, 2, 8, 1, torch.float32),
        ([16, 21, 5, 33], 6, 2, 8, 5, torch.float32),  # GQA 3
        ([3, 32, 40, 17], 8, 1, 8, 16, torch.float32),  # MQA, window on a block boundary
        ([9, 24, 64], 4, 2, 16, 23, torch.float16),
        ([9, 24, 64], 4, 2, 16, 64, torch.float32),  # window = longest context
        ([9, 24, 64], 4, 2, 16, 100, torch.float32),  # window > every context
    ],
)
def test_paged_decode_with_sliding_window_matches_naive(
    request: pytest.FixtureRequest,
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    block_size: int,
    sliding_window: int,
    dtype: torch.dtype,
) -> None:
    gen = _generator(request)
    head_dim = 16
    ctx = _paged_contexts(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen)
    _drop_outside_windows(ctx, [max(0, n - sliding_window) for n in seq_lens], gen)
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype)

    out = torch_ops.paged_decode_attention(
        query, ctx.key_cache, ctx.value_cache, ctx.block_tables, ctx.seq_lens, 0.25, max(seq_lens),
        sliding_window=sliding_window,
    )

    for seq in range(len(seq_lens)):
        expected = _naive_attention(query[seq : seq + 1], ctx.keys[seq], ctx.values[seq], 0.25, sliding_window)
        torch.testing.assert_close(out[seq].double(), expected[0], **_tolerance(dtype))


@pytest.mark.parametrize(
    ("seq_and_query_lens", "num_heads", "num_kv_heads", "block_size", "sliding_window", "dtype"),
    [
        # a whole prompt longer than the window, an extension whose first query's window
        # starts mid-block, a single token, no new tokens, a prompt shorter than the window
        ([(40, 40), (37, 5), (29, 1), (12, 0), (6, 6)], 2, 2, 8, 10, torch.float32),
        ([(48, 7), (5, 5), (33, 33)], 6, 2, 8, 16, torch.float32),  # GQA 3, window on a block edge
        ([(20, 20), (17, 3)], 8, 1, 8, 1, torch.float32),  # MQA, window 1
        ([(40, 9), (24, 24)], 4, 2, 16, 24, torch.bfloat16),  # window = a context
        ([(40, 9), (24, 24)], 4, 2, 16, 64, torch.float32),  # window > every context
    ],
)
def test_paged_prefill_with_sliding_window_matches_naive(
    request: pytest.FixtureRequest,
    seq_and_query_lens: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    block_size: int,
    sliding_window: int,
    dtype: torch.dtype,
) -> None:
    gen = _generator(request)
    head_dim = 16
    seq_lens = [s for s, _ in seq_and_query_lens]
    query_lens = [q for _, q in seq_and_query_lens]
    ctx = _paged_contexts(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen)
    # Only what the first new token's window holds is still cached.
    _drop_outside_windows(ctx, [max(0, s - q + 1 - sliding_window) for s, q in seq_and_query_lens], gen)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to(dtype)
    query_start_loc = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0).to(torch.int32)

    out = torch_ops.paged_prefill_attention(
        query, ctx.key_cache, ctx.value_cache, ctx.block_tables, query_start_loc, ctx.seq_lens, 0.25,
        max(query_lens), max(seq_lens), sliding_window=sliding_window,
    )

    for seq, (start, end) in enumerate(zip(query_start_loc[:-1].tolist(), query_start_loc[1:].tolist())):
        expected = _naive_attention(query[start:end], ctx.keys[seq], ctx.values[seq], 0.25, sliding_window)
        torch.testing.assert_close(out[start:end].double(), expected, **_tolerance(dtype))


def test_a_window_changes_the_output(request: pytest.FixtureRequest) -> None:
    """The window tests are not vacuous: with the window, a long context's output differs
    from full causal attention over the same cache."""
    gen = _generator(request)
    ctx = _paged_contexts([40], 2, 16, 8, torch.float32, gen)
    query = torch.randn(1, 2, 16, generator=gen)
    args = (query, ctx.key_cache, ctx.value_cache, ctx.block_tables, ctx.seq_lens, 0.25, 40)
    windowed = torch_ops.paged_decode_attention(*args, sliding_window=8)
    whole = torch_ops.paged_decode_attention(*args)
    assert not torch.allclose(windowed, whole, atol=1e-3)
    assert torch.equal(torch_ops.paged_decode_attention(*args, sliding_window=40), whole)


def test_an_empty_window_is_refused() -> None:
    cache = torch.zeros(2, 8, 1, 16)
    tables, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="at least 1 token, not 0"):
        torch_ops.paged_decode_attention(torch.zeros(1, 2, 16), cache, cache, tables, lens, 1.0, 1, sliding_window=0)
    with pytest.raises(ValueError, match="at least 1 token, not -3"):
        torch_ops.paged_prefill_attention(
            torch.zeros(1, 2, 16), cache, cache, tables, torch.tensor([0, 1], dtype=torch.int32), lens, 1.0, 1, 1,
            sliding_window=-3,
        )
