"""Tests for `kernels/cpu_ops.py`: the C decode attention and cache-write kernels (built for
real with the machine's C compiler) against `kernels/torch_ops.py`, on caches that are NaN
wherever no real token sits (`tests/kernels/paged_cache.py`), and the build and fallback
around them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pagedserve.kernels import cpu_ops, native_build, torch_ops
from pagedserve.kernels.dispatch import kernel_module
from tests.kernels.paged_cache import paged_cache, seeded_generator, tolerance


def _clear_build_caches() -> None:
    native_build.load_library.cache_clear()
    cpu_ops._decode_kernel.cache_clear()
    cpu_ops._decode_kernel_or_none.cache_clear()
    cpu_ops._cache_kernel.cache_clear()


@pytest.fixture
def fresh_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An empty kernel cache folder and no library loaded yet in this process; afterwards
    the next user loads the real one again (from the normal cache, already built)."""
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path))
    _clear_build_caches()
    yield tmp_path
    monkeypatch.undo()
    _clear_build_caches()


# (seq_lens, num_heads, num_kv_heads, head_dim, block_size): one token, lengths on and off
# block boundaries, contexts of many blocks; MHA, GQA 3 (the embedded model), GQA 4, MQA.
_DECODE_CASES = [
    ([1, 8, 13, 16, 17], 2, 2, 16, 8),
    ([16, 21, 5, 200], 9, 3, 64, 16),
    ([3, 32, 40, 1], 8, 1, 64, 16),
    ([64, 127, 2], 8, 2, 128, 32),
    ([300, 45], 4, 4, 32, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("seq_lens", "num_heads", "num_kv_heads", "head_dim", "block_size"), _DECODE_CASES)
def test_native_decode_matches_torch(
    request: pytest.FixtureRequest,
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
) -> None:
    """bf16: K/V widened exactly, float32 accumulation, one rounding at the end; the
    reference does the same in another summation order, hence bf16's tolerance."""
    gen = seeded_generator(request)
    cache = paged_cache(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen)
    # The query as the model hands it over: a strided view of a larger projection output.
    query = torch.randn(len(seq_lens), 2, num_heads, head_dim, generator=gen).to(dtype)[:, 1]
    scale = head_dim**-0.5

    out = cpu_ops.native_decode_attention(
        query, cache.key_cache, cache.value_cache, cache.block_tables, cache.seq_lens, scale
    )
    expected = torch_ops.paged_decode_attention(
        query, cache.reference_key_cache, cache.reference_value_cache, cache.block_tables, cache.seq_lens,
        scale, max(seq_lens),
    )

    assert out.shape == query.shape and out.dtype == dtype
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, **tolerance(dtype))


# (seq_lens, num_heads, num_kv_heads, head_dim, block_size, sliding_window): window 1, a
# window inside one block, on a block boundary, across blocks, equal to the longest context,
# larger than every context; blocks of 1 token.
_WINDOW_CASES = [
    ([1, 8, 13, 40], 2, 2, 16, 8, 1),
    ([16, 21, 5, 200], 9, 3, 64, 16, 5),
    ([3, 32, 40, 17], 8, 1, 64, 16, 16),
    ([64, 127, 2, 300], 8, 2, 32, 32, 45),
    ([64, 127, 2], 4, 2, 32, 16, 127),
    ([64, 127, 2], 4, 2, 32, 16, 1000),
    ([300, 45], 4, 4, 32, 1, 37),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("seq_lens", "num_heads", "num_kv_heads", "head_dim", "block_size", "sliding_window"), _WINDOW_CASES
)
def test_native_decode_with_sliding_window_matches_torch(
    request: pytest.FixtureRequest,
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    sliding_window: int,
    dtype: torch.dtype,
) -> None:
    """Slots before each window are NaN and the blocks wholly before it are block 0 in the
    table: the kernel must start at the window, mid-block where it starts mid-block."""
    gen = seeded_generator(request)
    first_visible = [max(0, n - sliding_window) for n in seq_lens]
    cache = paged_cache(seq_lens, num_kv_heads, head_dim, block_size, dtype, gen, first_visible=first_visible)
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5

    out = cpu_ops.paged_decode_attention(
        query, cache.key_cache, cache.value_cache, cache.block_tables, cache.seq_lens, scale, max(seq_lens),
        sliding_window=sliding_window,
    )
    expected = torch_ops.paged_decode_attention(
        query, cache.reference_key_cache, cache.reference_value_cache, cache.block_tables, cache.seq_lens,
        scale, max(seq_lens), sliding_window=sliding_window,
    )

    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, **tolerance(dtype))


