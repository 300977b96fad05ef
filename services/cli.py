"""The `pagedserve` command: one subcommand per job, each building its typed config from
flags in one place. Flags take their defaults from those configs (EngineConfig,
SchedulerServiceConfig, GatewayConfig), the scheduling limits from
services/scheduler/config.py, their one owner.

Importing this module loads no torch: the scheduler and gateway processes run it too.
The executor, engine and gateway app are imported by the subcommand that runs them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

import msgspec

from pagedserve.services.executor.config import DTYPES, WEIGHT_FORMATS, EngineConfig, ExecutorConfig
from pagedserve.services.gateway.config import GatewayConfig, add_gateway_flags, gateway_config_from_args
from pagedserve.services.scheduler.config import (
    DEFAULT_ENABLE_PREFIX_CACHING,
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    DEFAULT_MAX_NUM_WAITING,
    DEFAULT_PREEMPTION_MODE,
    PREEMPTION_MODES,
)
from pagedserve.services.scheduler.service import SchedulerServiceConfig, serve as serve_scheduler
from pagedserve.shared.sampling_params import SamplingParams


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    defaults = EngineConfig()
    parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:N (default: %(default)s)")
    parser.add_argument(
        "--dtype", default=defaults.dtype, choices=DTYPES,
        help="model and KV cache dtype (auto: bfloat16 on CUDA and on CPUs with AMX or AVX512-BF16, else float32)",
    )
    add_weight_format_flag(parser)
    parser.add_argument("--block-size", type=int, default=defaults.block_size, help="tokens per KV block")
    parser.add_argument("--kv-cache-memory", type=int, default=defaults.kv_cache_memory_bytes, help="KV cache bytes on CPU")
    parser.add_argument("--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization)
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="force the number of KV blocks")
    parser.add_argument("--max-model-len", type=int, default=None)
    add_batch_limit_flags(parser)
    parser.add_argument(
        "--swap-space", type=int, default=defaults.swap_space_bytes, metavar="BYTES",
        help="CPU swap pool for --preemption-mode swap (default 0: every preemption recomputes)",
    )
    add_tensor_parallel_flag(parser)
    parser.add_argument(
        "--collective-timeout", type=float, default=defaults.collective_timeout_s, metavar="SECONDS",
        help="tensor parallel: a collective not done in this time fails the step and the group is restarted",
    )


def add_weight_format_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weight-format", default=EngineConfig().weight_format, choices=WEIGHT_FORMATS,
        help="GGUF models: keep 4-bit weights packed for int4 matmuls (quantized) or expand them to the "
        "dtype at load (dequantized); auto: quantized on CPU in bf16/fp32 (default: %(default)s)",
    )


def add_tensor_parallel_flag(parser: argparse.ArgumentParser, *aliases: str) -> None:
    parser.add_argument(
        "--tensor-parallel-size", *aliases, type=int, default=EngineConfig().tensor_parallel_size, metavar="T",
        dest="tensor_parallel_size",
        help="ranks (processes, one per device) that split the model's heads and MLP between them (default: %(default)s)",
    )


def add_batch_limit_flags(parser: argparse.ArgumentParser) -> None:
    """The scheduler core's per-step limits, with its defaults (services/scheduler/config.py)."""
    parser.add_argument("--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS, help="requests running at once")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS,
        help="tokens computed in one step, over all requests",
    )


def add_preemption_mode_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preemption-mode", choices=PREEMPTION_MODES, default=DEFAULT_PREEMPTION_MODE,
        help="when KV blocks run out, drop a request's K/V and recompute it later, or swap it "
        "to the executor's CPU swap pool (--swap-space) and back (default: %(default)s)",
    )


