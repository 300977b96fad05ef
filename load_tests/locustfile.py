"""Streaming load against the OpenAI-compatible gateway.

Two user kinds stream `/v1/chat/completions` and `/v1/completions` with a synthetic
workload of mixed prompt and output lengths. Besides locust's own entry per request
(which, for a stream, only times the response headers) every stream reports three entries
of its own, named by endpoint:

- `TTFT`: request start to the first chunk that carries text (time to first token);
- `ITL`: the gap between consecutive text chunks (inter-token latency), one sample per gap;
- `E2E`: request start to `data: [DONE]`; its "size" column is the number of text chunks.

The gateway sends one chunk per detokenized step, so a chunk is a token except where
the detokenizer holds back an incomplete UTF-8 sequence.

Headless, with CSV stats (what `make loadtest` and the compose `locust` service run):

    locust -f load_tests/locustfile.py --headless -u 8 -r 2 -t 60s --stop-timeout 60 \
        --host http://127.0.0.1:8000 --csv load_tests/results/stats

Environment: `PAGEDSERVE_API_KEY` (sent as a bearer token when set), `LOADTEST_SEED`
(default 0; the workload is reproducible for a seed and a user count), `LOADTEST_MODEL`
(default: the first id that `GET /v1/models` lists).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections.abc import Callable
from typing import Any

import gevent
import requests
from locust import HttpUser, between, events, task
from locust.stats import CSV_STATS_INTERVAL_SEC

# A small closed vocabulary keeps prompts tokenizer-friendly (mostly one token per word)
# so that the word count is a fair proxy for the prompt length in tokens.
VOCABULARY: tuple[str, ...] = tuple(
    """the a of to and in is it that for on with as was at by an be this from or are not
    have has one all were when we there can more if out so up said what about time into
    only new some could than first them other then now like over way people also after
    water light cache block memory paper page table kernel batch token model queue engine
    request server river mountain city garden music story window market train bridge
    forest ocean planet winter summer morning evening quiet bright small large old young
    simple careful quick slow green blue red yellow ancient modern distant gentle""".split()
)

# (weight, fewest words, most words): mostly short prompts, some medium, a few long ones,
# so prefill-heavy and decode-heavy requests share batches as they do in real traffic.
PROMPT_WORDS: tuple[tuple[int, int, int], ...] = ((60, 4, 48), (30, 48, 256), (10, 256, 768))
MIN_OUTPUT_TOKENS, MAX_OUTPUT_TOKENS = 8, 128

# Requests' read timeout is per socket read: a stream may take long, but a gap this long
# between chunks means the server is stuck.
TIMEOUT_S = (10.0, 120.0)

# Each user draws from its own generator, seeded by LOADTEST_SEED and the order in which
# users start, so a run is reproducible yet users do not send identical streams.
_user_numbers = itertools.count()


@events.quit.add_listener
def _let_the_csv_writer_catch_up(**_: Any) -> None:
    """Locust rewrites its CSV files every CSV_STATS_INTERVAL_SEC and closes them right
    after this event without a last write, so streams that finished during --stop-timeout
    (seconds long, so there are always some) would be missing from the CSV though present
    in the printed summary. Yielding for one interval gives the writer that last turn."""
    gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)


def prompt_text(rng: random.Random) -> str:
    weights = [weight for weight, _, _ in PROMPT_WORDS]
    _, fewest, most = rng.choices(PROMPT_WORDS, weights=weights)[0]
    return " ".join(rng.choices(VOCABULARY, k=rng.randint(fewest, most)))


def chat_text(event: dict[str, Any]) -> str:
    choices = event.get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or ""


def completion_text(event: dict[str, Any]) -> str:
    choices = event.get("choices") or [{}]
    return choices[0].get("text") or ""


class StreamingUser(HttpUser):
    """Sends one streaming request per task and reports TTFT, ITL and E2E for it."""

    abstract = True
    wait_time = between(0.0, 0.5)
    path: str = ""

    def on_start(self) -> None:
        seed = int(os.environ.get("LOADTEST_SEED", "0"))
        self.rng = random.Random(seed * 1_000_003 + next(_user_numbers))
        api_key = os.environ.get("PAGEDSERVE_API_KEY")
        if api_key:
            self.client.headers["Authorization"] = f"Bearer {api_key}"
        self.model = os.environ.get("LOADTEST_MODEL") or self._served_model()

    def _served_model(self) -> str:
        # The OpenAI API requires `model`; asking the server keeps the file model-agnostic.
        with self.client.get("/v1/models", name="/v1/models", catch_response=True, timeout=TIMEOUT_S) as response:
            try:
                return str(response.json()["data"][0]["id"])
            except (ValueError, KeyError, IndexError, TypeError):
                response.failure(f"no model listed: HTTP {response.status_code} {response.text[:200]!r}")
                return "default"

    def sampling(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "stream": True,
            "max_tokens": self.rng.randint(MIN_OUTPUT_TOKENS, MAX_OUTPUT_TOKENS),
            "temperature": 0.7,
        }

    def stream(self, body: dict[str, Any], text_of: Callable[[dict[str, Any]], str]) -> None:
        started = time.perf_counter()
        chunk_times: list[float] = []
        with self.client.post(
            self.path, json=body, stream=True, catch_response=True, name=self.path, timeout=TIMEOUT_S
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]!r}")
                return
            finished = False
            try:
                for line in response.iter_lines():
                    if not line.startswith(b"data:"):
                        continue  # blank separators, SSE comments / keep-alives
                    data = line[len(b"data:"):].strip()
                    if data == b"[DONE]":
                        finished = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        response.failure(f"error event: {event['error']}")
                        return
                    if text_of(event):
                        chunk_times.append(time.perf_counter())
            except (requests.RequestException, ValueError) as error:
                response.failure(f"stream broke after {len(chunk_times)} chunks: {error!r}")
                return
            if not finished:
                response.failure(f"stream ended after {len(chunk_times)} chunks without data: [DONE]")
                return
            response.success()
        self._report(started, chunk_times)

    def _report(self, started: float, chunk_times: list[float]) -> None:
        fire = self.environment.events.request.fire
        done = time.perf_counter()
        fire(request_type="E2E", name=self.path, response_time=(done - started) * 1000,
             response_length=len(chunk_times), exception=None, context={})
        if not chunk_times:
            return  # the model stopped at once (EOS): there is no first token to time
        fire(request_type="TTFT", name=self.path, response_time=(chunk_times[0] - started) * 1000,
             response_length=0, exception=None, context={})
        for previous, current in itertools.pairwise(chunk_times):
            fire(request_type="ITL", name=self.path, response_time=(current - previous) * 1000,
                 response_length=0, exception=None, context={})


class ChatStreamingUser(StreamingUser):
    path = "/v1/chat/completions"

    @task
    def chat(self) -> None:
        body = self.sampling() | {"messages": [{"role": "user", "content": prompt_text(self.rng)}]}
        self.stream(body, chat_text)


class CompletionStreamingUser(StreamingUser):
    path = "/v1/completions"

    @task
    def complete(self) -> None:
        self.stream(self.sampling() | {"prompt": prompt_text(self.rng)}, completion_text)