def test_native_decode_reads_outside_the_window_without_one(request: pytest.FixtureRequest) -> None:
    """The poisoning is not vacuous: the same cache without the window gives NaN."""
    gen = seeded_generator(request)
    cache = paged_cache([40], 2, 16, 8, torch.float32, gen, first_visible=[30])
    query = torch.randn(1, 2, 16, generator=gen)
    args = (query, cache.key_cache, cache.value_cache, cache.block_tables, cache.seq_lens, 0.25)
    assert not cpu_ops.native_decode_attention(*args, sliding_window=10).isnan().any()
    assert cpu_ops.native_decode_attention(*args).isnan().all()
    with pytest.raises(ValueError, match="at least 1 token, not 0"):
        cpu_ops.native_decode_attention(*args, sliding_window=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_decode_on_a_serving_sized_batch(request: pytest.FixtureRequest, dtype: torch.dtype) -> None:
    """Random lengths and data (seeded from the test id: a failure reproduces), at the
    embedded model's shape (9 query heads over 3 KV heads, head_dim 64, blocks of 16) and a
    batch the size the engine runs."""
    gen = seeded_generator(request)
    seed = gen.initial_seed()
    seq_lens = torch.randint(1, 700, (48,), generator=gen).tolist()
    cache = paged_cache(seq_lens, 3, 64, 16, dtype, gen)
    query = torch.randn(len(seq_lens), 9, 64, generator=gen).to(dtype)
    out = cpu_ops.native_decode_attention(query, cache.key_cache, cache.value_cache, cache.block_tables, cache.seq_lens, 0.125)
    expected = torch_ops.paged_decode_attention(
        query, cache.reference_key_cache, cache.reference_value_cache, cache.block_tables, cache.seq_lens,
        0.125, max(seq_lens),
    )
    torch.testing.assert_close(out, expected, **tolerance(dtype), msg=lambda m: f"seed {seed}: {m}")


def test_native_decode_is_the_same_on_any_number_of_threads(request: pytest.FixtureRequest) -> None:
    """Each (sequence, KV head) is computed whole by one thread, so the thread count (the
    OpenMP runtime is torch's: torch.set_num_threads applies) cannot change a single bit."""
    gen = seeded_generator(request)
    seq_lens = [90, 3, 250, 16, 41]
    cache = paged_cache(seq_lens, 2, 64, 16, torch.float32, gen)
    query = torch.randn(len(seq_lens), 6, 64, generator=gen)
    args = (query, cache.key_cache, cache.value_cache, cache.block_tables, cache.seq_lens, 0.125)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_ops.native_decode_attention(*args)
        torch.set_num_threads(3)
        three = cpu_ops.native_decode_attention(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


def test_serving_path_uses_the_native_kernel_for_float32_and_bfloat16_and_torch_otherwise(
    request: pytest.FixtureRequest,
) -> None:
    gen = seeded_generator(request)
    seq_lens = [20, 7]
    assert kernel_module(torch.device("cpu")) is cpu_ops
    for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float16):
        cache = paged_cache(seq_lens, 1, 32, 8, dtype, gen)
        query = torch.randn(len(seq_lens), 2, 32, generator=gen).to(dtype)
        keys, values = cache.reference_key_cache, cache.reference_value_cache
        args = (cache.block_tables, cache.seq_lens, 0.2)
        out = cpu_ops.paged_decode_attention(query, keys, values, *args, max(seq_lens))
        if dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(out, cpu_ops.native_decode_attention(query, keys, values, *args))
        else:
            with pytest.raises(ValueError, match="float32 or bfloat16"):
                cpu_ops.native_decode_attention(query, keys, values, *args)
            assert torch.equal(out, torch_ops.paged_decode_attention(query, keys, values, *args, max(seq_lens)))


def test_mismatched_shapes_are_refused() -> None:
    key_cache = torch.zeros(4, 8, 2, 32)
    with pytest.raises(ValueError, match="does not fit"):  # 3 query heads over 2 KV heads
        cpu_ops.native_decode_attention(
            torch.zeros(1, 3, 32), key_cache, key_cache, torch.zeros(1, 1, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32), 1.0,
        )


# ----------------------------------------------------------------------------------------
# the cache write


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize(("num_tokens", "num_kv_heads", "head_dim", "block_size"), [(1, 3, 64, 16), (7, 1, 32, 8), (40, 4, 16, 1)])
def test_native_cache_write_matches_torch(
    request: pytest.FixtureRequest, num_tokens: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> None:
    """K and V as the model hands them over (views into one fused qkv row, so rows are not
    adjacent), random distinct slots with a padding slot (-1) among them, into a cache that
    is NaN elsewhere: the same bits as torch's index_copy_, and nothing else touched."""
    gen = seeded_generator(request)
    num_blocks = num_tokens // block_size + 3
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[num_tokens // 2] = -1
    row = num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, 3 * row + 5, generator=gen).to(dtype)
    key = qkv[:, row : 2 * row].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, 2 * row + 5 :].view(num_tokens, num_kv_heads, head_dim)
    caches = [torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype) for _ in range(4)]
    cpu_ops.reshape_and_cache(key, value, caches[0], caches[1], slots)
    torch_ops.reshape_and_cache(key, value, caches[2], caches[3], slots)
    for ours, reference in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(ours.isnan(), reference.isnan())
        assert torch.equal(ours.nan_to_num(), reference.nan_to_num())
    written = slots[slots >= 0]
    assert torch.equal(caches[0].view(-1, num_kv_heads, head_dim)[written], key[slots >= 0])
    assert int((~caches[1].isnan()).sum()) == len(written) * row


