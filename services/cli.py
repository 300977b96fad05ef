"""The `pagedserve` command: one subcommand per job, each building its typed config from
flags in one place. Flags take their defaults from those configs (EngineConfig and its
SchedulingLimits, SchedulerServiceConfig, GatewayConfig, ExecutorConfig).

The rule for every flag: its argparse `dest` is the name of the config field it sets
(`dest="kv_cache_memory_bytes"` for `--kv-cache-memory`). `config_from_args` then builds a
config from any subcommand's flags, and the launcher turns configs back into each child's
argv (`config_argv`, services/config_flags.py); tests/cli/test_up_flags.py checks that
every `pagedserve up` flag reaches the process that uses it. A new setting is a field plus
one `add_argument` here (and, if `up` should offer it, in a group `up` adds).

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

from pagedserve.services.config_flags import config_from_args
from pagedserve.services.engine.config import DTYPES, WEIGHT_FORMATS, EngineConfig
from pagedserve.services.executor.config import ExecutorConfig
from pagedserve.services.gateway.config import (
    GatewayConfig,
    add_gateway_flags,
    add_gateway_serving_flags,
    gateway_config_from_args,
)
from pagedserve.services.scheduler.service import SchedulerServiceConfig, serve as serve_scheduler
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import PREEMPTION_MODES, SchedulingLimits


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """EngineConfig's own fields (its limits are `add_scheduling_limit_flags`)."""
    defaults = EngineConfig()
    parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:N (default: %(default)s)")
    parser.add_argument(
        "--dtype", default=defaults.dtype, choices=DTYPES,
        help="model and KV cache dtype (auto: bfloat16 on CUDA and on CPUs with AMX or AVX512-BF16, else float32)",
    )
    parser.add_argument(
        "--weight-format", default=defaults.weight_format, choices=WEIGHT_FORMATS,
        help="GGUF models: keep 4-bit weights packed for int4 matmuls (quantized) or expand them to the "
        "dtype at load (dequantized); auto: quantized on CPU in bf16/fp32 (default: %(default)s)",
    )
    parser.add_argument("--block-size", type=int, default=defaults.block_size, help="tokens per KV block")
    parser.add_argument(
        "--kv-cache-memory", dest="kv_cache_memory_bytes", type=int, default=defaults.kv_cache_memory_bytes,
        metavar="BYTES", help="KV cache bytes on CPU",
    )
    parser.add_argument("--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization)
    parser.add_argument("--num-kv-blocks", type=int, default=defaults.num_kv_blocks, help="force the number of KV blocks")
    parser.add_argument(
        "--swap-space", dest="swap_space_bytes", type=int, default=defaults.swap_space_bytes, metavar="BYTES",
        help="CPU swap pool for --preemption-mode swap (default 0: every preemption recomputes)",
    )
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=defaults.tensor_parallel_size, metavar="T",
        help="ranks (processes, one per device) that split the model's heads and MLP between them (default: %(default)s)",
    )
    parser.add_argument(
        "--collective-timeout", dest="collective_timeout_s", type=float, default=defaults.collective_timeout_s,
        metavar="SECONDS",
        help="tensor parallel: a collective not done in this time fails the step and the group is restarted",
    )


