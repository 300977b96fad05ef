"""Offline throughput: the in-process engine, and the services over HTTP, vs HF
transformers `generate` with static batches, on 64 seeded synthetic requests of variable
length.

    python -m benchmarks.offline_throughput [--num-requests 64] [--hf-batch 32] [--no-hf] [--no-services]

Each request has its own prompt length (16-512 tokens) and its own `max_tokens` (8-256,
EOS ignored). The engine batches continuously; HF runs static batches, each padded and
generating until its longest request is done, as a traditional server does, and only the
tokens each request asked for count as output. The services (`pagedserve up`, the same
dtype, weight format, batch and KV limits) get every request at once as a plain (not
streamed) completion over HTTP, as an offline client of a server would send them, after one
warm-up request. Prints a table, the ratios, peak RSS, and a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import time

import httpx
import torch

from pagedserve.services.cli import subcommand_parser
from pagedserve.services.config_flags import config_argv
from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.services.launcher import up_in_background
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits


def make_requests(vocab_size: int, num_requests: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) pairs; token ids avoid the special tokens (< 100)."""
    rng = random.Random(seed)
    return [
        ([rng.randrange(100, vocab_size) for _ in range(rng.randint(16, 512))], rng.randint(8, 256))
        for _ in range(num_requests)
    ]


def bench_engine(engine: LLMEngine, requests: list[tuple[list[int], int]]) -> tuple[float, int]:
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for _, m in requests]
    start = time.perf_counter()
    completions = engine.generate([p for p, _ in requests], params)
    return time.perf_counter() - start, sum(len(c.token_ids) for c in completions)


async def _complete_all(url: str, requests: list[tuple[list[int], int]]) -> tuple[float, int]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=httpx.Limits(max_connections=len(requests) + 1)) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]

        async def complete(prompt: list[int], max_tokens: int) -> int:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
            response = await client.post(f"{url}/v1/completions", json=body)
            response.raise_for_status()
            return int(response.json()["usage"]["completion_tokens"])

        await complete(requests[0][0], 4)  # warm-up
        start = time.perf_counter()
        counts = await asyncio.gather(*(complete(p, m) for p, m in requests))
        return time.perf_counter() - start, sum(counts)


def bench_services(config: EngineConfig, requests: list[tuple[list[int], int]]) -> tuple[float, int]:
    with up_in_background(config_argv(config, subcommand_parser("up"))) as url:
        return asyncio.run(_complete_all(url, requests))


def bench_hf(engine: LLMEngine, requests: list[tuple[list[int], int]], batch_size: int) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    source = engine.model_source
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32, **kwargs).eval()
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
    useful = 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(requests), batch_size):
            batch = requests[i : i + batch_size]
            width = max(len(p) for p, _ in batch)
            longest = max(m for _, m in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
            model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                           do_sample=False, pad_token_id=pad)
            useful += sum(m for _, m in batch)
    return time.perf_counter() - start, useful


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--hf-batch", type=int, nargs="*", default=[32], help="HF static batch sizes to time")
    parser.add_argument("--no-hf", action="store_true", help="skip HF")
    parser.add_argument("--no-services", action="store_true", help="skip the services over HTTP")
    parser.add_argument("--dtype", default="auto", help="the engine's (auto: bf16 where the CPU has AMX or AVX512-BF16)")
    parser.add_argument("--weight-format", default="auto", choices=["auto", "quantized", "dequantized"])
    args = parser.parse_args()

    config = EngineConfig(dtype=args.dtype, weight_format=args.weight_format, limits=SchedulingLimits(max_num_seqs=args.max_num_seqs))
    engine = LLMEngine(config)
    requests = make_requests(engine.runner.model_config.vocab_size, args.num_requests)
    print(f"{len(requests)} requests, prompts 16-512 tokens, outputs 8-256 tokens (EOS ignored), "
          f"torch threads={torch.get_num_threads()}, device={engine.runner.device}, dtype={engine.runner.dtype}, "
          f"--weight-format {args.weight_format} (int4 for steps of up to {engine.runner.int4_max_rows:,} rows)")
    rows = [("pagedserve engine (continuous batching)", *bench_engine(engine, requests))]
    if not args.no_services:
        rows.append(("pagedserve services (`pagedserve up`, HTTP)", *bench_services(config, requests)))
    if not args.no_hf:
        for batch in args.hf_batch:
            rows.append((f"HF generate, static batch {batch}", *bench_hf(engine, requests, batch)))
    print("\n| system | output tokens | seconds | output tok/s |\n|---|---|---|---|")
    for name, elapsed, tokens in rows:
        print(f"| {name} | {tokens} | {elapsed:.1f} | {tokens / elapsed:.1f} |")
    tok_s = {name: tokens / elapsed for name, elapsed, tokens in rows}
    engine_tps = tok_s[rows[0][0]]
    services_tps = next((v for name, v in tok_s.items() if name.startswith("pagedserve services")), None)
    best_hf = max((v for name, v in tok_s.items() if name.startswith("HF")), default=None)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if best_hf:
        print(f"\nengine / best HF static batch: {engine_tps / best_hf:.2f}x")
        if services_tps:
            print(f"services / best HF static batch: {services_tps / best_hf:.2f}x")
    if services_tps:
        print(f"services / engine: {services_tps / engine_tps:.1%}")
    print(f"peak RSS (this process: the engine and HF): {peak_rss_mib:.0f} MiB")
    ratio = lambda value: round(value / best_hf, 2) if value and best_hf else None  # noqa: E731
    print(json.dumps({
        "engine_tok_s": round(engine_tps, 1),
        "services_tok_s": round(services_tps, 1) if services_tps else None,
        "best_hf_tok_s": round(best_hf, 1) if best_hf else None,
        "ratio_vs_best_hf": ratio(engine_tps),
        "services_ratio_vs_best_hf": ratio(services_tps),
        "peak_rss_mib": round(peak_rss_mib),
    }))

if __name__ == "__main__":
    main()
