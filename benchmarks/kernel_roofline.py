"""Kernel micro-benchmarks: how close the paged-KV kernels get to the memory roofline.

Decode attention is memory-bound (every step reads the whole K/V context once), so each
row reports the bytes it must move (K/V read + query read + output write) over the
measured time, as a fraction of the device's peak bandwidth measured here with a large
device-to-device copy. A baseline runs the same attention with torch
`scaled_dot_product_attention` over the same K/V stored contiguously, which is what the
paged layout costs relative to a dense cache. reshape_and_cache is compared with the
torch implementation; prefill reports TFLOP/s as well, as it is compute-bound.

On CUDA the Triton kernels run, timed with CUDA events (median of --iters runs after
--warmup), each call replayed from a CUDA graph where it can be captured so host launch
overhead is not counted (a decode step in a server runs from a graph too). On CPU there is
no Triton: the CPU path (kernels/cpu_ops.py: the C decode attention kernel, torch ops for
the rest) runs on small shapes, and the output says so.

    python benchmarks/kernel_roofline.py               # defaults for the device found
    python -m benchmarks.kernel_roofline --batch-sizes 1,64 --context-lens 2048,8192 --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagedserve.kernels import torch_ops
from pagedserve.kernels.paged_attention_ops import PagedAttentionOps
from pagedserve.kernels.dispatch import kernel_module

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class BenchConfig:
    """Everything one run measures, resolved from the flags and the device."""

    device: torch.device
    dtype: torch.dtype
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    batch_sizes: list[int]
    context_lens: list[int]
    prefill_batch_sizes: list[int]
    prefill_lens: list[int]
    warmup: int
    iters: int
    max_kv_gib: float
    copy_gib: float
    use_cuda_graphs: bool


@dataclass(frozen=True)
class Row:
    """One measured shape: the kernel under test and its baseline."""

    kernel: str
    batch: int
    context_len: int
    query_len: int
    kernel_s: float
    kernel_mode: str  # "graph" or "eager"
    baseline_name: str
    baseline_s: float
    bytes_moved: int
    flops: int
    max_abs_err: float


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _parse_args(argv: Sequence[str] | None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="fp16")
    parser.add_argument("--num-heads", type=int, default=32, help="query heads (Llama-3-8B: 32)")
    parser.add_argument("--num-kv-heads", type=int, default=8, help="KV heads (Llama-3-8B: 8)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--batch-sizes", type=_int_list, help="decode batches (default per device)")
    parser.add_argument("--context-lens", type=_int_list, help="decode contexts (default per device)")
    parser.add_argument("--prefill-batch-sizes", type=_int_list, help="prompts per prefill batch")
    parser.add_argument("--prefill-lens", type=_int_list, help="prompt lengths")
    parser.add_argument("--warmup", type=int, help="untimed runs first (default 10 CUDA, 2 CPU)")
    parser.add_argument("--iters", type=int, help="timed runs, median reported (100 CUDA, 5 CPU)")
    parser.add_argument(
        "--max-kv-gib",
        type=float,
        default=32.0,
        help="skip shapes whose K/V, paged plus the dense copy for SDPA, exceed this",
    )
    parser.add_argument("--copy-gib", type=float, help="buffer for the peak-bandwidth copy")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="time eager launches")
    args = parser.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    return BenchConfig(
        device=device,
        dtype=_DTYPES[args.dtype],
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        block_size=args.block_size,
        # CPU defaults stay small: the torch reference gathers whole contexts per call.
        batch_sizes=args.batch_sizes or ([1, 8, 32, 64, 128, 256] if on_cuda else [1, 4]),
        context_lens=args.context_lens
        or ([128, 1024, 4096, 16384, 32768] if on_cuda else [128, 512]),
        prefill_batch_sizes=args.prefill_batch_sizes or ([1, 4, 16] if on_cuda else [1]),
        prefill_lens=args.prefill_lens or ([512, 2048, 8192] if on_cuda else [128]),
        warmup=args.warmup if args.warmup is not None else (10 if on_cuda else 2),
        iters=args.iters if args.iters is not None else (100 if on_cuda else 5),
        max_kv_gib=args.max_kv_gib,
        copy_gib=args.copy_gib if args.copy_gib is not None else (2.0 if on_cuda else 0.25),
        use_cuda_graphs=on_cuda and not args.no_cuda_graphs,
    )


# ----------------------------------------------------------------------------------------
# timing


def _capture(fn: Callable[[], object]) -> Callable[[], object]:
    """A CUDA graph of one `fn()` call, returned as its replay.

    Warm-up runs on a side stream first (torch's recipe), which also compiles the Triton
    kernels so that no compilation happens under capture.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _median_s(fn: Callable[[], object], config: BenchConfig, capturable: bool) -> tuple[float, str]:
    """Median seconds of one call, and whether it was replayed from a graph or launched."""
    mode = "eager"
    if config.device.type == "cuda" and config.use_cuda_graphs and capturable:
        fn = _capture(fn)
        mode = "graph"
    for _ in range(config.warmup):
        fn()
    if config.device.type != "cuda":
        samples = []
        for _ in range(config.iters):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples), mode
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(config.iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(config.iters)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3, mode


def _peak_bandwidth_bytes_per_s(config: BenchConfig) -> float:
    """Achieved bandwidth of a large device-to-device copy (bytes read + written / time):
    the practical roofline the kernels are held to."""
    num_bytes = int(config.copy_gib * 2**30)
    src = torch.empty(num_bytes, dtype=torch.uint8, device=config.device).random_(0, 255)
    dst = torch.empty_like(src)
    seconds, _ = _median_s(lambda: dst.copy_(src), config, capturable=False)
    del src, dst
    return 2 * num_bytes / seconds


# ----------------------------------------------------------------------------------------
# inputs


@dataclass
class PagedBatch:
    """Uniform-length sequences in a paged cache (shuffled block ids, as after churn) and
    the same K/V laid out contiguously for the SDPA baseline."""

    key_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [batch, blocks_per_seq]
    seq_lens: torch.Tensor  # int32 [batch]
    dense_key: torch.Tensor  # [batch, num_kv_heads, context_len, head_dim]
    dense_value: torch.Tensor


def _paged_batch(config: BenchConfig, batch: int, context_len: int) -> PagedBatch:
    blocks_per_seq = -(-context_len // config.block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, config.block_size, config.num_kv_heads, config.head_dim)
    device = config.device
    key_cache = torch.randn(shape, dtype=config.dtype, device=device)
    value_cache = torch.randn(shape, dtype=config.dtype, device=device)
    block_tables = (
        torch.randperm(num_blocks, device=device).to(torch.int32).view(batch, blocks_per_seq)
    )

    def dense(cache: torch.Tensor) -> torch.Tensor:
        gathered = cache[block_tables.long()]  # [batch, blocks, block_size, kv_heads, d]
        flat = gathered.flatten(1, 2)[:, :context_len]
        return flat.transpose(1, 2).contiguous()

    return PagedBatch(
        key_cache,
        value_cache,
        block_tables,
        torch.full((batch,), context_len, dtype=torch.int32, device=device),
        dense(key_cache),
        dense(value_cache),
    )


def _kv_bytes(config: BenchConfig, num_tokens: int) -> int:
    """Bytes of K and V for `num_tokens` tokens of one layer."""
    element = torch.empty((), dtype=config.dtype).element_size()
    return 2 * num_tokens * config.num_kv_heads * config.head_dim * element


def _fits(config: BenchConfig, num_tokens: int) -> bool:
    # The paged cache plus its dense copy for the baseline.
    return 2 * _kv_bytes(config, num_tokens) <= config.max_kv_gib * 2**30


# ----------------------------------------------------------------------------------------
# benchmarks


def _bench_decode(config: BenchConfig, ops: PagedAttentionOps, batch: int, context_len: int) -> Row:
    paged = _paged_batch(config, batch, context_len)
    scale = config.head_dim**-0.5
    query = torch.randn(batch, config.num_heads, config.head_dim, dtype=config.dtype, device=config.device)
    dense_query = query[:, :, None, :]  # [batch, heads, 1, d]

    def run_kernel() -> torch.Tensor:
        return ops.paged_decode_attention(
            query, paged.key_cache, paged.value_cache, paged.block_tables, paged.seq_lens, scale, context_len
        )

    def run_sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(
            dense_query, paged.dense_key, paged.dense_value, scale=scale, enable_gqa=True
        )

    error = (run_kernel().float() - run_sdpa()[:, :, 0].float()).abs().max().item()
    kernel_s, mode = _median_s(run_kernel, config, capturable=True)
    sdpa_s, _ = _median_s(run_sdpa, config, capturable=True)
    element = query.element_size()
    io_bytes = 2 * query.numel() * element  # query read + output written
    flops = 4 * batch * config.num_heads * context_len * config.head_dim
    return Row(
        "decode", batch, context_len, 1, kernel_s, mode, "sdpa dense", sdpa_s,
        _kv_bytes(config, batch * context_len) + io_bytes, flops, error,
    )  # fmt: skip


def _bench_prefill(config: BenchConfig, ops: PagedAttentionOps, batch: int, prompt_len: int) -> Row:
    """Whole prompts (q_len == seq_len), so the dense baseline is plain causal SDPA."""
    paged = _paged_batch(config, batch, prompt_len)
    scale = config.head_dim**-0.5
    num_tokens = batch * prompt_len
    query = torch.randn(
        num_tokens, config.num_heads, config.head_dim, dtype=config.dtype, device=config.device
    )
    query_start_loc = torch.arange(
        0, num_tokens + 1, prompt_len, dtype=torch.int32, device=config.device
    )
    dense_query = query.view(batch, prompt_len, config.num_heads, config.head_dim).transpose(1, 2)

    def run_kernel() -> torch.Tensor:
        return ops.paged_prefill_attention(
            query, paged.key_cache, paged.value_cache, paged.block_tables, query_start_loc,
            paged.seq_lens, scale, prompt_len, prompt_len,
        )  # fmt: skip

    def run_sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(
            dense_query, paged.dense_key, paged.dense_value, scale=scale, is_causal=True, enable_gqa=True
        )

    expected = run_sdpa().transpose(1, 2).reshape(num_tokens, config.num_heads, config.head_dim)
    error = (run_kernel().float() - expected.float()).abs().max().item()
    # The torch path loops over sequences on the host (.tolist()): not capturable.
    capturable = config.device.type == "cuda" and ops is not torch_ops
    kernel_s, mode = _median_s(run_kernel, config, capturable=capturable)
    sdpa_s, _ = _median_s(run_sdpa, config, capturable=True)
    io_bytes = 2 * query.numel() * query.element_size()
    flops = 2 * batch * config.num_heads * prompt_len * prompt_len * config.head_dim  # causal half
    return Row(
        "prefill", batch, prompt_len, prompt_len, kernel_s, mode, "sdpa causal", sdpa_s,
        _kv_bytes(config, num_tokens) + io_bytes, flops, error,
    )  # fmt: skip


def _bench_reshape_and_cache(config: BenchConfig, ops: PagedAttentionOps, num_tokens: int) -> Row:
    """Writing one step's K/V: `num_tokens` new tokens into scattered slots."""
    blocks = -(-num_tokens // config.block_size) * 4  # room to scatter into
    shape = (blocks, config.block_size, config.num_kv_heads, config.head_dim)
    key_cache = torch.zeros(shape, dtype=config.dtype, device=config.device)
    value_cache = torch.zeros_like(key_cache)
    new_shape = (num_tokens, config.num_kv_heads, config.head_dim)
    key = torch.randn(new_shape, dtype=config.dtype, device=config.device)
    value = torch.randn(new_shape, dtype=config.dtype, device=config.device)
    slot_mapping = torch.randperm(blocks * config.block_size, device=config.device)[:num_tokens]

    def run_kernel() -> None:
        ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)

    def run_torch() -> None:
        torch_ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)

    capturable = config.device.type == "cuda" and ops is not torch_ops
    kernel_s, mode = _median_s(run_kernel, config, capturable=capturable)
    # torch_ops checks `slot_mapping >= 0` on the host: a sync, so never graphed.
    torch_s, _ = _median_s(run_torch, config, capturable=False)
    return Row(
        "reshape_and_cache", num_tokens, 0, 1, kernel_s, mode, "torch index_copy_", torch_s,
        2 * _kv_bytes(config, num_tokens), 0, 0.0,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------
# report


def _print_table(rows: list[Row], peak_bytes_per_s: float) -> None:
    header = (
        f"{'kernel':<18} {'batch':>5} {'context':>7} {'q_len':>5} {'time us':>9} {'mode':>5} "
        f"{'GB/s':>8} {'%peak':>6} {'TFLOP/s':>7}   {'baseline':<17} {'time us':>9} "
        f"{'speedup':>7} {'max|err|':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        bandwidth = row.bytes_moved / row.kernel_s
        print(
            f"{row.kernel:<18} {row.batch:>5} {row.context_len or '-':>7} {row.query_len:>5} "
            f"{row.kernel_s * 1e6:>9.1f} {row.kernel_mode:>5} {bandwidth / 1e9:>8.1f} "
            f"{100 * bandwidth / peak_bytes_per_s:>5.1f}% {row.flops / row.kernel_s / 1e12:>7.2f}   "
            f"{row.baseline_name:<17} {row.baseline_s * 1e6:>9.1f} "
            f"{row.baseline_s / row.kernel_s:>6.2f}x {row.max_abs_err:>8.1e}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    config = _parse_args(argv)
    on_cuda = config.device.type == "cuda"
    ops = kernel_module(config.device)
    if on_cuda:
        print(f"device: {torch.cuda.get_device_name(config.device)}; kernels: Triton (kernels/triton_ops.py)")
    else:
        print(
            "device: CPU; kernels: the CPU path (kernels/cpu_ops.py: C decode attention, torch "
            "ops for the rest) on small shapes.\nNO TRITON NUMBERS: Triton kernels need CUDA (the interpreter is a "
            "correctness tool, not a benchmark)."
        )
    print(
        f"dtype {config.dtype}, {config.num_heads} query heads, {config.num_kv_heads} KV heads, "
        f"head_dim {config.head_dim}, block_size {config.block_size}; median of {config.iters} "
        f"runs after {config.warmup} warm-up"
    )
    peak = _peak_bandwidth_bytes_per_s(config)
    print(f"peak bandwidth (device-to-device copy of {config.copy_gib:g} GiB): {peak / 1e9:.1f} GB/s\n")

    rows: list[Row] = []
    skipped: list[str] = []
    for batch in config.batch_sizes:
        rows.append(_bench_reshape_and_cache(config, ops, batch))
    for batch in config.batch_sizes:
        for context_len in config.context_lens:
            if not _fits(config, batch * context_len):
                skipped.append(f"decode batch {batch} x context {context_len}")
                continue
            rows.append(_bench_decode(config, ops, batch, context_len))
            if on_cuda:
                torch.cuda.empty_cache()  # the next shape may need all of it
    for batch in config.prefill_batch_sizes:
        for prompt_len in config.prefill_lens:
            if not _fits(config, batch * prompt_len):
                skipped.append(f"prefill batch {batch} x prompt {prompt_len}")
                continue
            rows.append(_bench_prefill(config, ops, batch, prompt_len))
            if on_cuda:
                torch.cuda.empty_cache()

    _print_table(rows, peak)
    if skipped:
        print(
            f"\nskipped (K/V plus its dense copy over --max-kv-gib {config.max_kv_gib:g}): "
            + ", ".join(skipped)
        )
    print(
        "\nGB/s counts K/V read once plus query read and output written (for "
        "reshape_and_cache: K/V read and written); %peak is against the copy above."
    )


if __name__ == "__main__":
    main()