def add_prefix_caching_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=DEFAULT_ENABLE_PREFIX_CACHING,
        help="reuse the KV cache of full blocks shared with earlier prompts "
        f"(default: {'on' if DEFAULT_ENABLE_PREFIX_CACHING else 'off'})",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        weight_format=args.weight_format,
        block_size=args.block_size,
        kv_cache_memory_bytes=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_kv_blocks=args.num_kv_blocks,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        swap_space_bytes=args.swap_space,
        tensor_parallel_size=args.tensor_parallel_size,
        collective_timeout_s=args.collective_timeout,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description="LLM serving built around PagedAttention")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate completions offline with the in-process engine")
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (default: read lines from stdin)")
    add_engine_flags(gen)
    add_prefix_caching_flag(gen)  # the scheduler's: an executor has no use for it
    add_preemption_mode_flag(gen)  # the scheduler's too
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as one user message in the chat template")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    gen.set_defaults(handler=run_generate)

    sched = sub.add_parser("scheduler", help="run the scheduler service (block allocator, batching)")
    add_scheduler_flags(sched)
    sched.set_defaults(handler=run_scheduler)

    ex = sub.add_parser("executor", help="run an executor (model + KV cache) for a scheduler")
    add_engine_flags(ex)
    executor_defaults = ExecutorConfig(EngineConfig())
    ex.add_argument("--scheduler-address", default=os.environ.get("PAGEDSERVE_EXECUTOR_ADDRESS", executor_defaults.scheduler_address))
    ex.add_argument("--executor-id", default=executor_defaults.executor_id)
    ex.add_argument("--heartbeat-interval", type=float, default=executor_defaults.heartbeat_interval_s, help="seconds between heartbeats")
    ex.add_argument(
        "--world-size", type=int, dest="tensor_parallel_size",
        help="tensor parallel: the group's number of ranks (same as --tensor-parallel-size; default: $WORLD_SIZE or 1)",
    )
    ex.set_defaults(tensor_parallel_size=int(os.environ.get("WORLD_SIZE", 1)))
    ex.add_argument(
        "--rank", type=int, default=int(os.environ.get("RANK", executor_defaults.rank)),
        help="tensor parallel: this executor's rank in its group, 0 .. T-1 (default: $RANK or 0)",
    )
    ex.add_argument(
        "--dist-init-address", default=os.environ.get("PAGEDSERVE_DIST_INIT_ADDRESS"), metavar="tcp://HOST:PORT",
        help="tensor parallel: the group's rendezvous, rank 0 listens there (default: torch's MASTER_ADDR/MASTER_PORT)",
    )
    add_curve_flag(ex)
    ex.set_defaults(handler=run_executor)

    gw = sub.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway")
    add_gateway_flags(gw)
    gw.add_argument(
        "--log-health-checks", action=argparse.BooleanOptionalAction, default=True,
        help="an access-log line for each GET /health (`up` turns it off: it polls while the model loads)",
    )
    gw.set_defaults(handler=run_gateway)

    up = sub.add_parser("up", help="run redis, scheduler, executor and gateway as local processes")
    add_up_flags(up)
    up.set_defaults(handler=run_up)

    keys = sub.add_parser("keys", help="generate the CURVE keypairs that --zmq-curve-keys DIR reads")
    keys.add_argument("directory", metavar="DIR")
    keys.add_argument("--force", action="store_true", help="replace keys already in DIR (running services are locked out)")
    keys.set_defaults(handler=run_keys)
    return parser


def add_curve_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--zmq-curve-keys", default=None, metavar="DIR",
        help="encrypt and authenticate the ZeroMQ links with the CURVE keys in DIR (from `pagedserve keys DIR`)",
    )


