"""Does a grammar compile? Asked before a constrained request is submitted, so an invalid
JSON schema, regex or EBNF grammar is a 400 naming the field, never a failed step.

The answer has to come from the grammar library the executor compiles with (xgrammar:
its JSON-schema converter refuses features it does not implement, and its regex dialect
is not Python's), but `import xgrammar` imports torch, which the gateway process must not
(tests/test_import_boundaries.py). So the check runs in a worker process of the gateway's
own, started with the first constrained request: `python -m
pagedserve.services.gateway.grammar_validator`, one framed msgspec JSON spec in on stdin, one framed
result out on stdout (a frame: a 4-byte big-endian length, then that many bytes; lines
broke on a reply over asyncio's 64 KiB line limit, a 500 that left the rest of the reply
to be read as the next request's answer). It converts the grammar without a tokenizer (microseconds;
the executor does the token-level compile), and results are cached per spec (LRU), so a
client that sends the same schema every time pays for it once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import sys
from collections import OrderedDict

import msgspec

from pagedserve.services.gateway.errors import GatewayError
from pagedserve.shared.structured_output import GrammarSpec

log = logging.getLogger(__name__)

# Importing xgrammar (and with it torch) takes seconds, more on a busy machine.
START_TIMEOUT_S = 120.0
CHECK_TIMEOUT_S = 10.0
MAX_ERROR_CHARS = 2000  # xgrammar echoes its input in some messages (a 100 kB "type")
MAX_FRAME_BYTES = 16 << 20  # a reply announcing more is a broken worker, not an answer
_LENGTH = struct.Struct(">I")


def frame(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload


class GrammarCheckResult(msgspec.Struct, omit_defaults=True):
    error: str | None = None  # the library's own message: what is wrong, and where


class GrammarValidator:
    """The gateway's handle on its grammar-check worker (one per app)."""

    def __init__(self, cache_size: int = 512) -> None:
        self._cache_size = cache_size
        self._results: OrderedDict[GrammarSpec, str | None] = OrderedDict()
        self._process: asyncio.subprocess.Process | None = None
        self._lock: asyncio.Lock | None = None

    async def error_of(self, spec: GrammarSpec) -> str | None:
        """None when `spec` compiles, else why not. GatewayError 503 when the worker
        cannot answer."""
        if spec in self._results:
            self._results.move_to_end(spec)
            return self._results[spec]
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            try:
                error = await self._ask(spec)
            except (OSError, EOFError, TimeoutError, ValueError) as failure:  # msgspec.DecodeError is a ValueError
                await self.close()
                raise GatewayError(
                    503, f"the grammar checker is not answering ({type(failure).__name__}: {failure}); retry",
                    code="service_unavailable",
                ) from None
        self._results[spec] = error
        while len(self._results) > self._cache_size:
            self._results.popitem(last=False)
        return error

    async def _ask(self, spec: GrammarSpec) -> str | None:
        timeout_s = CHECK_TIMEOUT_S
        if self._process is None or self._process.returncode is not None:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pagedserve.services.gateway.grammar_validator",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )
            timeout_s = START_TIMEOUT_S
        process = self._process
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(frame(msgspec.json.encode(spec)))
        await process.stdin.drain()
        try:
            async with asyncio.timeout(timeout_s):
                (length,) = _LENGTH.unpack(await process.stdout.readexactly(_LENGTH.size))
                if length > MAX_FRAME_BYTES:
                    raise ValueError(f"the worker announced a {length:,}-byte reply (at most {MAX_FRAME_BYTES:,})")
                payload = await process.stdout.readexactly(length)
        except asyncio.IncompleteReadError:
            raise EOFError("the worker exited") from None
        return msgspec.json.decode(payload, type=GrammarCheckResult).error

    async def close(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()


def check_grammar(spec: GrammarSpec) -> str | None:
    """In the worker: convert `spec` as the executor's `compile_grammar` will."""
    import xgrammar

    try:
        if spec.kind == "json_schema":
            xgrammar.Grammar.from_json_schema(spec.source, any_whitespace=False)
        elif spec.kind == "regex":
            xgrammar.Grammar.from_regex(spec.source)
        elif spec.kind == "choice":
            xgrammar.Grammar.from_ebnf(spec.to_ebnf_choice())
        else:
            xgrammar.Grammar.from_ebnf(spec.source)
    except Exception as error:  # xgrammar raises RuntimeError/ValueError with its parser's message
        # Its messages start with "[hh:mm:ss] /path/file.cc:line: "; the client needs the rest.
        text = str(error).strip()
        text = text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text
        if len(text) > MAX_ERROR_CHARS:
            text = f"{text[:MAX_ERROR_CHARS]}... ({len(text):,} characters in all)"
        return text
    return None


def _worker_main() -> None:
    # The protocol owns the real stdout; anything a library prints goes to stderr.
    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    sys.stdout = sys.stderr
    import xgrammar  # noqa: F401  (loaded before the first question, not during it)

    encoder = msgspec.json.Encoder()
    protocol_in = sys.stdin.buffer
    while len(header := protocol_in.read(_LENGTH.size)) == _LENGTH.size:
        (length,) = _LENGTH.unpack(header)
        payload = protocol_in.read(length)
        try:
            spec = msgspec.json.decode(payload, type=GrammarSpec)
            result = GrammarCheckResult(check_grammar(spec))
        except msgspec.DecodeError as error:
            result = GrammarCheckResult(f"malformed check request: {error}")
        protocol_out.write(frame(encoder.encode(result)))


if __name__ == "__main__":
    _worker_main()
