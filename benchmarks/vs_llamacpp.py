"""pagedserve vs llama.cpp's `llama-server` on the same GGUF, over HTTP, and HF transformers, one run.

    python -m benchmarks.vs_llamacpp [--concurrency 1,8,32] [--max-tokens 128]
                                     [--requests 64] [--requests-at-1 8] [--plot FILE.png] [--no-hf]

The same streamed chat workload goes to each server, one server at a time and one
concurrency level after the other: 64 templated chat prompts (37-254 tokens with the
model's chat template), 128 output tokens each (EOS ignored), at 1, 8 and 32 concurrent
streams (at 1 stream, `--requests-at-1` of them: the whole set would take minutes for
nothing a few cannot show). Prints, per server and level, output tok/s (all output tokens
over the wall time of the level), mean time to first token and mean inter-token latency
(per stream, the gaps between its content chunks), then pagedserve's ratios; writes a PNG
of tok/s and inter-token latency against concurrency when matplotlib is installed (it is
a benchmark-only dependency; without it the plot is skipped with a message).

HF transformers is the third line (`--no-hf` skips it): it does not serve streams, so each
concurrency level is what a server built on `generate` would do with that many clients:
static batches of that many prompts (left-padded, fp32, the GGUF dequantized as HF loads
it), each running until all of its requests have their tokens, the next batch waiting.
Its TTFT counts the wait for earlier batches; its inter-token latency is the time between
the batch's decode steps (taken from a stopping criterion called after every step).

llama-server is built once from the `llama-cpp-python` sdist on the registry (it vendors
llama.cpp; cmake + ninja, about 7 minutes on 2 cores) and cached under
~/.cache/pagedserve/llama.cpp/. It runs with continuous batching and 32 slots, as many
threads as there are cores, and `--no-repack` (its AMX repacked matmul segfaults at start
on some AMX machines; its AVX-512 kernels run instead). Not part of CI.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pagedserve.services.launcher import free_port, terminate, up_in_background
from pagedserve.shared.model_source import resolve_model_source

CACHE_DIR = Path.home() / ".cache" / "pagedserve" / "llama.cpp"
KV_CACHE_MEMORY = 1 << 30

SUBJECTS = [
    "the water cycle", "how vaccines work", "the history of the printing press", "black holes",
    "photosynthesis", "the French revolution", "how a compiler works", "plate tectonics",
    "the immune system", "renewable energy", "the Roman empire", "machine learning",
    "how bread rises", "the theory of evolution", "ocean currents", "the invention of the telephone",
]
TEMPLATES = [
    "Explain {s} to a ten-year-old.",
    "Write a short essay about {s}. Cover its main ideas, why it matters, and one common misconception, "
    "and finish with a question a curious student might ask next.",
    "I am preparing a lecture on {s}. Give me an outline with five sections, a one-sentence summary of each, "
    "two examples I could use in class, and a short quiz of three questions with their answers. Keep the "
    "language simple, avoid jargon where you can, and say which parts students usually find the hardest and "
    "why. Then suggest a small experiment or demonstration that makes the topic concrete, list what it needs, "
    "and describe step by step how to run it safely in a classroom of thirty students in under twenty minutes.",
    "Summarise {s} in three bullet points.",
]


def chat_prompts(num_prompts: int) -> list[list[dict[str, str]]]:
    """Deterministic chat conversations of varied length (one user message each)."""
    return [
        [{"role": "user", "content": TEMPLATES[i % len(TEMPLATES)].format(s=SUBJECTS[(i // len(TEMPLATES) + i) % len(SUBJECTS)])}]
        for i in range(num_prompts)
    ]


# --- llama.cpp ---------------------------------------------------------------------------


def llama_server_binary() -> Path:
    """The cached llama-server, built from the llama-cpp-python sdist on first use."""
    cached = sorted(CACHE_DIR.glob("*/llama-server"))
    if cached:
        return cached[-1]
    with tempfile.TemporaryDirectory() as tmp:
        print("building llama-server from the llama-cpp-python sdist (about 7 minutes on 2 cores)...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python", "-d", tmp],
            check=True,
        )
        (sdist,) = glob.glob(os.path.join(tmp, "llama_cpp_python-*.tar.gz"))
        version = Path(sdist).name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        source = Path(tmp) / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
        build = Path(tmp) / "build"
        subprocess.run(
            ["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_CURL=OFF",
             "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF"],
            check=True,
        )
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 1)], check=True)
        target = CACHE_DIR / version / "llama-server"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / "bin" / "llama-server", target)
        return target


def start_llama_server(binary: Path, gguf: Path, port: int, slots: int) -> subprocess.Popen[str]:
    threads = str(os.cpu_count() or 1)
    command = [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", threads, "-tb", threads,
        "-c", str(512 * slots), "-np", str(slots), "-cb", "-kvu", "--no-repack",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama-server exited with {process.returncode} at start")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)  # polling a starting process for its health; no synchronisation involved
    process.kill()
    raise RuntimeError("llama-server was not healthy within 300 s")


# --- pagedserve --------------------------------------------------------------------------


# --- HF transformers --------------------------------------------------------------------


class _StepClock:
    """A stopping criterion that never stops: it notes when each decode step ended."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):  # type: ignore[no-untyped-def]
        import torch

        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def run_hf(gguf: Path, prompts: list[list[dict[str, str]]], levels: list[int], max_tokens: int, requests_at_1: int) -> list[LevelStats]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True) for m in prompts]
    encoded = [list(e["input_ids"]) if isinstance(e, dict) or hasattr(e, "keys") else list(e) for e in encoded]
    results = []
    for concurrency in levels:
        subset = encoded[:requests_at_1] if concurrency == 1 else encoded
        streams: list[StreamStats] = []
        start = time.perf_counter()
        for i in range(0, len(subset), concurrency):
            batch = subset[i : i + concurrency]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            clock = _StepClock()
            with torch.no_grad():
                model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                               do_sample=False, pad_token_id=pad, stopping_criteria=StoppingCriteriaList([clock]))
            gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]
            streams += [StreamStats(max_tokens, clock.times[0] - start, list(gaps)) for _ in batch]
        results.append(LevelStats(concurrency, time.perf_counter() - start, streams))
        print(f"  HF transformers: {concurrency} streams: {results[-1].tok_s:.1f} tok/s", flush=True)
    return results


