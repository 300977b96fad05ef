"""Every ZeroMQ socket refuses oversized frames (issue #26), on real TCP sockets: a peer
that sends a frame over MAX_MESSAGE_BYTES is disconnected before the frame is buffered,
and the socket goes on serving others."""

from __future__ import annotations

from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from pagedserve.shared.messages import PROTOCOL_VERSION
from pagedserve.shared.transport import MAX_MESSAGE_BYTES, make_socket


def _wait_for_event(monitor: zmq.Socket[Any], wanted: int, timeout_ms: int = 20_000) -> bool:
    poller = zmq.Poller()
    poller.register(monitor, zmq.POLLIN)
    while poller.poll(timeout_ms):
        if recv_monitor_message(monitor)["event"] == wanted:
            return True
    return False


def test_a_peer_sending_a_frame_over_the_limit_is_disconnected_and_others_are_served() -> None:
    context = zmq.Context()
    try:
        server = make_socket(context, zmq.ROUTER)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        hostile = context.socket(zmq.DEALER)
        hostile.setsockopt(zmq.LINGER, 0)
        monitor = hostile.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        hostile.connect(f"tcp://127.0.0.1:{port}")
        assert _wait_for_event(monitor, zmq.EVENT_CONNECTED)
        hostile.send_multipart([PROTOCOL_VERSION, b"\0" * (MAX_MESSAGE_BYTES + 1)])
        assert _wait_for_event(monitor, zmq.EVENT_DISCONNECTED), "the oversized frame did not end the connection"
        assert server.poll(0) == 0  # nothing of it was delivered

        honest = context.socket(zmq.DEALER)
        honest.setsockopt(zmq.LINGER, 0)
        honest.connect(f"tcp://127.0.0.1:{port}")
        honest.send_multipart([PROTOCOL_VERSION, b"\0" * 1024])
        assert server.poll(20_000)
        _, version, payload = server.recv_multipart()
        assert (version, len(payload)) == (PROTOCOL_VERSION, 1024)
    finally:
        context.destroy(linger=0)  # closes every socket, also when an assertion failed
