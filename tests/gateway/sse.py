"""Reading a server-sent-events body the way the OpenAI SDK does, strictly."""

from __future__ import annotations

import json
from typing import Any


def sse_events(body: str) -> list[Any]:
    """The JSON payloads of `data:` events, checking the framing: every event is one
    `data: ...` line followed by a blank line, and the last one is [DONE]."""
    assert body.endswith("data: [DONE]\n\n"), body[-200:]
    blocks = body.split("\n\n")
    assert blocks[-1] == ""
    events = []
    for block in blocks[:-2]:
        assert block.startswith("data: ") and "\n" not in block, block
        events.append(json.loads(block[len("data: ") :]))
    assert blocks[-2] == "data: [DONE]"
    return events
