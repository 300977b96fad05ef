"""Transport overhead: output tokens/s of 32 concurrent streams through the services
(`pagedserve up`: HTTP gateway -> ZeroMQ -> scheduler -> ZeroMQ -> executor) vs the
in-process engine on the same workload.

    python -m benchmarks.transport_overhead [--streams 32] [--max-tokens 128] [--repeats 2] [--no-sync]

Both sides get the same seeded requests (prompts given as token ids, so tokenization is
not part of either measurement; EOS ignored so every request produces exactly its
`max_tokens`), the same scheduler limits and KV budget, and a warm-up request before the
clock starts. The services are timed from the client's side: from sending the first
request to receiving the last `[DONE]` of 32 SSE streams, once with asynchronous
scheduling (step n+1 is scheduled while the executor runs step n) and once without (the
default; `--no-sync` skips that run). The paths take turns, `--repeats` rounds of each
(a shared VM's speed drifts by 10% over minutes: interleaving puts the drift on every path
alike), and each path's best round is reported. The design's goal is that the split costs a few
percent of a decode step; the target here is that the services keep at least 95% of the
engine's tokens/s. Ends with a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import time

import httpx
import torch

from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.services.launcher import up_in_background
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits

KV_CACHE_MEMORY = 512 << 20


def make_prompts(vocab_size: int, num_streams: int, seed: int = 0) -> list[list[int]]:
    """Prompt token ids of 16-256 tokens; ids avoid the special tokens (< 100)."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size) for _ in range(rng.randint(16, 256))] for _ in range(num_streams)]


def bench_engine(prompts: list[list[int]], max_tokens: int, max_num_seqs: int) -> tuple[float, int]:
    engine = LLMEngine(EngineConfig(kv_cache_memory_bytes=KV_CACHE_MEMORY, limits=SchedulingLimits(max_num_seqs=max_num_seqs)))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine.generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    completions = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    del engine
    gc.collect()
    return elapsed, sum(len(c.token_ids) for c in completions)


async def _stream(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int) -> int:
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    completion_tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            # Only the usage chunk is parsed: the client shares the machine's cores with the
            # services, and parsing every token's chunk would bill its own work to them.
            if line.startswith("data: ") and '"usage":{' in line.replace(" ", ""):
                completion_tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return completion_tokens


async def _run_streams(url: str, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    limits = httpx.Limits(max_connections=len(prompts) + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        await _stream(client, url, model, prompts[0], 4)  # warm-up
        start, cpu_start = time.perf_counter(), time.process_time()
        counts = await asyncio.gather(*(_stream(client, url, model, p, max_tokens) for p in prompts))
        elapsed = time.perf_counter() - start
        print(f"  client: {time.process_time() - cpu_start:.1f} s of CPU in {elapsed:.1f} s", flush=True)
        return elapsed, sum(counts)


def bench_services(
    prompts: list[list[int]], max_tokens: int, max_num_seqs: int, async_scheduling: bool = True
) -> tuple[float, int]:
    args = ["--kv-cache-memory", str(KV_CACHE_MEMORY), "--max-num-seqs", str(max_num_seqs),
            "--async-scheduling" if async_scheduling else "--no-async-scheduling"]
    with up_in_background(args) as url:
        return asyncio.run(_run_streams(url, prompts, max_tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of every path, taken in turns")
    parser.add_argument("--no-sync", action="store_true", help="skip the services run with synchronous scheduling")
    args = parser.parse_args()

    from pagedserve.services.executor.model_config import load_model_config
    from pagedserve.shared.model_source import resolve_model_source

    vocab_size = load_model_config(resolve_model_source(None)).vocab_size
    prompts = make_prompts(vocab_size, args.streams)
    print(f"{args.streams} concurrent streams, prompts 16-256 tokens, {args.max_tokens} output tokens each "
          f"(EOS ignored), {os.cpu_count()} CPUs, torch threads={torch.get_num_threads()}")
    modes = ["async"] + ([] if args.no_sync else ["sync"])
    rounds: dict[str, list[tuple[float, int]]] = {"engine": [], **{mode: [] for mode in modes}}
    for _ in range(args.repeats):
        rounds["engine"].append(bench_engine(prompts, args.max_tokens, args.streams))
        for mode in modes:
            rounds[mode].append(bench_services(prompts, args.max_tokens, args.streams, async_scheduling=mode == "async"))
    best = {path: min(results) for path, results in rounds.items()}  # (seconds, tokens): the fastest round
    print("rounds (s): " + "; ".join(f"{path} " + ", ".join(f"{s:.1f}" for s, _ in results) for path, results in rounds.items()))
    engine_s, engine_tokens = best.pop("engine")
    runs = best
    engine_tps = engine_tokens / engine_s
    print("\n| path | output tokens | seconds | output tok/s | of the engine's |\n|---|---|---|---|---|")
    print(f"| in-process engine | {engine_tokens} | {engine_s:.1f} | {engine_tps:.1f} | 100% |")
    summary: dict[str, float] = {"engine_tok_s": round(engine_tps, 1)}
    for mode, (services_s, services_tokens) in runs.items():
        if services_tokens != engine_tokens:
            raise RuntimeError(f"services ({mode}) produced {services_tokens} tokens, the engine {engine_tokens}")
        services_tps = services_tokens / services_s
        print(f"| services, {mode} scheduling (HTTP + ZeroMQ, 3 processes + Redis) | {services_tokens} | "
              f"{services_s:.1f} | {services_tps:.1f} | {services_tps / engine_tps:.1%} |")
        summary[f"services_{mode}_tok_s"] = round(services_tps, 1)
        summary[f"overhead_{mode}_fraction"] = round(1 - services_tps / engine_tps, 3)
    print(f"\nservices (async) overhead {summary['overhead_async_fraction']:.1%}; target <= 5%")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
