"""The PagedAttention paper's memory study, on this platform's real scheduler and block
pool.

    python -m benchmarks.memory [--num-requests 2000] [--kv-tokens 65536] [--no-engine]

Workload: ShareGPT-like lengths, log-normal (mean input ~160, mean output ~340 tokens),
cut at the context length. Parts:

1. KV utilisation and concurrency: the real `Scheduler` and `BlockPool` serve the
   workload with every request queued at once, so KV memory is the binding limit; the
   model is left out (a memory study needs block tables, not logits; each step "samples"
   a fixed non-EOS token). Measured over the steady state (steps while requests still
   wait): tokens stored / slots allocated, and running sequences, against a contiguous
   allocator that reserves the context length per request in the same memory.
2. Parallel sampling: blocks held by `n` = 2, 4, 6 samples of each prompt forked off one
   request (prompt blocks shared, the partly filled last prompt block copied on the first
   write), against the same samples as `n` separate requests, with memory to spare so
   both runs hold the same sequences for the same steps: blocks in use summed over the
   steps of the run. Beam search of width 4: prompts searched by the real scheduler
   (forks, copy-on-write, unpicked beams freed), against what the same beams would hold
   with no sharing (each beam its own copy of every block of its tokens), summed over
   the steps; on synthetic candidate logprobs for the whole prompt set, and on the real
   engine and model for a few prompts (the JSON figure, unless --no-engine).
3. Prefix caching on the real engine and model: time to first token of requests that
   share a 1k-token system prompt, with the prefix cache on and off, and its hit rate.
4. Sliding windows (`--sliding-window`, run alone): a Gemma-3-270M-shaped model (18
   layers, every 6th global, the rest a 512-token window; 1 KV head of 256) at 8k context,
   the same KV memory, all of 8k-token requests queued at once: sequences the real
   scheduler runs at once with the windows' blocks freed (KV groups: 6 groups of 3 layers,
   `services/scheduler/kv_groups.py`) vs every layer keeping every block (one global
   group, what the model holds without a hybrid KV cache).

Ends with a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from dataclasses import dataclass

from pagedserve.services.scheduler.config import SchedulerConfig
from pagedserve.shared.kv_group_layout import KVGroupLayout
from pagedserve.services.scheduler.policy import blocks_to_cover
from pagedserve.services.scheduler.request import Request
from pagedserve.services.scheduler.scheduler import Scheduler
from pagedserve.shared.messages import ExecuteStep, SampledToken, StepResult
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits

CONTEXT_LEN = 2048
BLOCK_SIZE = 16
FILLER_TOKEN = 7  # any id that is not EOS
PARALLEL_NS = (2, 4, 6)  # samples per prompt in the parallel sampling part
BEAM_WIDTH = 4


def sharegpt_like_lengths(num_requests: int, seed: int = 0) -> list[tuple[int, int]]:
    """(input tokens, output tokens): log-normal with sigma 1 (heavy tail as in ShareGPT),
    means ~160 and ~340, cut so that input + output fits the context."""
    rng = random.Random(seed)
    sigma = 1.0
    lengths = []
    for _ in range(num_requests):
        prompt = max(1, min(CONTEXT_LEN - 1, round(rng.lognormvariate(math.log(160) - sigma**2 / 2, sigma))))
        output = max(1, min(CONTEXT_LEN - prompt, round(rng.lognormvariate(math.log(340) - sigma**2 / 2, sigma))))
        lengths.append((prompt, output))
    return lengths


def simulated_step_result(scheduler: Scheduler, step: ExecuteStep) -> StepResult:
    """What an executor returns for `step`: one token for each request whose scheduled
    tokens reach the end of its known tokens (the rule the model runner applies)."""
    scheduled = [(r.request_id, r.num_computed_tokens) for r in step.new_requests]
    scheduled += [(r.request_id, r.num_computed_tokens) for r in step.cached_requests]
    sampled = []
    for (request_id, num_computed), num_new in zip(scheduled, step.num_scheduled_tokens):
        request = scheduler.get_request(request_id)
        if request is not None and num_new > 0 and num_computed + num_new == request.num_tokens:
            if request.beam_group is not None:
                sampled.append(synthetic_beam_candidates(request_id, request.num_tokens, request.beam_group.search.num_candidates))
            else:
                sampled.append(SampledToken(sequence_id=request_id, token_id=FILLER_TOKEN))
    # Parallel samples forked off a request that sampled: each draws its first token too.
    sampled += [SampledToken(sequence_id=fork.request_id, token_id=FILLER_TOKEN) for fork in step.forked_requests]
    return StepResult(step_id=step.step_id, sampled=sampled)


def synthetic_beam_candidates(request_id: str, num_tokens: int, count: int) -> SampledToken:
    """A beam's report: `count` distinct tokens with descending logprobs, drawn from a
    generator seeded by the beam and its length, so runs are reproducible. The gaps are
    what decides how often several beams descend from one parent."""
    rng = random.Random(f"{request_id}/{num_tokens}")
    logprobs = [-rng.expovariate(2.0)]
    for _ in range(count - 1):
        logprobs.append(logprobs[-1] - rng.expovariate(1.0))
    token_ids = rng.sample(range(100, 30000), count)
    return SampledToken(request_id, token_ids[0], logprobs[0], token_ids, logprobs)


@dataclass
class SteadyState:
    kv_utilisation: float
    mean_running: float
    num_steps: int
    num_preemptions: int


def measure_steady_state(lengths: list[tuple[int, int]], kv_tokens: int) -> SteadyState:
    num_requests = len(lengths)
    scheduler = Scheduler(
        SchedulerConfig(limits=SchedulingLimits(
            max_model_len=CONTEXT_LEN, max_num_seqs=num_requests, max_num_batched_tokens=max(4096, num_requests),
            max_num_waiting=num_requests, enable_prefix_caching=False,
        )),
        num_blocks=kv_tokens // BLOCK_SIZE,
        block_size=BLOCK_SIZE,
    )
    rng = random.Random(1)
    for i, (prompt_len, output_len) in enumerate(lengths):
        prompt = [rng.randrange(100, 30000) for _ in range(prompt_len)]
        params = SamplingParams(max_tokens=output_len, ignore_eos=True)
        scheduler.add_request(Request(f"r{i}", prompt, params, arrival_time=float(i)))
    utilisation, running = [], []
    while scheduler.has_unfinished_requests():
        step = scheduler.schedule()
        scheduler.update_from_output(step, simulated_step_result(scheduler, step))
        if scheduler.num_waiting > 0:  # memory still the limit: steady state
            utilisation.append(scheduler.kv_utilisation())
            running.append(scheduler.num_running)
    assert scheduler.block_pool.num_free_blocks == scheduler.block_pool.num_blocks, "blocks leaked"
    return SteadyState(statistics.fmean(utilisation), statistics.fmean(running), len(running), scheduler.num_preemptions_total)


# Part 4: Gemma 3 270M's attention shape (layer_types: 5 sliding, then 1 global).
GEMMA3_LAYER_WINDOWS = tuple(None if (i + 1) % 6 == 0 else 512 for i in range(18))
GEMMA3_KV_BYTES_PER_TOKEN_LAYER = 2 * 1 * 256 * 2  # K and V, 1 KV head of 256, bfloat16
SLIDING_CONTEXT_LEN = 8192
SLIDING_OUTPUT_LEN = 512


def measure_sliding_window_admission(kv_bytes: int, num_requests: int, freed: bool) -> tuple[int, float, int]:
    """8k-context requests (prompt 7,680 + 512 generated) all queued at once, on the real
    scheduler with the Gemma-3-shaped model's KV memory `kv_bytes`: with `freed`, the
    layout's KV groups (a block id costs one group's 3 layers; the window groups give
    blocks back), else one global group (a block id costs all 18 layers). Returns (block
    ids, mean running sequences while requests still wait, most running at once)."""
    if freed:
        layout = KVGroupLayout.for_windows(GEMMA3_LAYER_WINDOWS)
    else:
        layout = KVGroupLayout.for_windows([None] * len(GEMMA3_LAYER_WINDOWS))
    block_bytes = layout.layers_per_group * BLOCK_SIZE * GEMMA3_KV_BYTES_PER_TOKEN_LAYER
    num_blocks = kv_bytes // block_bytes
    scheduler = Scheduler(
        SchedulerConfig(limits=SchedulingLimits(
            # A whole prompt per step at least: admission is bound by memory, not the budget.
            max_model_len=SLIDING_CONTEXT_LEN, max_num_seqs=num_requests, max_num_batched_tokens=SLIDING_CONTEXT_LEN,
            max_num_waiting=num_requests, enable_prefix_caching=False,
        )),
        num_blocks=num_blocks,
        block_size=BLOCK_SIZE,
        kv_group_windows=layout.windows,
    )
    rng = random.Random(2)
    prompt_len = SLIDING_CONTEXT_LEN - SLIDING_OUTPUT_LEN
    for i in range(num_requests):
        prompt = [rng.randrange(100, 30000) for _ in range(prompt_len)]
        params = SamplingParams(max_tokens=SLIDING_OUTPUT_LEN, ignore_eos=True)
        scheduler.add_request(Request(f"r{i}", prompt, params, arrival_time=float(i)))
    running, most = [], 0
    while scheduler.has_unfinished_requests():
        step = scheduler.schedule()
        scheduler.update_from_output(step, simulated_step_result(scheduler, step))
        most = max(most, scheduler.num_running)
        if scheduler.num_waiting > 0:
            running.append(scheduler.num_running)
    assert scheduler.block_pool.num_free_blocks == scheduler.block_pool.num_blocks, "blocks leaked"
    return num_blocks, statistics.fmean(running) if running else float(most), most


def report_sliding_window(kv_gib: float, num_requests: int) -> dict[str, float]:
    kv_bytes = int(kv_gib * 2**30)
    print(f"Gemma-3-270M-shaped KV cache (18 layers, 15 with a 512-token window, 1 KV head of 256, bf16) at "
          f"{SLIDING_CONTEXT_LEN:,} context: {num_requests} requests of {SLIDING_CONTEXT_LEN - SLIDING_OUTPUT_LEN:,} "
          f"prompt + {SLIDING_OUTPUT_LEN} generated tokens queued at once, {kv_gib:g} GiB of KV memory")
    print("\n| KV cache | block ids (16 tokens) | mean running while requests wait | most running |\n|---|---|---|---|")
    results = {}
    for freed, name in ((False, "every layer keeps every block (one global group)"),
                        (True, "window blocks freed (6 KV groups of 3 layers)")):
        start = time.perf_counter()
        num_blocks, mean_running, most = measure_sliding_window_admission(kv_bytes, num_requests, freed)
        seconds = time.perf_counter() - start
        print(f"| {name} | {num_blocks:,} | {mean_running:.1f} | {most} |  (simulated in {seconds:.1f} s)")
        results[freed] = mean_running
    ratio = results[True] / results[False]
    print(f"\nsequences at once with window blocks freed vs all global: {ratio:.2f}x")
    return {"sliding_window_concurrency_ratio": round(ratio, 2)}


@dataclass
class SharingRun:
    block_steps: int  # blocks in use, summed over the steps of the run
    num_steps: int
    num_copies: int  # copy-on-write block copies


def roomy_scheduler(lengths: list[tuple[int, int]], seqs_per_prompt: int) -> Scheduler:
    """A scheduler whose KV memory, sequence slots and queue hold every sequence of the
    prompts at its full length at once: nothing waits or is preempted, so a sharing
    study measures sharing alone."""
    num_seqs = len(lengths) * seqs_per_prompt
    num_blocks = sum(blocks_to_cover(p + o, BLOCK_SIZE) for p, o in lengths) * seqs_per_prompt + 1
    return Scheduler(
        SchedulerConfig(limits=SchedulingLimits(
            max_model_len=CONTEXT_LEN, max_num_seqs=num_seqs, max_num_batched_tokens=max(8192, num_seqs),
            max_num_waiting=num_seqs, enable_prefix_caching=False,
        )),
        num_blocks=num_blocks,
        block_size=BLOCK_SIZE,
    )


def measure_block_steps(lengths: list[tuple[int, int]], n: int, forked: bool) -> SharingRun:
    """Serve every prompt with `n` samples of its output length, either as one request
    with `n` forked samples (prompt blocks shared, the partly filled last one copied on
    the first write) or as `n` separate requests (seeds seed + i), all queued at once
    with KV memory to spare, so that no sequence waits or is preempted: both runs hold
    the same sequences for the same steps and only sharing tells them apart."""
    scheduler = roomy_scheduler(lengths, n)
    rng = random.Random(2)
    for i, (prompt_len, output_len) in enumerate(lengths):
        prompt = [rng.randrange(100, 30000) for _ in range(prompt_len)]
        params = SamplingParams(max_tokens=output_len, ignore_eos=True, seed=i, n=n)
        if forked:
            scheduler.add_request(Request(f"r{i}", prompt, params, arrival_time=float(i)))
        else:
            for sample in range(n):
                scheduler.add_request(Request(f"r{i}-{sample}", prompt, params.for_sample(sample), arrival_time=float(i)))
    block_steps = num_steps = num_copies = 0
    while scheduler.has_unfinished_requests():
        step = scheduler.schedule()
        scheduler.update_from_output(step, simulated_step_result(scheduler, step))
        block_steps += scheduler.block_pool.num_used_blocks
        num_steps += 1
        num_copies += len(step.block_copies)
    assert scheduler.num_preemptions_total == 0, "the sharing study needs memory to spare"
    assert scheduler.block_pool.num_free_blocks == scheduler.block_pool.num_blocks, "blocks leaked"
    return SharingRun(block_steps, num_steps, num_copies)


def measure_beam_sharing_on_model(lengths: list[tuple[int, int]], width: int, max_tokens: int) -> tuple[int, int, int]:
    """As `measure_beam_sharing`, on the real engine and embedded model (random-token
    prompts of the given lengths, `max_tokens` each, EOS allowed), so the candidates are
    the model's own."""
    from pagedserve.services.engine import LLMEngine
    from pagedserve.services.engine.config import EngineConfig

    engine = LLMEngine(EngineConfig(kv_cache_memory_bytes=256 << 20, limits=SchedulingLimits(enable_prefix_caching=False)))
    rng = random.Random(4)
    for prompt_len, _ in lengths:
        prompt = [rng.randrange(100, 30000) for _ in range(prompt_len)]
        engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, beam_width=width))
    scheduler = engine.scheduler
    shared = unshared = num_copies = 0
    while engine.has_unfinished_requests():
        step = scheduler.schedule()
        scheduler.update_from_output(step, engine.runner.execute(step))
        shared += scheduler.block_pool.num_used_blocks
        unshared += sum(len(r.block_ids) for r in scheduler.running)
        num_copies += len(step.block_copies)
    assert scheduler.block_pool.num_used_blocks == 0, "blocks leaked"
    return shared, unshared, num_copies