# --- the workload ------------------------------------------------------------------------


@dataclass
class StreamStats:
    num_tokens: int = 0
    ttft_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)


@dataclass
class LevelStats:
    concurrency: int
    wall_s: float
    streams: list[StreamStats]

    @property
    def tok_s(self) -> float:
        return sum(s.num_tokens for s in self.streams) / self.wall_s

    @property
    def mean_ttft_s(self) -> float:
        return sum(s.ttft_s for s in self.streams) / len(self.streams)

    @property
    def mean_itl_s(self) -> float:
        gaps = [g for s in self.streams for g in s.gaps_s]
        return sum(gaps) / len(gaps) if gaps else 0.0


async def one_stream(client: httpx.AsyncClient, url: str, model: str, messages: list[dict[str, str]], max_tokens: int) -> StreamStats:
    body = {
        "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }
    stats = StreamStats()
    start = time.perf_counter()
    last = None
    num_chunks = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                stats.num_tokens = chunk["usage"]["completion_tokens"]
            if not any((choice.get("delta") or {}).get("content") for choice in chunk.get("choices", [])):
                continue
            now = time.perf_counter()
            num_chunks += 1
            if last is None:
                stats.ttft_s = now - start
            else:
                stats.gaps_s.append(now - last)
            last = now
    stats.num_tokens = stats.num_tokens or num_chunks
    return stats


async def run_level(url: str, prompts: list[list[dict[str, str]]], concurrency: int, max_tokens: int) -> LevelStats:
    # No keep-alive: llama-server closes an idle connection that httpx would reuse for the
    # next stream ("Server disconnected without sending a response").
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1200.0), limits=limits) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        await one_stream(client, url, model, prompts[0], 4)  # warm-up
        gate = asyncio.Semaphore(concurrency)

        async def gated(messages: list[dict[str, str]]) -> StreamStats:
            async with gate:
                return await one_stream(client, url, model, messages, max_tokens)

        start = time.perf_counter()
        streams = await asyncio.gather(*(gated(m) for m in prompts))
        return LevelStats(concurrency, time.perf_counter() - start, list(streams))


