"""CPU speed by weight format and dtype: in-process engine tok/s at batch 1 / 8 / 32 for
fp32, bf16 and int4-quantized weights side by side in one run, each as a fraction of the
machine's limit measured in the same run.

    python -m benchmarks.cpu_speed [--batches 1,8,32] [--prompt-len 128] [--max-tokens 64]
                                   [--formats fp32,bf16,int4-bf16,int4-fp32] [--repeats 1]

Each cell: `batch` requests of `prompt-len` random tokens generating `max-tokens` tokens
each (EOS ignored) with max_num_seqs = batch, so the decode steps run at that batch; tok/s
counts output tokens over the whole run, prefill included. The limit of a cell is the
roofline of its decode step: the weights must stream from memory once per step (bytes of
every matmul's weights / measured copy bandwidth) and 2 FLOPs per weight per token must be
computed (at the measured matmul FLOP/s of the dtype the matmuls run in); tok/s at that
step time is the limit. Other processes on a shared machine lower every figure alike:
compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass

import torch
from torch import nn

from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.services.executor.cpu_features import auto_cpu_dtype, detect
from pagedserve.services.executor.quantized_linear import Int4Linear
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits

KV_CACHE_BYTES = 512 << 20  # per engine: room for 32 sequences of 512 tokens in fp32

# name -> (dtype, weight format)
FORMATS = {
    "fp32": ("float32", "dequantized"),
    "bf16": ("bfloat16", "dequantized"),
    "int4-bf16": ("bfloat16", "quantized"),
    "auto-bf16": ("bfloat16", "auto"),  # int4 for steps of few rows, dense bf16 for the rest
    "int4-fp32": ("float32", "quantized"),
}


@dataclass(frozen=True)
class MachineLimits:
    copy_bytes_per_s: float  # read + write of a copy far larger than the caches
    flops_per_s: dict[torch.dtype, float]  # a large square matmul


def _best_time(run: object, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def measure_limits() -> MachineLimits:
    """Best of several tries: a shared machine only ever makes a try slower."""
    source = torch.empty(256 << 20, dtype=torch.uint8).fill_(1)
    target = torch.empty_like(source)
    copy_s = _best_time(lambda: target.copy_(source), 8)
    flops: dict[torch.dtype, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
        flops[dtype] = 2 * 2048**3 / _best_time(lambda: torch.mm(a, b), 5)
    return MachineLimits(2 * source.numel() / copy_s, flops)


def matmul_weights(model: nn.Module, rows: int) -> tuple[int, int]:
    """(bytes, weights) of the matmul weights a decode step of `rows` rows streams from
    memory (an Int4Linear with a dense copy reads the dense one above its max_rows)."""
    nbytes = count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nbytes += module.weight.numel() * module.weight.element_size()
            count += module.weight.numel()
        elif isinstance(module, Int4Linear):
            if module.dense is not None and rows > module.max_rows:
                nbytes += module.dense.numel() * module.dense.element_size()
            else:
                nbytes += module.packed.numel() + module.scales_and_zeros.numel() * 2
            count += module.in_features * module.out_features
    return nbytes, count


def run_cell(engine: LLMEngine, batch: int, prompt_len: int, max_tokens: int, seed: int) -> float:
    rng = random.Random(seed)
    vocab = engine.runner.model_config.vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(prompt_len)] for _ in range(batch)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    completions = engine.generate(prompts, [params] * batch)
    elapsed = time.perf_counter() - start
    return sum(len(c.token_ids) for c in completions) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell; the best counts")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    formats = args.formats.split(",")

    features = detect()
    auto_dtype, reason = auto_cpu_dtype(features)
    limits = measure_limits()
    print(f"CPU: {features.model_name}, {torch.get_num_threads()} torch threads; dtype auto -> "
          f"{str(auto_dtype).removeprefix('torch.')} ({reason})")
    print(f"measured: copy {limits.copy_bytes_per_s / 1e9:.1f} GB/s; matmul fp32 "
          f"{limits.flops_per_s[torch.float32] / 1e9:.0f} GFLOP/s, bf16 {limits.flops_per_s[torch.bfloat16] / 1e9:.0f} GFLOP/s")

    # Every engine loaded first, then the cells interleaved (each batch size for every format
    # in turn, best of --repeats): on a shared machine, load from other processes then falls
    # on all formats alike instead of on whichever happened to run during it.
    engines: dict[str, LLMEngine] = {}
    compute_dtypes: dict[str, torch.dtype] = {}
    for name in formats:
        dtype, weight_format = FORMATS[name]
        engine = LLMEngine(EngineConfig(
            dtype=dtype, weight_format=weight_format, kv_cache_memory_bytes=KV_CACHE_BYTES,
            limits=SchedulingLimits(max_num_seqs=max(batches)),
        ))
        weight_bytes, num_weights = matmul_weights(engine.runner.model, 1)
        compute_dtypes[name] = torch.bfloat16 if dtype == "bfloat16" or weight_format == "quantized" else torch.float32
        run_cell(engine, 2, 16, 4, seed=99)  # warm-up: kernels built, allocator primed
        engines[name] = engine
        print(f"  {name}: matmul weights read at batch 1: {weight_bytes / 1e6:.0f} MB "
              f"({weight_bytes / num_weights:.2f} bytes each)", flush=True)
    results: dict[str, dict[int, tuple[float, float]]] = {name: {} for name in formats}
    for batch in batches:
        for name in formats:
            tok_s = max(run_cell(engines[name], batch, args.prompt_len, args.max_tokens, seed=batch) for _ in range(args.repeats))
            weight_bytes, num_weights = matmul_weights(engines[name].runner.model, batch)
            compute_s = 2 * num_weights * batch / limits.flops_per_s[compute_dtypes[name]]
            step_s = max(weight_bytes / limits.copy_bytes_per_s, compute_s)
            results[name][batch] = (tok_s, tok_s / (batch / step_s))
            print(f"  batch {batch} {name}: {tok_s:.1f} tok/s", flush=True)
    for engine in engines.values():
        engine.close()

    print(f"\n{args.prompt_len}-token prompts, {args.max_tokens} output tokens each (EOS ignored); "
          "tok/s (fraction of the roofline limit)\n")
    print("| weights | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for name in formats:
        cells = [f"{results[name][b][0]:.1f} ({results[name][b][1]:.0%})" for b in batches]
        print(f"| {name} | " + " | ".join(cells) + " |")
    base = formats[0]
    for name in formats[1:]:
        print(f"{name} / {base}: " + ", ".join(f"{results[name][b][0] / results[base][b][0]:.2f}x" for b in batches))
    print(json.dumps({name: {b: round(results[name][b][0], 1) for b in batches} for name in formats}))


if __name__ == "__main__":
    main()