def test_cache_write_casts_through_torch_and_refuses_slots_past_the_cache() -> None:
    key, value = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    cache = torch.zeros(2, 4, 2, 8, dtype=torch.bfloat16), torch.zeros(2, 4, 2, 8, dtype=torch.bfloat16)
    cpu_ops.reshape_and_cache(key, value, *cache, torch.tensor([5, 0]))  # float32 rows, bf16 cache: a cast
    assert torch.equal(cache[0].view(8, 2, 8)[5], key[0].to(torch.bfloat16))
    with pytest.raises(IndexError, match="past the KV cache's 8 slots"):
        cpu_ops.reshape_and_cache(key.bfloat16(), value.bfloat16(), *cache, torch.tensor([1, 8]))
    assert torch.equal(cache[0].view(8, 2, 8)[1], torch.zeros(2, 8, dtype=torch.bfloat16))  # nothing written
    with pytest.raises((IndexError, RuntimeError)):  # fewer slots than rows: torch's error, no read past them
        cpu_ops.reshape_and_cache(key.bfloat16(), value.bfloat16(), *cache, torch.tensor([1]))


# ----------------------------------------------------------------------------------------
# building the library


def test_library_is_built_once_and_then_reused(fresh_build: Path) -> None:
    native_build.load_library("paged_attention_cpu")
    built = sorted(fresh_build.glob("paged_attention_cpu-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native_build.load_library.cache_clear()  # a new process, as far as the build knows
    native_build.load_library("paged_attention_cpu")
    assert sorted(fresh_build.glob("*")) == built  # no temporary files left either
    assert built[0].stat().st_mtime_ns == stamp


def test_a_configured_cache_folder_that_does_not_exist_yet_is_created(fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = fresh_build / "not" / "yet"
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(folder))
    native_build.load_library("paged_attention_cpu")
    assert len(list(folder.glob("paged_attention_cpu-*.so"))) == 1


def test_loading_the_library_keeps_subnormal_floats(fresh_build: Path) -> None:
    """A library linked with -ffast-math would switch the whole process to flush-to-zero
    when it loads (crtfastmath.o), changing every float computation around it."""
    tiny = torch.finfo(torch.float32).tiny
    native_build.load_library("paged_attention_cpu")
    assert (torch.tensor([tiny]) / 4).item() > 0.0
    assert halve(5e-324 * 2) == 5e-324


def halve(value: float) -> float:
    """Python float arithmetic (SSE doubles in the same process) on a subnormal."""
    return value / 2


def test_a_compile_error_names_the_file_and_the_compiler_message(fresh_build: Path) -> None:
    source = fresh_build / "broken_kernel.c"
    source.write_text("int broken(void) { return undeclared_name; }\n")
    with pytest.raises(native_build.NativeBuildError, match=r"broken_kernel\.c(.|\n)*undeclared_name"):
        native_build.build_library(source)
    assert list(fresh_build.glob("*.so")) == []


def test_without_a_compiler_serving_falls_back_to_torch_with_a_warning(
    request: pytest.FixtureRequest, fresh_build: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", str(fresh_build / "no-such-compiler"))
    with pytest.raises(native_build.NativeBuildError, match="does not run"):
        native_build.load_library("paged_attention_cpu")
    gen = seeded_generator(request)
    cache = paged_cache([12, 30], 2, 16, 8, torch.float32, gen)
    query = torch.randn(2, 4, 16, generator=gen)
    args = (query, cache.reference_key_cache, cache.reference_value_cache, cache.block_tables, cache.seq_lens, 0.25, 30)
    with caplog.at_level(logging.WARNING, logger="pagedserve.kernels.cpu_ops"):
        out = cpu_ops.paged_decode_attention(*args)
        cpu_ops.paged_decode_attention(*args)
    assert torch.equal(out, torch_ops.paged_decode_attention(*args))
    warnings = [r.getMessage() for r in caplog.records if r.name == "pagedserve.kernels.cpu_ops"]
    assert len(warnings) == 1 and "torch path" in warnings[0] and "no-such-compiler" in warnings[0]