def add_scheduling_limit_flags(parser: argparse.ArgumentParser) -> None:
    """SchedulingLimits, one flag per field, its defaults (shared/scheduling_limits.py)."""
    defaults = SchedulingLimits()
    parser.add_argument(
        "--max-model-len", type=int, default=defaults.max_model_len,
        help="prompt + output tokens of one request (default: the model's max positions)",
    )
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs, help="requests running at once")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens,
        help="tokens computed in one step, over all requests",
    )
    parser.add_argument(
        "--max-num-waiting", type=int, default=defaults.max_num_waiting, help="bound of the waiting queue (then 429)"
    )
    parser.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=defaults.enable_prefix_caching,
        help="reuse the KV cache of full blocks shared with earlier prompts "
        f"(default: {'on' if defaults.enable_prefix_caching else 'off'})",
    )
    parser.add_argument(
        "--preemption-mode", choices=PREEMPTION_MODES, default=defaults.preemption_mode,
        help="when KV blocks run out, drop a request's K/V and recompute it later, or swap it "
        "to the executor's CPU swap pool (--swap-space) and back (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description="LLM serving built around PagedAttention")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate completions offline with the in-process engine")
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (default: read lines from stdin)")
    add_engine_flags(gen)
    add_scheduling_limit_flags(gen)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as one user message in the chat template")
    gen.add_argument(
        "--chat-template", default=None, metavar="FILE", help="a Jinja chat template replacing the model's own (for --chat)"
    )
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    gen.set_defaults(handler=run_generate)

    sched = sub.add_parser("scheduler", help="run the scheduler service (block allocator, batching)")
    add_scheduler_flags(sched)
    sched.set_defaults(handler=run_scheduler)

    ex = sub.add_parser("executor", help="run an executor (model + KV cache) for a scheduler")
    add_executor_flags(ex)
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


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    """The parser of `pagedserve <name>` (the launcher spells its children's argv by it)."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[name]


def add_curve_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--zmq-curve-keys", dest="curve_keys_dir", default=None, metavar="DIR",
        help="encrypt and authenticate the ZeroMQ links with the CURVE keys in DIR (from `pagedserve keys DIR`)",
    )


def add_executor_flags(parser: argparse.ArgumentParser) -> None:
    add_engine_flags(parser)
    add_scheduling_limit_flags(parser)  # it sizes its batch by them
    defaults = ExecutorConfig(EngineConfig())
    parser.add_argument(
        "--scheduler-address", default=os.environ.get("PAGEDSERVE_EXECUTOR_ADDRESS", defaults.scheduler_address)
    )
    parser.add_argument("--executor-id", default=defaults.executor_id)
    parser.add_argument(
        "--heartbeat-interval", dest="heartbeat_interval_s", type=float, default=defaults.heartbeat_interval_s,
        metavar="SECONDS", help="seconds between heartbeats",
    )
    parser.add_argument(
        "--world-size", type=int, dest="tensor_parallel_size",
        help="tensor parallel: the group's number of ranks (same as --tensor-parallel-size; default: $WORLD_SIZE or 1)",
    )
    parser.set_defaults(tensor_parallel_size=int(os.environ.get("WORLD_SIZE", defaults.engine.tensor_parallel_size)))
    parser.add_argument(
        "--rank", type=int, default=int(os.environ.get("RANK", defaults.rank)),
        help="tensor parallel: this executor's rank in its group, 0 .. T-1 (default: $RANK or 0)",
    )
    parser.add_argument(
        "--dist-init-address", default=os.environ.get("PAGEDSERVE_DIST_INIT_ADDRESS"), metavar="tcp://HOST:PORT",
        help="tensor parallel: the group's rendezvous, rank 0 listens there (default: torch's MASTER_ADDR/MASTER_PORT)",
    )
    add_curve_flag(parser)


def add_scheduler_flags(parser: argparse.ArgumentParser) -> None:
    defaults = SchedulerServiceConfig()
    parser.add_argument("--gateway-address", default=defaults.gateway_address, help="ZMQ address to bind for gateways")
    parser.add_argument("--executor-address", default=defaults.executor_address, help="ZMQ address to bind for executors")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--replica-id", default=defaults.replica_id)
    parser.add_argument(
        "--advertise-address", default=defaults.advertise_address,
        help="the gateway address registered in Redis for gateways to connect to (default: --gateway-address, "
        "a wildcard host replaced by this host's name)",
    )
    add_scheduling_limit_flags(parser)
    add_scheduler_serving_flags(parser)
    add_curve_flag(parser)


def add_scheduler_serving_flags(parser: argparse.ArgumentParser) -> None:
    """How the scheduler service runs (beyond its limits): `pagedserve up` offers these as
    they are, and hands them to its schedulers."""
    defaults = SchedulerServiceConfig()
    parser.add_argument(
        "--heartbeat-timeout", dest="heartbeat_timeout_s", type=float, default=defaults.heartbeat_timeout_s,
        metavar="SECONDS",
        help="an executor silent this long is lost: its running requests are requeued for recompute",
    )
    parser.add_argument(
        "--executor-timeout", dest="executor_timeout_s", type=float, default=defaults.executor_timeout_s,
        metavar="SECONDS",
        help="how long requeued requests wait for an executor to (re)join before failing with 503 "
        "(a restarted executor reloads the model: ~25 s for the embedded one on a busy 2-core CPU)",
    )
    parser.add_argument(
        "--gateway-timeout", dest="gateway_timeout_s", type=float, default=defaults.gateway_timeout_s, metavar="SECONDS",
        help="a gateway silent this long (it beats every second) is gone: its requests are aborted, their blocks freed",
    )
    parser.add_argument(
        "--max-requeues", type=int, default=defaults.max_requeues, metavar="N",
        help="a request running each time an executor is lost is requeued at most N times, then fails (it may be "
        "what crashes the executor)",
    )
    parser.add_argument(
        "--async-scheduling", action=argparse.BooleanOptionalAction, default=defaults.async_scheduling,
        help="schedule step n+1 while the executor runs step n, hiding the scheduler and both ZeroMQ hops "
        "behind the model (outputs are identical either way)",
    )


def add_up_flags(parser: argparse.ArgumentParser) -> None:
    """`up`'s own flags, then every setting of the services it starts: the engine's and its
    limits (executor, scheduler), the scheduler's and the gateway's serving flags. The
    launcher hands each child the ones it parses (services/launcher.py)."""
    gateway_defaults = GatewayConfig(gateway_id="")
    parser.add_argument("--host", default=gateway_defaults.host)
    parser.add_argument("--port", type=int, default=gateway_defaults.port)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), help="default: start a local redis-server")
    parser.add_argument("--api-key", default=None, help="require this Bearer token on /v1 (passed to the gateway by environment)")
    parser.add_argument("--admin-key", default=None, help="require this Bearer token on /admin/scheduler (likewise)")
    parser.add_argument(
        "--replicas", type=int, default=1, metavar="R",
        help="copies of the model, each a scheduler with its executor; the gateway routes each request to the "
        "replica holding the longest cached prefix of its prompt, discounted by load (default: %(default)s)",
    )
    parser.add_argument(
        "--zmq-curve-keys", dest="curve_keys_dir", default=None, metavar="DIR",
        help="CURVE-secure the services' ZeroMQ links with the keys in DIR (generated there if missing)",
    )
    add_engine_flags(parser)
    add_scheduling_limit_flags(parser)
    add_scheduler_serving_flags(parser)
    add_gateway_serving_flags(parser)


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def run_scheduler(args: argparse.Namespace) -> int:
    _configure_logging()
    serve_scheduler(config_from_args(SchedulerServiceConfig, args), _stop_on_signals())
    return 0


def run_executor(args: argparse.Namespace) -> int:
    from pagedserve.services.executor.service import serve

    _configure_logging()
    serve(config_from_args(ExecutorConfig, args), _stop_on_signals())
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
    from pagedserve.shared.tokenizer import encode_chat, read_chat_template

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
        template = read_chat_template(args.chat_template) if args.chat_template else None  # before the model loads
        engine = LLMEngine(config_from_args(EngineConfig, args))
        if template is not None:
            engine.tokenizer.chat_template = template
        if args.chat and not engine.tokenizer.chat_template:
            raise ValueError("the model has no chat template: pass --chat-template FILE (a Jinja chat template)")
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