def run_server(url: str, prompts: list[list[dict[str, str]]], levels: list[int], max_tokens: int, requests_at_1: int) -> list[LevelStats]:
    results = []
    for concurrency in levels:
        subset = prompts[:requests_at_1] if concurrency == 1 else prompts
        results.append(asyncio.run(run_level(url, subset, concurrency, max_tokens)))
        print(f"  {url}: {concurrency} streams: {results[-1].tok_s:.1f} tok/s", flush=True)
    return results


def plot(results: dict[str, list[LevelStats]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written ({path}); `pip install matplotlib` to get one")
        return
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for server, levels in results.items():
        x = [level.concurrency for level in levels]
        left.plot(x, [level.tok_s for level in levels], marker="o", label=server)
        right.plot(x, [1000 * level.mean_itl_s for level in levels], marker="o", label=server)
    for axis, title in ((left, "output tok/s"), (right, "mean inter-token latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent streams")
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--requests-at-1", type=int, default=8)
    parser.add_argument("--plot", default="benchmarks/vs_llamacpp.png")
    parser.add_argument("--pagedserve-args", default="", help="extra `pagedserve up` flags, e.g. '--dtype bfloat16'")
    parser.add_argument("--no-hf", action="store_true", help="skip HF transformers' static batches")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = chat_prompts(args.requests)
    source = resolve_model_source(None)
    if not source.gguf_file:
        raise SystemExit("the default model is not a GGUF: llama-server needs one")
    gguf = Path(source.directory) / source.gguf_file
    binary = llama_server_binary()
    print(f"{args.requests} chat prompts, {args.max_tokens} output tokens each (EOS ignored), {os.cpu_count()} CPUs, "
          f"model {gguf.name}", flush=True)

    results: dict[str, list[LevelStats]] = {}
    port = free_port()
    process = start_llama_server(binary, gguf, port, slots=max(levels))
    try:
        results["llama-server"] = run_server(f"http://127.0.0.1:{port}", prompts, levels, args.max_tokens, args.requests_at_1)
    finally:
        terminate(process, timeout_s=60)
    up_args = ["--kv-cache-memory", str(KV_CACHE_MEMORY), "--max-num-seqs", str(max(levels)), *args.pagedserve_args.split()]
    with up_in_background(up_args) as url:
        results["pagedserve"] = run_server(url, prompts, levels, args.max_tokens, args.requests_at_1)
    if not args.no_hf:
        results["HF transformers (static batches)"] = run_hf(gguf, prompts, levels, args.max_tokens, args.requests_at_1)

    print("\n| server | streams | output tok/s | mean TTFT (s) | mean inter-token latency (ms) |\n|---|---|---|---|---|")
    for server, server_levels in results.items():
        for level in server_levels:
            print(f"| {server} | {level.concurrency} | {level.tok_s:.1f} | {level.mean_ttft_s:.2f} | {1000 * level.mean_itl_s:.1f} |")
    print("\n| streams | pagedserve / llama-server tok/s | TTFT ratio | inter-token latency ratio |\n|---|---|---|---|")
    summary = []
    for ours, theirs in zip(results["pagedserve"], results["llama-server"]):
        ratio = ours.tok_s / theirs.tok_s
        print(f"| {ours.concurrency} | {ratio:.2f}x | {ours.mean_ttft_s / theirs.mean_ttft_s:.2f} | "
              f"{ours.mean_itl_s / theirs.mean_itl_s if theirs.mean_itl_s else float('nan'):.2f} |")
        summary.append({"streams": ours.concurrency, "pagedserve_tok_s": round(ours.tok_s, 1),
                        "llama_server_tok_s": round(theirs.tok_s, 1), "ratio": round(ratio, 2)})
    hf = results.get("HF transformers (static batches)")
    if hf:
        print("\n| streams | pagedserve / HF static batches tok/s |\n|---|---|")
        for ours, row, theirs in zip(results["pagedserve"], summary, hf):
            print(f"| {ours.concurrency} | {ours.tok_s / theirs.tok_s:.2f}x |")
            row["hf_tok_s"] = round(theirs.tok_s, 1)
    plot(results, args.plot)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
