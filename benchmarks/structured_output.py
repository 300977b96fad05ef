"""Structured output cost: JSON-schema streams vs the same ones unconstrained.

    python -m benchmarks.structured_output [--num-streams 32] [--max-tokens 96] [--dtype float32]

The in-process engine (the scheduler core and model runner the services run) generates
for `--num-streams` chat prompts at once with a JSON-schema response format, sampling at
temperature 1.0. Then it generates for the same prompts unconstrained, each stream with
`max_tokens` set to exactly the number of tokens its constrained run produced (EOS
ignored), so both runs compute the same tokens in the same batches and the difference is
the grammar: the per-step bitmask fill, the masked copy of the constrained rows, and the
matcher advance. Also prints each schema's compile time (the executor compiles each
distinct schema once, on its worker thread) and checks that every constrained output is
valid JSON. Also times the grammar's own share of a constrained step (bitmask fill, mask apply,
matcher advance), which stays meaningful when other work shares the machine and the
throughput ratio gets noisy. The two kinds of run alternate, the best of each counts.
Prints a one-line JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import time

from pagedserve.services.engine import LLMEngine
from pagedserve.services.engine.config import EngineConfig
from pagedserve.services.executor import structured_output as structured_output_module
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits
from pagedserve.shared.structured_output import GrammarSpec

SCHEMAS: dict[str, dict] = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "editor", "viewer"]},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 24}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
            },
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        },
        "required": ["name", "age", "role", "address", "tags"],
    },
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "lines": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string", "maxLength": 10}, "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
                    "required": ["sku", "qty"],
                },
                "maxItems": 5,
            },
            "paid": {"type": "boolean"},
        },
        "required": ["id", "lines", "paid"],
    },
    "json_object": {"type": "object"},
}
TOPICS = ["a person", "a customer", "an employee", "a musician", "a scientist", "an athlete", "a chef", "a pilot"]


def chat_prompt(engine: LLMEngine, index: int) -> list[int]:
    messages = [{"role": "user", "content": f"Describe {TOPICS[index % len(TOPICS)]} (#{index}) as a JSON object."}]
    encoded = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


class StepTimer:
    """Wall time inside the wrapped callables, and the number of steps run: the grammar's
    share of a step (a benchmark-only wrapper; the engine itself keeps no timers)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.grammar_s = 0.0
        self.step_s = 0.0
        self.num_steps = 0

    def wrap(self, function, attribute: str):  # type: ignore[no-untyped-def]
        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                setattr(self, attribute, getattr(self, attribute) + elapsed)
                if attribute == "step_s":
                    self.num_steps += 1
        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind, alternating; the best counts")
    args = parser.parse_args()

    engine = LLMEngine(EngineConfig(
        dtype=args.dtype, kv_cache_memory_bytes=512 << 20, limits=SchedulingLimits(max_num_seqs=max(32, args.num_streams))
    ))
    compiler = engine.runner.structured_output.compiler
    spec = GrammarSpec("json_schema", json.dumps(SCHEMAS["person"]))
    start = time.perf_counter()
    compiler.get(GrammarSpec("json_schema", json.dumps({"type": "string"})))  # loads the tokenizer info once
    print(f"tokenizer info for the grammar compiler: {time.perf_counter() - start:.2f} s (once per executor)")
    compile_ms = {}
    for name, schema in SCHEMAS.items():
        start = time.perf_counter()
        compiler.get(GrammarSpec("json_schema", json.dumps(schema)))
        compile_ms[name] = (time.perf_counter() - start) * 1000
        print(f"compile {name:12s} {compile_ms[name]:7.1f} ms")

    prompts = [chat_prompt(engine, i) for i in range(args.num_streams)]
    engine.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up

    def constrained_run() -> tuple[float, list[list[int]], list[str]]:
        params = [SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=i, structured_output=spec) for i in range(len(prompts))]
        start = time.perf_counter()
        completions = engine.generate(prompts, params)
        return time.perf_counter() - start, [c.token_ids for c in completions], [c.text for c in completions]

    def free_run(lengths: list[int]) -> float:
        params = [SamplingParams(max_tokens=n, temperature=1.0, seed=i, ignore_eos=True) for i, n in enumerate(lengths)]
        start = time.perf_counter()
        engine.generate(prompts, params)
        return time.perf_counter() - start

    timer = StepTimer()
    runner = engine.runner
    runner.structured_output.bitmask_for = timer.wrap(runner.structured_output.bitmask_for, "grammar_s")
    runner.structured_output.advance = timer.wrap(runner.structured_output.advance, "grammar_s")
    structured_output_module.GrammarBitmask.apply_ = timer.wrap(structured_output_module.GrammarBitmask.apply_, "grammar_s")
    runner.execute = timer.wrap(runner.execute, "step_s")

    constrained_s, free_s = [], []
    grammar_ms_per_step, step_ms = [], []
    lengths: list[int] = []
    for repeat in range(args.repeats):
        if repeat % 2 and lengths:  # alternate which kind runs first
            free_s.append(free_run(lengths))
        timer.reset()
        elapsed, token_ids, texts = constrained_run()
        constrained_s.append(elapsed)
        grammar_ms_per_step.append(timer.grammar_s * 1000 / timer.num_steps)
        step_ms.append(timer.step_s * 1000 / timer.num_steps)
        lengths = [len(ids) for ids in token_ids]
        if not repeat % 2:
            free_s.append(free_run(lengths))
    num_tokens = sum(lengths)
    valid = 0
    for text in texts:
        try:
            json.loads(text)
            valid += 1
        except ValueError:
            pass  # cut by max_tokens
    constrained_tps = num_tokens / min(constrained_s)
    free_tps = num_tokens / min(free_s)
    cost = 1 - constrained_tps / free_tps
    print(f"{args.num_streams} streams, {num_tokens} output tokens each run ({args.dtype})")
    print(f"  unconstrained   {free_tps:8.1f} tok/s")
    print(f"  JSON schema     {constrained_tps:8.1f} tok/s   ({cost:+.1%} throughput cost)")
    best = min(range(len(constrained_s)), key=constrained_s.__getitem__)
    share = grammar_ms_per_step[best] / step_ms[best]
    print(f"  grammar work    {grammar_ms_per_step[best]:8.2f} ms per constrained step of {step_ms[best]:.1f} ms ({share:.1%}: fill, apply, advance)")
    print(f"  complete, valid JSON outputs: {valid}/{len(texts)} (the rest hit --max-tokens)")
    print(json.dumps({
        "num_streams": args.num_streams, "output_tokens": num_tokens, "unconstrained_tok_s": round(free_tps, 1),
        "json_schema_tok_s": round(constrained_tps, 1), "throughput_cost": round(cost, 4),
        "grammar_ms_per_step": round(grammar_ms_per_step[best], 3), "step_ms": round(step_ms[best], 2),
        "compile_ms": {k: round(v, 2) for k, v in compile_ms.items()}, "valid_json": valid,
    }))


if __name__ == "__main__":
    main()