def add_scheduler_flags(parser: argparse.ArgumentParser) -> None:
    defaults = SchedulerServiceConfig()
    parser.add_argument("--gateway-address", default=defaults.gateway_address, help="ZMQ address to bind for gateways")
    parser.add_argument("--executor-address", default=defaults.executor_address, help="ZMQ address to bind for executors")
    add_batch_limit_flags(parser)
    parser.add_argument("--max-num-waiting", type=int, default=DEFAULT_MAX_NUM_WAITING, help="bound of the waiting queue (then 429)")
    parser.add_argument(
        "--heartbeat-timeout", type=float, default=defaults.heartbeat_timeout_s, metavar="SECONDS",
        help="an executor silent this long is lost: its running requests are requeued for recompute",
    )
    parser.add_argument(
        "--executor-timeout", type=float, default=defaults.executor_timeout_s, metavar="SECONDS",
        help="how long requeued requests wait for an executor to (re)join before failing with 503 "
        "(a restarted executor reloads the model: ~25 s for the embedded one on a busy 2-core CPU)",
    )
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--replica-id", default=defaults.replica_id)
    parser.add_argument(
        "--advertise-address", default=None,
        help="the gateway address registered in Redis for gateways to connect to (default: --gateway-address, "
        "a wildcard host replaced by this host's name)",
    )
    parser.add_argument(
        "--gateway-timeout", type=float, default=defaults.gateway_timeout_s, metavar="SECONDS",
        help="a gateway silent this long (it beats every second) is gone: its requests are aborted, their blocks freed",
    )
    add_prefix_caching_flag(parser)
    add_preemption_mode_flag(parser)
    add_async_scheduling_flag(parser)
    add_curve_flag(parser)


def add_async_scheduling_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--async-scheduling", action=argparse.BooleanOptionalAction, default=SchedulerServiceConfig().async_scheduling,
        help="schedule step n+1 while the executor runs step n, hiding the scheduler and both ZeroMQ hops "
        "behind the model (outputs are identical either way)",
    )


def add_up_flags(parser: argparse.ArgumentParser) -> None:
    gateway_defaults = GatewayConfig(gateway_id="")
    parser.add_argument("--host", default=gateway_defaults.host)
    parser.add_argument("--port", type=int, default=gateway_defaults.port)
    parser.add_argument("--model", default=None)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), help="default: start a local redis-server")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--admin-key", default=None)
    engine_defaults = EngineConfig()
    parser.add_argument("--kv-cache-memory", type=int, default=engine_defaults.kv_cache_memory_bytes)
    parser.add_argument("--block-size", type=int, default=engine_defaults.block_size)
    add_batch_limit_flags(parser)
    parser.add_argument("--dtype", default=engine_defaults.dtype, choices=DTYPES)
    add_weight_format_flag(parser)
    add_prefix_caching_flag(parser)
    add_preemption_mode_flag(parser)
    add_async_scheduling_flag(parser)
    parser.add_argument("--swap-space", type=int, default=engine_defaults.swap_space_bytes, metavar="BYTES", help="passed to the executor")
    add_tensor_parallel_flag(parser)
    parser.add_argument(
        "--replicas", type=int, default=1, metavar="R",
        help="copies of the model, each a scheduler with its executor; the gateway routes each request to the "
        "replica holding the longest cached prefix of its prompt, discounted by load (default: %(default)s)",
    )
    scheduler_defaults = SchedulerServiceConfig()
    parser.add_argument(
        "--heartbeat-timeout", type=float, default=scheduler_defaults.heartbeat_timeout_s, metavar="SECONDS",
        help="passed to the scheduler",
    )
    parser.add_argument(
        "--executor-timeout", type=float, default=scheduler_defaults.executor_timeout_s, metavar="SECONDS",
        help="passed to the scheduler",
    )
    parser.add_argument(
        "--zmq-curve-keys", default=None, metavar="DIR",
        help="CURVE-secure the services' ZeroMQ links with the keys in DIR (generated there if missing)",
    )


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def run_scheduler(args: argparse.Namespace) -> int:
    _configure_logging()
    serve_scheduler(
        SchedulerServiceConfig(
            gateway_address=args.gateway_address,
            executor_address=args.executor_address,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_waiting=args.max_num_waiting,
            heartbeat_timeout_s=args.heartbeat_timeout,
            executor_timeout_s=args.executor_timeout,
            redis_url=args.redis_url,
            replica_id=args.replica_id,
            advertise_address=args.advertise_address,
            gateway_timeout_s=args.gateway_timeout,
            enable_prefix_caching=args.enable_prefix_caching,
            preemption_mode=args.preemption_mode,
            async_scheduling=args.async_scheduling,
            curve_keys_dir=args.zmq_curve_keys,
        ),
        _stop_on_signals(),
    )
    return 0


