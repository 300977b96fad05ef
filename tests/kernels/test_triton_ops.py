"""Tests for `kernels/triton_ops.py` and the kernels it launches (`kernels/triton_kernels/`):
every kernel against `kernels/torch_ops.py`: where no GPU is, run by the Triton
interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 there); on a GPU,
compiled, on CUDA tensors (every tensor a test makes is made on that device).

Everything a kernel must not touch or read is poisoned with NaN: reshape_and_cache must
leave unwritten slots NaN; outputs start NaN (`torch.empty` is patched to fill), so an
unwritten element shows; and the attention kernels read caches from
`tests/kernels/paged_cache.py`, NaN wherever no real token sits. Shapes are small: the
interpreter runs every program in Python.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from pagedserve.kernels import torch_ops, triton_ops
from tests.kernels.paged_cache import paged_cache, seeded_generator, tolerance

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _on_device() -> Iterator[None]:
    """Factory calls without a device make tensors (and seeded_generator its generator) on
    DEVICE."""
    with torch.device(DEVICE):
        yield


@pytest.fixture(autouse=True)
def _poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels allocate their outputs (and partial results) with `torch.empty`: make
    it return NaN-filled float tensors here, so any element a kernel forgets to write, or
    a partial result the reduction reads without it having been written, shows as NaN."""
    real_empty = torch.empty

    def empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        tensor = real_empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", empty)


