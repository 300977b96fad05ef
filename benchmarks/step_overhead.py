"""Where a decode step's fixed time goes outside the model, at batch 1, 8 and 32: the
scheduler core (schedule + update), msgspec encoding and decoding of the step and its
result, and a ZeroMQ round trip over TCP on localhost with frames of those sizes; beside
the model's own decode step from the in-process engine (`--no-model` skips it).

    python -m benchmarks.step_overhead [--batches 1,8,32] [--no-model]

With asynchronous scheduling (the default) the scheduler's share and one of the two hops
run while the executor computes the previous step; synchronously, all of it lies between
two forwards. Medians of repeated runs, microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable

import msgspec
import zmq

from pagedserve.services.scheduler.config import SchedulerConfig
from pagedserve.services.scheduler.request import Request
from pagedserve.services.scheduler.scheduler import Scheduler
from pagedserve.shared.messages import ExecutorMessage, SampledToken, StepMessage, StepResult, StepResultMessage
from pagedserve.shared.sampling_params import SamplingParams
from pagedserve.shared.scheduling_limits import SchedulingLimits
from pagedserve.shared.transport import encode

PROMPT_LEN = 128
REPEATS = 200


def median_us(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def decode_steps(batch: int) -> tuple[Scheduler, list[float]]:
    """A scheduler with `batch` requests past their prefill; per decode step, the time of
    schedule + update (fake result: token 7 for each)."""
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    sched = Scheduler(SchedulerConfig(limits=SchedulingLimits(max_model_len=8192, max_num_seqs=batch, max_num_batched_tokens=8192)), 4096, 16)
    for i in range(batch):
        sched.add_request(Request(f"cmpl-{i:032x}", list(range(100, 100 + PROMPT_LEN)), params, arrival_time=float(i)))
    times = []
    for index in range(REPEATS + 1):
        start = time.perf_counter()
        step = sched.schedule()
        result = StepResult(step.step_id, [SampledToken(r.request_id, 7) for r in (*step.new_requests, *step.cached_requests)])
        sched.update_from_output(step, result)
        if index:  # the first is the prefill
            times.append(time.perf_counter() - start)
    return sched, times


def zmq_round_trip_us(request_frames: list[bytes], reply_frames: list[bytes]) -> float:
    """A ROUTER (the scheduler) sends the step frames to a DEALER (the executor) on another
    thread, which answers with the result frames: the transport of one step, both ways."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    ready = threading.Event()

    def executor() -> None:
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, b"ex")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send_multipart(reply_frames)  # announce
        ready.set()
        for _ in range(REPEATS + 1):
            dealer.recv_multipart()
            dealer.send_multipart(reply_frames)
        dealer.close()

    thread = threading.Thread(target=executor)
    thread.start()
    router.recv_multipart()
    times = []
    for _ in range(REPEATS + 1):
        start = time.perf_counter()
        router.send_multipart([b"ex", *request_frames])
        router.recv_multipart()
        times.append(time.perf_counter() - start)
    thread.join()
    router.close()
    context.term()
    return 1e6 * statistics.median(times[1:])


def model_decode_step_us(batch: int) -> float:
    from pagedserve.services.engine import LLMEngine
    from pagedserve.services.engine.config import EngineConfig

    engine = LLMEngine(EngineConfig(kv_cache_memory_bytes=256 << 20, limits=SchedulingLimits(max_num_seqs=batch)))
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(list(range(100 + i, 100 + i + PROMPT_LEN)), params)
    engine.step()  # the prefill
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--no-model", action="store_true")
    args = parser.parse_args()
    step_decoder = msgspec.msgpack.Decoder(StepMessage)
    result_decoder = msgspec.msgpack.Decoder(ExecutorMessage)
    print("| batch | scheduler (schedule + update) | encode + decode step | encode + decode result | "
          "ZeroMQ round trip | step / result bytes | engine decode step |")
    print("|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        sched, times = decode_steps(batch)
        step = sched.schedule()
        result = StepResult(step.step_id, [SampledToken(r.request_id, 7) for r in step.cached_requests])
        step_frames, result_frames = encode(StepMessage(step)), encode(StepResultMessage(result))
        step_us = median_us(lambda: step_decoder.decode(encode(StepMessage(step))[1]))
        result_us = median_us(lambda: result_decoder.decode(encode(StepResultMessage(result))[1]))
        transport_us = zmq_round_trip_us(step_frames, result_frames)
        model = "" if args.no_model else f"{model_decode_step_us(batch) / 1000:.1f} ms"
        print(f"| {batch} | {1e6 * statistics.median(times):.0f} us | {step_us:.0f} us | {result_us:.0f} us | "
              f"{transport_us:.0f} us | {len(step_frames[1])} / {len(result_frames[1])} | {model} |", flush=True)


if __name__ == "__main__":
    main()