def measure_beam_sharing(lengths: list[tuple[int, int]], width: int) -> tuple[int, int, int]:
    """Beam search of `width` over every prompt (its output length as max_tokens), all
    queued at once with memory to spare. Returns (block-steps held, block-steps the same
    beams would hold with no sharing, copy-on-write copies)."""
    scheduler = roomy_scheduler(lengths, width)
    rng = random.Random(3)
    for i, (prompt_len, output_len) in enumerate(lengths):
        prompt = [rng.randrange(100, 30000) for _ in range(prompt_len)]
        params = SamplingParams(max_tokens=output_len, beam_width=width)
        scheduler.add_request(Request(f"r{i}", prompt, params, arrival_time=float(i)))
    shared = unshared = num_copies = 0
    while scheduler.has_unfinished_requests():
        step = scheduler.schedule()
        scheduler.update_from_output(step, simulated_step_result(scheduler, step))
        shared += scheduler.block_pool.num_used_blocks
        unshared += sum(len(r.block_ids) for r in scheduler.running)
        num_copies += len(step.block_copies)
    assert scheduler.num_preemptions_total == 0, "the sharing study needs memory to spare"
    assert scheduler.block_pool.num_free_blocks == scheduler.block_pool.num_blocks, "blocks leaked"
    return shared, unshared, num_copies