class _LaunchRecorder:
    """Wraps a Triton kernel to record the grid of every launch, then runs it."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.grids: list[tuple[int, ...]] = []

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        self.grids.append(grid)
        return self.kernel[grid]


# ----------------------------------------------------------------------------------------
# reshape_and_cache


@pytest.mark.parametrize(
    ("num_kv_heads", "head_dim", "block_size", "dtype"),
    [
        (2, 64, 16, torch.float32),
        (3, 128, 8, torch.float16),  # non-power-of-two head count: padded and masked
        (1, 64, 32, torch.bfloat16),
    ],
)
def test_reshape_and_cache_matches_torch(
    request: pytest.FixtureRequest,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
) -> None:
    gen = seeded_generator(request)
    num_blocks, num_tokens = 6, 20
    # K and V as the model produces them: strided views into one fused projection output.
    qkv = torch.randn(num_tokens, 3, num_kv_heads, head_dim, generator=gen).to(dtype)
    key, value = qkv[:, 1], qkv[:, 2]
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slot_mapping[torch.randperm(num_tokens, generator=gen)[:5]] = -1  # padding tokens
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)
    expected_key_cache, expected_value_cache = key_cache.clone(), value_cache.clone()

    triton_ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    torch_ops.reshape_and_cache(key, value, expected_key_cache, expected_value_cache, slot_mapping)

    # Exact: a copy. NaN where nothing was written, so a stray write fails too.
    torch.testing.assert_close(key_cache, expected_key_cache, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(value_cache, expected_value_cache, rtol=0, atol=0, equal_nan=True)
    written = int((slot_mapping >= 0).sum())
    assert int((~key_cache.isnan()).sum()) == written * num_kv_heads * head_dim


def test_reshape_and_cache_converts_dtype(request: pytest.FixtureRequest) -> None:
    gen = seeded_generator(request)
    key = torch.randn(4, 2, 64, generator=gen)
    value = torch.randn(4, 2, 64, generator=gen)
    key_cache = torch.full((2, 8, 2, 64), float("nan"), dtype=torch.float16)
    value_cache = torch.full_like(key_cache, float("nan"))
    triton_ops.reshape_and_cache(key, value, key_cache, value_cache, torch.tensor([3, -1, 8, 15]))
    assert torch.equal(key_cache[0, 3], key[0].half())
    assert torch.equal(value_cache[1, 0], value[2].half())
    assert torch.equal(value_cache[1, 7], value[3].half())


# ----------------------------------------------------------------------------------------
# paged decode attention

# (seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, partition_size or None
# for the shipped default). Lengths mix short and long, mid-block and block-boundary ends.
_DECODE_CASES = [
    ([1, 16, 37, 100], 2, 2, 64, 16, torch.float32, None),  # GQA 1, single partition
    ([8, 23, 64], 6, 2, 128, 8, torch.float16, None),  # GQA 3
    ([32, 45, 5], 8, 1, 64, 32, torch.bfloat16, None),  # GQA 8
    ([1, 31, 32, 150, 160], 3, 1, 64, 16, torch.float32, 32),  # split, GQA 3
    ([200, 3, 64], 8, 1, 128, 8, torch.bfloat16, 16),  # split, GQA 8
    ([96, 17], 2, 2, 64, 32, torch.float16, 32),  # split, GQA 1
    # The shipped partition size: one partition exactly, one token over, and three.
    ([1100, 512, 7, 513], 8, 1, 128, 16, torch.float16, None),
]


@pytest.mark.parametrize(
    ("seq_lens", "num_heads", "num_kv_heads", "head_dim", "block_size", "dtype", "partition_size"),
    _DECODE_CASES,
)
def test_paged_decode_matches_torch(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    partition_size: int | None,
) -> None:
    gen = seeded_generator(request)
    # The launcher looks its kernels up in triton_ops: record their grids there.
    decode_kernel = _LaunchRecorder(triton_ops.paged_decode_kernel)
    reduce_kernel = _LaunchRecorder(triton_ops.reduce_partitions_kernel)
    monkeypatch.setattr(triton_ops, "paged_decode_kernel", decode_kernel)
    monkeypatch.setattr(triton_ops, "reduce_partitions_kernel", reduce_kernel)
    split_args = {} if partition_size is None else {"partition_size": partition_size}
    cache = paged_cache(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen)
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5
    max_seq_len = max(seq_lens)

    out = triton_ops.paged_decode_attention(
        query,
        cache.key_cache,
        cache.value_cache,
        cache.block_tables,
        cache.seq_lens,
        scale,
        max_seq_len,
        **split_args,
    )
    expected = torch_ops.paged_decode_attention(
        query,
        cache.reference_key_cache,
        cache.reference_value_cache,
        cache.block_tables,
        cache.seq_lens,
        scale,
        max_seq_len,
    )

    assert out.shape == query.shape and out.dtype == dtype
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, **tolerance(dtype))
    # Split-KV really ran when the context spans several partitions, and only then.
    num_partitions = math.ceil(max_seq_len / (partition_size or triton_ops.DEFAULT_PARTITION_SIZE))
    assert decode_kernel.grids == [(len(seq_lens), num_kv_heads, num_partitions)]
    assert len(reduce_kernel.grids) == (1 if num_partitions > 1 else 0)


def test_decode_reduction_loops_over_many_partitions(request: pytest.FixtureRequest) -> None:
    """More partitions than the reduction combines per iteration (lowered here to 4)."""
    gen = seeded_generator(request)
    seq_lens = [150, 40, 2]  # 10, 3 and 1 partitions
    cache = paged_cache(seq_lens, 1, 64, 16, torch.float32, gen)
    query = torch.randn(len(seq_lens), 3, 64, generator=gen)
    args = (cache.block_tables, cache.seq_lens, 0.125, max(seq_lens))
    out = triton_ops.paged_decode_attention(
        query, cache.key_cache, cache.value_cache, *args, partition_size=16, partitions_per_reduce_iter=4
    )
    expected = torch_ops.paged_decode_attention(
        query, cache.reference_key_cache, cache.reference_value_cache, *args
    )
    torch.testing.assert_close(out, expected, **tolerance(torch.float32))


def test_decode_split_and_unsplit_agree(request: pytest.FixtureRequest) -> None:
    """The log-sum-exp combination must reproduce the single-pass softmax."""
    gen = seeded_generator(request)
    seq_lens = [70, 33]
    cache = paged_cache(seq_lens, 2, 64, 8, torch.float32, gen)
    query = torch.randn(len(seq_lens), 4, 64, generator=gen)
    args = (query, cache.key_cache, cache.value_cache, cache.block_tables, cache.seq_lens, 0.125, 70)
    unsplit = triton_ops.paged_decode_attention(*args)
    split = triton_ops.paged_decode_attention(*args, partition_size=16)
    torch.testing.assert_close(split, unsplit, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("split_args", "message"),
    [
        ({"partition_size": 48}, "power of two"),
        ({"partition_size": 8}, ">= the block size"),  # blocks are 16 tokens here
        ({"partitions_per_reduce_iter": 3}, "power of two"),
    ],
)
def test_decode_refuses_unusable_split_sizes(split_args: dict[str, int], message: str) -> None:
    """Split sizes become `tl.arange` extents and whole-block tiles: refused before launch."""
    cache = torch.zeros(2, 16, 1, 64)
    args = (torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0, 1)
    with pytest.raises(ValueError, match=message):
        triton_ops.paged_decode_attention(torch.zeros(1, 2, 64), cache, cache, *args, **split_args)


# ----------------------------------------------------------------------------------------
# paged prefill / extend attention

# (seq_and_query_lens, num_heads, num_kv_heads, head_dim, block_size, dtype); each pair is
# (seq_len, q_len): a whole prompt, an extension of a cached prefix, a single token, and a
# sequence with no new tokens this step, ending mid-block and on block boundaries.
_PREFILL_CASES = [
    ([(16, 16), (37, 5), (9, 1), (20, 0)], 2, 2, 64, 16, torch.float32),  # GQA 1
    ([(40, 40), (70, 20), (3, 3)], 6, 2, 128, 8, torch.float16),  # GQA 3
    ([(64, 17), (33, 33), (100, 2)], 8, 1, 64, 32, torch.bfloat16),  # GQA 8
    ([(130, 70), (8, 8)], 16, 2, 128, 16, torch.float32),  # GQA 8, many query programs
    ([(90, 90), (48, 32)], 3, 1, 64, 16, torch.bfloat16),  # GQA 3, q_len > rows/program
]


@pytest.mark.parametrize(
    ("seq_and_query_lens", "num_heads", "num_kv_heads", "head_dim", "block_size", "dtype"),
    _PREFILL_CASES,
)
def test_paged_prefill_matches_torch(
    request: pytest.FixtureRequest,
    seq_and_query_lens: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
) -> None:
    gen = seeded_generator(request)
    seq_lens = [s for s, _ in seq_and_query_lens]
    query_lens = [q for _, q in seq_and_query_lens]
    cache = paged_cache(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen)
    # The query is a strided view (as after splitting a fused QKV projection).
    fused = torch.randn(sum(query_lens), 2, num_heads, head_dim, generator=gen).to(dtype)
    query = fused[:, 0]
    query_start_loc = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    scale = head_dim**-0.5
    args = (cache.block_tables, query_start_loc, cache.seq_lens, scale, max(query_lens), max(seq_lens))

    out = triton_ops.paged_prefill_attention(query, cache.key_cache, cache.value_cache, *args)
    expected = torch_ops.paged_prefill_attention(
        query, cache.reference_key_cache, cache.reference_value_cache, *args
    )

    assert out.shape == query.shape and out.dtype == dtype
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, **tolerance(dtype))


def test_write_then_attend_pipeline(request: pytest.FixtureRequest) -> None:
    """The executor's order: reshape_and_cache writes this step's K/V, then the prefill
    kernel reads them back through the block table together with the cached prefix."""
    gen = seeded_generator(request)
    seq_lens, query_lens = [29, 16], [6, 16]
    num_heads, num_kv_heads, head_dim, block_size = 6, 2, 64, 8
    cache = paged_cache(seq_lens, num_kv_heads, head_dim, block_size, torch.float16, gen)
    # Blank the slots of this step's tokens, then write them with the Triton kernel.
    slots = []
    for seq, (seq_len, query_len) in enumerate(zip(seq_lens, query_lens)):
        for position in range(seq_len - query_len, seq_len):
            block = int(cache.block_tables[seq, position // block_size])
            slots.append(block * block_size + position % block_size)
    slot_mapping = torch.tensor(slots)
    new_shape = (len(slots), num_kv_heads, head_dim)
    new_key = torch.randn(new_shape, generator=gen).half()
    new_value = torch.randn(new_shape, generator=gen).half()
    for cache_tensor in (cache.key_cache, cache.value_cache):
        cache_tensor.view(-1, num_kv_heads, head_dim)[slot_mapping] = float("nan")
    triton_ops.reshape_and_cache(new_key, new_value, cache.key_cache, cache.value_cache, slot_mapping)
    torch_ops.reshape_and_cache(
        new_key, new_value, cache.reference_key_cache, cache.reference_value_cache, slot_mapping
    )
    query = torch.randn(len(slots), num_heads, head_dim, generator=gen).half()
    query_start_loc = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    args = (cache.block_tables, query_start_loc, cache.seq_lens, 0.125, max(query_lens), max(seq_lens))

    out = triton_ops.paged_prefill_attention(query, cache.key_cache, cache.value_cache, *args)
    expected = torch_ops.paged_prefill_attention(
        query, cache.reference_key_cache, cache.reference_value_cache, *args
    )
    torch.testing.assert_close(out, expected, **tolerance(torch.float16))


def test_float64_falls_back_to_torch(request: pytest.FixtureRequest) -> None:
    """float64 attention is served by the torch implementation (fp64 accumulation)."""
    gen = seeded_generator(request)
    seq_lens = [5, 12]
    cache = paged_cache(seq_lens, 1, 64, 8, torch.float64, gen)
    keys, values = cache.reference_key_cache, cache.reference_value_cache
    query = torch.randn(2, 2, 64, generator=gen, dtype=torch.float64)
    decode_args = (query, keys, values, cache.block_tables, cache.seq_lens, 0.125, 12)
    assert torch.equal(
        triton_ops.paged_decode_attention(*decode_args), torch_ops.paged_decode_attention(*decode_args)
    )
    query_start_loc = torch.tensor([0, 1, 2], dtype=torch.int32)
    prefill_args = (query, keys, values, cache.block_tables, query_start_loc, cache.seq_lens, 0.125, 1, 12)
    assert torch.equal(
        triton_ops.paged_prefill_attention(*prefill_args),
        torch_ops.paged_prefill_attention(*prefill_args),
    )


# ----------------------------------------------------------------------------------------
# sliding windows: caches NaN before each window, blocks wholly before it are block 0

# (seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, partition_size or None,
# sliding_window): window 1, mid-block, on a block boundary, equal to and larger than the
# longest context; split partitions that tile the window from its (mid-block) start.
_WINDOW_DECODE_CASES = [
    ([1, 16, 37, 100], 2, 2, 64, 16, torch.float32, None, 1),
    ([8, 23, 64], 6, 2, 64, 8, torch.float16, None, 13),  # GQA 3
    ([32, 45, 5], 8, 1, 64, 16, torch.bfloat16, None, 16),  # MQA, block boundary
    ([1, 31, 150, 160], 3, 1, 64, 16, torch.float32, 32, 70),  # split over the window
    ([200, 3, 64], 4, 2, 64, 8, torch.float32, 16, 200),  # split, window = longest
    ([96, 17], 2, 2, 64, 16, torch.float16, 32, 500),  # split, window > every context
]


@pytest.mark.parametrize(
    ("seq_lens", "num_heads", "num_kv_heads", "head_dim", "block_size", "dtype", "partition_size", "sliding_window"),
    _WINDOW_DECODE_CASES,
)
def test_paged_decode_with_sliding_window_matches_torch(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    partition_size: int | None,
    sliding_window: int,
) -> None:
    gen = seeded_generator(request)
    decode_kernel = _LaunchRecorder(triton_ops.paged_decode_kernel)
    monkeypatch.setattr(triton_ops, "paged_decode_kernel", decode_kernel)
    split_args = {} if partition_size is None else {"partition_size": partition_size}
    first_visible = [max(0, n - sliding_window) for n in seq_lens]
    cache = paged_cache(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen, first_visible=first_visible)
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype)
    args = (cache.block_tables, cache.seq_lens, head_dim**-0.5, max(seq_lens))

    out = triton_ops.paged_decode_attention(
        query, cache.key_cache, cache.value_cache, *args, sliding_window=sliding_window, **split_args
    )
    expected = torch_ops.paged_decode_attention(
        query, cache.reference_key_cache, cache.reference_value_cache, *args, sliding_window=sliding_window
    )

    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, **tolerance(dtype))
    # The grid covers the window, not the whole context.
    attended = min(max(seq_lens), sliding_window)
    num_partitions = math.ceil(attended / (partition_size or triton_ops.DEFAULT_PARTITION_SIZE))
    assert decode_kernel.grids == [(len(seq_lens), num_kv_heads, num_partitions)]


# (seq_and_query_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, sliding_window):
# prompts longer than the window (whose later queries see nothing of the first tiles), an
# extension whose first window starts mid-block, one token, no tokens, window 1, window equal
# to a context and larger than every one.
_WINDOW_PREFILL_CASES = [
    ([(40, 40), (37, 5), (29, 1), (20, 0), (6, 6)], 2, 2, 64, 8, torch.float32, 10),
    ([(70, 20), (33, 33)], 6, 2, 64, 16, torch.float16, 16),  # GQA 3
    ([(48, 17), (30, 30)], 8, 1, 64, 8, torch.bfloat16, 1),  # MQA
    ([(130, 70), (8, 8)], 4, 1, 64, 16, torch.float32, 100),  # many query programs
    ([(40, 9), (24, 24)], 2, 2, 64, 8, torch.float32, 24),
    ([(40, 9), (24, 24)], 2, 2, 64, 8, torch.float32, 64),
]


@pytest.mark.parametrize(
    ("seq_and_query_lens", "num_heads", "num_kv_heads", "head_dim", "block_size", "dtype", "sliding_window"),
    _WINDOW_PREFILL_CASES,
)
def test_paged_prefill_with_sliding_window_matches_torch(
    request: pytest.FixtureRequest,
    seq_and_query_lens: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    sliding_window: int,
) -> None:
    gen = seeded_generator(request)
    seq_lens = [s for s, _ in seq_and_query_lens]
    query_lens = [q for _, q in seq_and_query_lens]
    # What the first new token's window holds is all that is cached.
    first_visible = [max(0, s - q + 1 - sliding_window) for s, q in seq_and_query_lens]
    cache = paged_cache(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen, first_visible=first_visible)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to(dtype)
    query_start_loc = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    args = (cache.block_tables, query_start_loc, cache.seq_lens, head_dim**-0.5, max(query_lens), max(seq_lens))

    out = triton_ops.paged_prefill_attention(
        query, cache.key_cache, cache.value_cache, *args, sliding_window=sliding_window
    )
    expected = torch_ops.paged_prefill_attention(
        query, cache.reference_key_cache, cache.reference_value_cache, *args, sliding_window=sliding_window
    )

    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, **tolerance(dtype))


def test_window_kernels_refuse_an_empty_window() -> None:
    cache = torch.zeros(2, 16, 1, 64)
    args = (torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0, 1)
    with pytest.raises(ValueError, match="at least 1 token, not 0"):
        triton_ops.paged_decode_attention(torch.zeros(1, 2, 64), cache, cache, *args, sliding_window=0)