def run_executor(args: argparse.Namespace) -> int:
    from pagedserve.services.executor.service import serve

    _configure_logging()
    serve(
        ExecutorConfig(
            engine=engine_config_from_args(args),
            scheduler_address=args.scheduler_address,
            executor_id=args.executor_id,
            heartbeat_interval_s=args.heartbeat_interval,
            curve_keys_dir=args.zmq_curve_keys,
            rank=args.rank,
            dist_init_address=args.dist_init_address,
        ),
        _stop_on_signals(),
    )
    return 0


def _is_not_a_health_check(record: logging.LogRecord) -> bool:
    """False for uvicorn's access-log line of a GET /health ('%s - "%s %s HTTP/%s" %d')."""
    return '"GET /health HTTP/' not in record.getMessage()


def run_gateway(args: argparse.Namespace) -> int:
    from pagedserve.services.gateway.server import serve

    _configure_logging()
    if not args.log_health_checks:
        # On the logger, not a handler: uvicorn's logging set-up replaces the handlers of
        # "uvicorn.access" and keeps its filters.
        logging.getLogger("uvicorn.access").addFilter(_is_not_a_health_check)
    serve(gateway_config_from_args(args))
    return 0


def run_keys(args: argparse.Namespace) -> int:
    from pagedserve.shared.zmq_security import generate_curve_keys

    try:
        created = generate_curve_keys(args.directory, overwrite=args.force)
    except OSError as error:
        print(f"pagedserve keys: error: {error}", file=sys.stderr)
        return 1
    if created:
        print(f"wrote CURVE keypairs to {args.directory}: server.key(_secret) for the scheduler, client.key(_secret) for gateways and executors")
    else:
        print(f"CURVE keys already in {args.directory}; kept them (--force replaces them)")
    return 0


def run_up(args: argparse.Namespace) -> int:
    from pagedserve.services.launcher import launch

    _configure_logging()
    return launch(args)


def run_generate(args: argparse.Namespace) -> int:
    from pagedserve.services.engine import LLMEngine
    from pagedserve.shared.tokenizer import encode_chat

    prompts = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        print("pagedserve generate: no prompt given", file=sys.stderr)
        return 2
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    try:
        params.validate()
    except ValueError as error:
        print(f"pagedserve generate: {error}", file=sys.stderr)
        return 2
    try:
        engine = LLMEngine(
            msgspec.structs.replace(
                engine_config_from_args(args),
                enable_prefix_caching=args.enable_prefix_caching,
                preemption_mode=args.preemption_mode,
            )
        )
        inputs: list[str | list[int]] = (
            [encode_chat(engine.tokenizer, [{"role": "user", "content": p}]) for p in prompts] if args.chat else list(prompts)
        )
        with engine:  # ends its tensor-parallel ranks, if any
            completions = engine.generate(inputs, params)
    except (OSError, ValueError) as error:
        # A missing or unreadable model file, or a prompt the engine refuses (too long
        # for the context or the KV pool): one line for the user, not a traceback.
        print(f"pagedserve generate: error: {error}", file=sys.stderr)
        return 1
    for prompt, completion in zip(prompts, completions):
        if args.json:
            print(json.dumps({"prompt": prompt, "token_ids": completion.token_ids, "text": completion.text}), flush=True)
        else:
            print(f"### {prompt}\n{completion.text}\n[{len(completion.token_ids)} tokens, {completion.finish_reason}]\n", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    raise SystemExit(args.handler(args))


if __name__ == "__main__":
    main()
