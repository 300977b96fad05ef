"""ZeroMQ framing shared by every service: [protocol version, MessagePack payload].

Decoding never raises: a frame set that is malformed, of another protocol version, or
not one of the expected message types is logged and dropped, so a bad peer cannot crash
a service.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import msgspec
import zmq

from pagedserve.shared.messages import PROTOCOL_VERSION
from pagedserve.shared.zmq_security import CurveEndpoint, apply_curve

log = logging.getLogger(__name__)

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
# Inbound frames larger than this make ZeroMQ drop the peer's connection before the frame
# is buffered: without it a peer (or anyone reaching a port left open) could make a
# service allocate gigabytes. The largest real message, a step's prompt logprobs for
# 8,192 tokens x 21 alternatives, is ~2 MB.
MAX_MESSAGE_BYTES = 64 << 20


def encode(message: msgspec.Struct) -> list[bytes]:
    return [PROTOCOL_VERSION, _encoder.encode(message)]


def decode(frames: list[bytes], decoder: msgspec.msgpack.Decoder[T], peer: str = "?") -> T | None:
    """The message in `frames` (version + payload), or None after logging why it was dropped."""
    if len(frames) != 2:
        log.warning("dropped a message from %s: %d frames, expected 2", peer, len(frames))
        return None
    version, payload = frames
    if version != PROTOCOL_VERSION:
        log.warning("dropped a message from %s: protocol %r, expected %r", peer, version[:32], PROTOCOL_VERSION)
        return None
    try:
        return decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        log.warning("dropped a malformed message from %s: %s", peer, error)
        return None


def make_socket(
    context: zmq.Context[Any], kind: int, *, identity: bytes | None = None, curve: CurveEndpoint | None = None
) -> zmq.Socket[Any]:
    """A socket that drops unsent messages on close and peers that send a frame over
    MAX_MESSAGE_BYTES; CURVE-secured when `curve` is given (shared/zmq_security.py),
    which must happen before it binds or connects."""
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if curve is not None:
        apply_curve(sock, curve)
    return sock
