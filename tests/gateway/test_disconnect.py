"""A client that goes away must not leave the scheduler generating: its requests are
aborted whether it left mid-stream, while queued, or during a non-streaming call."""

from __future__ import annotations

import httpx
from transformers import PreTrainedTokenizerBase

from tests.gateway.fake_scheduler import FakeScheduler, one_token_per_step


def test_disconnect_mid_stream_aborts(client: httpx.Client, scheduler: FakeScheduler, tokenizer: PreTrainedTokenizerBase) -> None:
    scheduler.script = one_token_per_step(tokenizer("word " * 200).input_ids)
    with client.stream("POST", "/v1/completions", json={"prompt": "p", "max_tokens": 200, "stream": True, "n": 2}) as response:
        assert next(response.iter_lines()).startswith("data: {")
        scheduler.hold = True  # an idle stream: only the disconnect itself can reveal the client left
        ids = {s.request_id for s in scheduler.submits}
    # leaving the block closed the connection
    scheduler.wait_for(lambda: ids <= set(scheduler.aborted), what="aborts after the client disconnected")


def test_disconnect_before_the_first_token_aborts(client: httpx.Client, scheduler: FakeScheduler) -> None:
    scheduler.hold = True
    for stream in (True, False):
        scheduler.submits.clear()
        try:
            client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": stream},
                        timeout=httpx.Timeout(20, read=0.3))
            raise AssertionError("the request should still be waiting")
        except httpx.ReadTimeout:
            pass  # the client gave up and closed the connection
        (submit,) = scheduler.submits
        scheduler.wait_for(lambda: submit.request_id in scheduler.aborted, what=f"abort of a waiting request (stream={stream})")
