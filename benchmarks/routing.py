"""Cache-aware vs round-robin routing over replicas: hit rate and TTFT.

    python -m benchmarks.routing [--tenants 8] [--requests 48] [--concurrency 3] [--seed 0]

Real processes, as `pagedserve up --replicas 2` starts them (redis-server, two schedulers
with an executor each, the embedded model in float32), plus two gateways in front of the
same replicas: one routing by cached prefix (the default), one in turn (`--routing
round_robin`, the cache-blind baseline every load balancer gives).

Workload: `--tenants` tenants, each with its own system prompt of about `--prefix-tokens`
tokens, asking short questions (`--max-tokens` each) in a seeded random order,
`--concurrency` at a time, streamed. Each replica's KV cache holds about half the
tenants' prefixes (`--kv-blocks`, default: that plus a little room for the requests in
flight): round robin makes every replica see every tenant, and their LRU caches thrash;
routing by prefix keeps each tenant where its prefix is.

Each phase first sends every tenant's first request (in a seeded order, the same for both
policies): a tenant's first request misses under any policy, so these are reported apart
("first sight") and the measured requests that follow are the steady state. Measured per
policy: hit rate = sum of `usage.prompt_tokens_details.cached_tokens` / sum of prompt
tokens, and the mean and median time to first token. The round-robin phase runs first,
the cache-aware one second with other tenants' prompts (a different seed), so that
nothing the first left in the caches helps the second. Ends with a JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass

import httpx

from pagedserve.services.cli import build_parser
from pagedserve.services.launcher import Supervisor, free_port, service_commands

BLOCK_SIZE = 16
_WORDS = (
    "bicycle wheel chain saddle brake gear pedal frame tyre spoke valve pump helmet light bell basket rack lock "
    "route hill valley river bridge road path city town market station harbour garden forest meadow orchard "
    "morning evening weekday weekend season spring summer autumn winter weather rain wind sun cloud frost "
    "order invoice delivery return refund warranty repair service customer account payment receipt discount"
).split()


@dataclass
class Result:
    policy: str
    hit_rate: float
    mean_ttft_s: float
    median_ttft_s: float
    wall_s: float
    num_requests: int
    first_sight_mean_ttft_s: float = 0.0


def tenant_prompts(num_tenants: int, prefix_tokens: int, seed: int) -> list[str]:
    """One system prompt per tenant, about `prefix_tokens` tokens of seeded word salad
    (a word is about 1.3 tokens), distinct from the first token on."""
    rng = random.Random(seed)
    prompts = []
    for tenant in range(num_tenants):
        words = " ".join(rng.choice(_WORDS) for _ in range(int(prefix_tokens / 1.3)))
        prompts.append(f"Tenant {seed}-{tenant} system prompt. You are the assistant of shop {tenant}. Rules: {words}\n")
    return prompts


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[float, int, int]:
    """(time to first token, prompt tokens, cached prompt tokens) of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.monotonic()
    ttft = None
    usage = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if ttft is None and any(choice.get("text") for choice in event.get("choices", [])):
                ttft = time.monotonic() - started
            usage = event.get("usage") or usage
    assert ttft is not None and usage is not None
    return ttft, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]


async def run_phase(policy: str, url: str, prompts: list[str], order: list[int], concurrency: int, max_tokens: int) -> Result:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index, tenant in enumerate(order):
        queue.put_nowait(index)
    measurements: list[tuple[float, int, int]] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            index = queue.get_nowait()
            prompt = prompts[order[index]] + f"User: question {index}, what do you sell?\nAssistant:"
            measurements.append(await one_request(client, url, prompt, max_tokens))

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall_s = time.monotonic() - started
    ttfts = [m[0] for m in measurements]
    hit_rate = sum(m[2] for m in measurements) / sum(m[1] for m in measurements)
    return Result(policy, hit_rate, statistics.fmean(ttfts), statistics.median(ttfts), wall_s, len(measurements))


