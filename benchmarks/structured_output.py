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
valid JSON. Prints a one-line JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import time

from services.engine import LLMEngine
from services.executor.config import EngineConfig
from shared.sampling_params import SamplingParams
from shared.structured_output import GrammarSpec

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind; the best counts")
    args = parser.parse_args()

    engine = LLMEngine(EngineConfig(dtype=args.dtype, kv_cache_memory_bytes=512 << 20, max_num_seqs=max(32, args.num_streams)))
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

    constrained_s, free_s = [], []
    for _ in range(args.repeats):
        elapsed, token_ids, texts = constrained_run()
        constrained_s.append(elapsed)
        lengths = [len(ids) for ids in token_ids]
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
    print(f"  complete, valid JSON outputs: {valid}/{len(texts)} (the rest hit --max-tokens)")
    print(json.dumps({
        "num_streams": args.num_streams, "output_tokens": num_tokens, "unconstrained_tok_s": round(free_tps, 1),
        "json_schema_tok_s": round(constrained_tps, 1), "throughput_cost": round(cost, 4),
        "compile_ms": {k: round(v, 2) for k, v in compile_ms.items()}, "valid_json": valid,
    }))


if __name__ == "__main__":
    main()