@dataclass
class PrefixTiming:
    mean_ttft_s: float
    hit_rate: float


def measure_prefix_ttft(enable_prefix_caching: bool, num_requests: int, system_prompt_len: int = 1024) -> PrefixTiming:
    """Requests one after another (an interactive user's view), each the same 1k-token
    system prompt plus its own short question; the first one, which fills the cache, is
    not timed. TTFT = from `add_request` to the step that returns its first token."""
    from pagedserve.services.engine import LLMEngine
    from pagedserve.services.engine.config import EngineConfig

    engine = LLMEngine(EngineConfig(
        kv_cache_memory_bytes=256 << 20, limits=SchedulingLimits(enable_prefix_caching=enable_prefix_caching)
    ))
    rng = random.Random(2)
    system = [rng.randrange(100, 30000) for _ in range(system_prompt_len)]
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    ttfts = []
    for i in range(num_requests + 1):
        prompt = system + [rng.randrange(100, 30000) for _ in range(rng.randint(16, 48))]
        start = time.perf_counter()
        request_id = engine.add_request(prompt, params)
        while not any(d.request_id == request_id and d.new_token_ids for d in engine.step()):
            pass
        if i > 0:
            ttfts.append(time.perf_counter() - start)
        while engine.has_unfinished_requests():
            engine.step()
    return PrefixTiming(statistics.fmean(ttfts), engine.scheduler.prefix_cache_stats.hit_rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--kv-tokens", type=int, default=65536, help="KV memory, in token slots")
    parser.add_argument("--prefix-requests", type=int, default=8, help="timed requests per prefix-caching setting")
    parser.add_argument("--no-engine", action="store_true", help="skip the prefix-caching part (it loads the model)")
    parser.add_argument("--num-parallel-prompts", type=int, default=100, help="prompts of the parallel sampling part")
    parser.add_argument("--beam-model-prompts", type=int, default=8, help="prompts of the beam search run on the model")
    parser.add_argument("--beam-model-max-tokens", type=int, default=96, help="new tokens of the beam search run on the model")
    parser.add_argument("--sliding-window", action="store_true",
                        help="run only part 4: a Gemma-3-shaped model at 8k context, window blocks freed vs all global")
    parser.add_argument("--sliding-kv-gib", type=float, default=2.0, help="KV memory of part 4, GiB")
    parser.add_argument("--sliding-requests", type=int, default=128, help="8k-token requests of part 4")
    args = parser.parse_args()
    if args.sliding_window:
        print(json.dumps(report_sliding_window(args.sliding_kv_gib, args.sliding_requests)))
        return

    lengths = sharegpt_like_lengths(args.num_requests)
    mean_in = statistics.fmean(p for p, _ in lengths)
    mean_out = statistics.fmean(o for _, o in lengths)
    print(f"{args.num_requests} requests, ShareGPT-like lengths: mean input {mean_in:.0f}, mean output {mean_out:.0f} "
          f"tokens, context {CONTEXT_LEN}, block size {BLOCK_SIZE}, KV memory {args.kv_tokens:,} token slots")

    start = time.perf_counter()
    steady = measure_steady_state(lengths, args.kv_tokens)
    contiguous_seqs = args.kv_tokens // CONTEXT_LEN
    # A contiguous slot of CONTEXT_LEN holds, averaged over its request's decode steps,
    # the prompt plus half the output.
    contiguous_utilisation = sum(o * (p + o / 2) for p, o in lengths) / (sum(o for _, o in lengths) * CONTEXT_LEN)
    print(f"(simulated {steady.num_steps} steady-state steps in {time.perf_counter() - start:.1f} s, "
          f"{steady.num_preemptions} preemptions)")
    print("\n| allocator | KV utilisation (stored / allocated) | concurrent sequences |\n|---|---|---|")
    print(f"| paged, block {BLOCK_SIZE} (pagedserve) | {steady.kv_utilisation:.1%} | {steady.mean_running:.1f} |")
    print(f"| contiguous, context length reserved | {contiguous_utilisation:.1%} | {contiguous_seqs} |")
    ratio = steady.mean_running / contiguous_seqs
    print(f"\nconcurrency vs contiguous: {ratio:.1f}x")

    # Part 2: parallel sampling, n samples per prompt, shared vs separate.
    start = time.perf_counter()
    parallel_lengths = lengths[: args.num_parallel_prompts]
    print(f"\nParallel sampling: the first {len(parallel_lengths)} prompts, n samples of each, "
          "block-steps (blocks in use summed over the run) with memory to spare")
    print("\n| n | separate requests (block-steps) | forked, shared prompt (block-steps) | copy-on-write copies "
          "| blocks saved by sharing |\n|---|---|---|---|---|")
    savings: dict[int, float] = {}
    for n in PARALLEL_NS:
        separate = measure_block_steps(parallel_lengths, n, forked=False)
        shared = measure_block_steps(parallel_lengths, n, forked=True)
        savings[n] = 1 - shared.block_steps / separate.block_steps
        print(f"| {n} | {separate.block_steps:,} | {shared.block_steps:,} | {shared.num_copies:,} | {savings[n]:.1%} |")
    print(f"(simulated in {time.perf_counter() - start:.1f} s; the PagedAttention paper reports 6.1-9.8% "
          "for parallel sampling on Alpaca, whose prompts average about 20 tokens)")

    start = time.perf_counter()
    beam_shared, beam_unshared, beam_copies = measure_beam_sharing(parallel_lengths, BEAM_WIDTH)
    beam_saving = 1 - beam_shared / beam_unshared
    print(f"\nBeam search, width {BEAM_WIDTH}, the same prompts (synthetic candidate logprobs): block-steps held vs "
          "the same beams with no sharing")
    print("\n| beam width | no sharing (block-steps) | shared, copy-on-write (block-steps) | copy-on-write copies "
          "| blocks saved by sharing |\n|---|---|---|---|---|")
    print(f"| {BEAM_WIDTH} | {beam_unshared:,} | {beam_shared:,} | {beam_copies:,} | {beam_saving:.1%} |")
    print(f"(simulated in {time.perf_counter() - start:.1f} s; the paper reports 37.6-55.2% for beam widths 2-6)")
    if not args.no_engine:
        start = time.perf_counter()
        model_lengths = lengths[: args.beam_model_prompts]
        beam_shared, beam_unshared, beam_copies = measure_beam_sharing_on_model(
            model_lengths, BEAM_WIDTH, args.beam_model_max_tokens
        )
        beam_saving = 1 - beam_shared / beam_unshared
        print(f"\nBeam search, width {BEAM_WIDTH}, on the embedded model: {len(model_lengths)} random-token prompts "
              f"of the workload's first lengths, {args.beam_model_max_tokens} new tokens at most")
        print("\n| beam width | no sharing (block-steps) | shared, copy-on-write (block-steps) | copy-on-write copies "
              "| blocks saved by sharing |\n|---|---|---|---|---|")
        print(f"| {BEAM_WIDTH} | {beam_unshared:,} | {beam_shared:,} | {beam_copies:,} | {beam_saving:.1%} |")
        print(f"(ran in {time.perf_counter() - start:.1f} s)")
    summary: dict[str, float | None] = {
        "kv_utilisation": round(steady.kv_utilisation, 4),
        "concurrency_vs_contiguous": round(ratio, 2),
        # Fraction of block-steps saved by sharing the prompt among n = 4 parallel samples.
        "parallel_block_saving": round(savings[4], 4),
        # Fraction of block-steps saved by sharing among the beams of width-4 beam search
        # (on the model unless --no-engine, else on synthetic candidates).
        "beam_block_saving": round(beam_saving, 4),
        "prefix_ttft_speedup": None,
    }

    # Part 3: prefix caching on the real engine.
    if not args.no_engine:
        cold = measure_prefix_ttft(False, args.prefix_requests)
        warm = measure_prefix_ttft(True, args.prefix_requests)
        print(f"\nPrefix caching: a 1,024-token shared system prompt + 16-48 tokens of each request's own, "
              f"{args.prefix_requests} requests one after another (embedded model, CPU)")
        print("\n| prefix cache | mean time to first token | hit rate (prompt tokens) |\n|---|---|---|")
        print(f"| off | {cold.mean_ttft_s * 1000:.0f} ms | {cold.hit_rate:.1%} |")
        print(f"| on | {warm.mean_ttft_s * 1000:.0f} ms | {warm.hit_rate:.1%} |")
        summary["prefix_ttft_speedup"] = round(cold.mean_ttft_s / warm.mean_ttft_s, 2)
        summary["prefix_hit_rate"] = round(warm.hit_rate, 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