def wait_healthy(url: str, num_replicas: int, supervisor: Supervisor, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for service in supervisor.exited():
            raise RuntimeError(f"{service.name} exited during start-up")
        try:
            body = httpx.get(f"{url}/health", timeout=2).json()
            if sum(r["scheduler"] == "ok" for r in body.get("replicas", [])) == num_replicas:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)  # polling interval of a condition wait
    raise TimeoutError(f"{url} did not see {num_replicas} healthy replicas within {timeout_s:g} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--prefix-tokens", type=int, default=1000, help="system prompt length per tenant, about")
    parser.add_argument("--requests", type=int, default=32, help="measured per policy, after each tenant's first")
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--kv-blocks", type=int, default=None, help="KV blocks per replica (default: half the tenants' prefixes + room)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    prefix_blocks = math.ceil(args.prefix_tokens * 1.1 / BLOCK_SIZE)  # the word salad runs a little long
    kv_blocks = args.kv_blocks or math.ceil(args.tenants / 2 * prefix_blocks * 1.1) + args.concurrency * 4
    up = build_parser().parse_args(["up", "--replicas", str(args.replicas), "--port", str(free_port())])
    commands = service_commands(up)
    services = commands.services()
    for name in services:
        if name.startswith("executor"):
            services[name] = services[name] + ["--num-kv-blocks", str(kv_blocks)]
    baseline_port = free_port()
    services["gateway-round-robin"] = [
        *(arg if arg != str(up.port) else str(baseline_port) for arg in commands.gateway), "--routing", "round_robin",
    ]
    cache_aware_url, round_robin_url = commands.url, f"http://{up.host}:{baseline_port}"
    print(f"{args.replicas} replicas, {kv_blocks} KV blocks each ({kv_blocks * BLOCK_SIZE:,} tokens; a prefix is "
          f"~{prefix_blocks} blocks), {args.tenants} tenants, {args.requests} requests per policy, {args.concurrency} at a time",
          file=sys.stderr)
    supervisor = Supervisor(services)
    results = []
    try:
        supervisor.start_all()
        for url in (cache_aware_url, round_robin_url):
            wait_healthy(url, args.replicas, supervisor)
        for url in (round_robin_url, round_robin_url):  # one warm-up request per replica
            asyncio.run(run_phase("warm-up", url, ["warm up. "], [0], 1, 2))
        rng = random.Random(args.seed)
        order = [rng.randrange(args.tenants) for _ in range(args.requests)]
        first_sight = list(range(args.tenants))
        rng.shuffle(first_sight)
        for policy, url, seed in (("round robin", round_robin_url, args.seed + 1000), ("cache-aware", cache_aware_url, args.seed + 2000)):
            prompts = tenant_prompts(args.tenants, args.prefix_tokens, seed)
            first = asyncio.run(run_phase(policy, url, prompts, first_sight, args.concurrency, args.max_tokens))
            result = asyncio.run(run_phase(policy, url, prompts, order, args.concurrency, args.max_tokens))
            result.first_sight_mean_ttft_s = first.mean_ttft_s
            results.append(result)
            print(f"{policy}: done in {first.wall_s + result.wall_s:.1f} s", file=sys.stderr)
    finally:
        supervisor.stop_all()

    print(f"{args.requests} requests per policy after each of {args.tenants} tenants' first ({args.concurrency} at a time), "
          f"{args.replicas} replicas of {kv_blocks} KV blocks")
    print("| routing | prefix hit rate | mean TTFT (s) | median TTFT (s) | wall (s) | first-sight mean TTFT (s) |")
    print("|---|---|---|---|---|---|")
    for result in results:
        print(f"| {result.policy} | {result.hit_rate:.1%} | {result.mean_ttft_s:.3f} | {result.median_ttft_s:.3f} | "
              f"{result.wall_s:.1f} | {result.first_sight_mean_ttft_s:.3f} |")
    round_robin, cache_aware = results
    speedup = round_robin.mean_ttft_s / cache_aware.mean_ttft_s
    print(f"mean TTFT {speedup:.1f}x better with cache-aware routing")
    print(json.dumps({
        "replicas": args.replicas, "tenants": args.tenants, "requests": args.requests, "concurrency": args.concurrency,
        "kv_blocks_per_replica": kv_blocks,
        "round_robin": {"hit_rate": round_robin.hit_rate, "mean_ttft_s": round_robin.mean_ttft_s},
        "cache_aware": {"hit_rate": cache_aware.hit_rate, "mean_ttft_s": cache_aware.mean_ttft_s},
        "ttft_speedup": speedup,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
