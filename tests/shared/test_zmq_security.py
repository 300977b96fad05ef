"""CURVE on real sockets: an authorized client round-trips through a ROUTER secured by
shared/zmq_security.py; a client with an unknown key, one expecting another server, and
a plain client all fail the handshake and deliver nothing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from pagedserve.shared.transport import make_socket
from pagedserve.shared.zmq_security import (
    CurveEndpoint,
    curve_client,
    curve_keys_exist,
    curve_server,
    generate_curve_keys,
    start_curve_authenticator,
)

HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
HANDSHAKE_DONE = HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED


@dataclass
class SecuredRouter:
    context: zmq.Context[Any]
    socket: zmq.Socket[Any]
    address: str
    keys_dir: Path


@pytest.fixture()
def keys_dir(tmp_path: Path) -> Path:
    assert generate_curve_keys(tmp_path / "keys")
    return tmp_path / "keys"


@pytest.fixture()
def router(keys_dir: Path) -> Iterator[SecuredRouter]:
    context: zmq.Context[Any] = zmq.Context()
    authenticator = start_curve_authenticator(context, keys_dir)
    sock = make_socket(context, zmq.ROUTER, curve=curve_server(keys_dir))
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield SecuredRouter(context, sock, f"tcp://127.0.0.1:{port}", keys_dir)
    sock.close()
    authenticator.stop()
    context.term()


def connect_and_send(router: SecuredRouter, curve: CurveEndpoint | None, payload: bytes) -> tuple[zmq.Socket[Any], int]:
    """A DEALER that connects and sends `payload`; returns it and the first handshake
    event its monitor reports (success or failure), waited for with a deadline."""
    client = make_socket(router.context, zmq.DEALER, curve=curve)
    monitor = client.get_monitor_socket(HANDSHAKE_DONE)
    client.connect(router.address)
    client.send(payload)
    try:
        if not monitor.poll(5000):
            raise TimeoutError("no handshake event within 5 s")
        return client, recv_monitor_message(monitor)["event"]
    finally:
        client.disable_monitor()
        monitor.close()


def test_an_authorized_client_round_trips(router: SecuredRouter) -> None:
    client, event = connect_and_send(router, curve_client(router.keys_dir), b"ping")
    try:
        assert event == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert router.socket.getsockopt(zmq.MECHANISM) == zmq.CURVE
        assert router.socket.poll(5000), "the message did not arrive"
        identity, payload = router.socket.recv_multipart()
        assert payload == b"ping"
        router.socket.send_multipart([identity, b"pong"])
        assert client.poll(5000) and client.recv() == b"pong"
    finally:
        client.close()


def unknown_client_key(keys_dir: Path) -> CurveEndpoint:
    public_key, secret_key = zmq.curve_keypair()
    return CurveEndpoint(public_key, secret_key, curve_client(keys_dir).server_key)


def other_server_key(keys_dir: Path) -> CurveEndpoint:
    assert generate_curve_keys(keys_dir.parent / "other")
    return curve_client(keys_dir.parent / "other")


@pytest.mark.parametrize(
    ("make_curve", "expected_event"),
    [
        (unknown_client_key, zmq.EVENT_HANDSHAKE_FAILED_AUTH),  # refused by the authenticator
        (other_server_key, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL),  # the server cannot prove to be that key's owner
        (lambda _: None, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL),  # no CURVE at all
    ],
    ids=["unknown-client-key", "wrong-server-key", "plain-client"],
)
def test_a_client_with_the_wrong_key_gets_nothing_through(router: SecuredRouter, make_curve: Any, expected_event: int) -> None:
    client, event = connect_and_send(router, make_curve(router.keys_dir), b"let me in")
    try:
        assert event == expected_event
        assert router.socket.poll(500) == 0, "a message got through without the right keys"
    finally:
        client.close()
    # The router itself still works: the failure was the key, not the set-up.
    good, event = connect_and_send(router, curve_client(router.keys_dir), b"ping")
    try:
        assert event == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert router.socket.poll(5000) and router.socket.recv_multipart()[1] == b"ping"
    finally:
        good.close()


def test_generated_keys_are_kept_unless_forced(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert not curve_keys_exist(keys)
    assert generate_curve_keys(keys)
    names = sorted(path.name for path in keys.iterdir())
    assert names == ["client.key", "client.key_secret", "server.key", "server.key_secret"]
    for secret in ("client.key_secret", "server.key_secret"):
        assert os.stat(keys / secret).st_mode & 0o077 == 0, f"{secret} is readable by others"
    before = curve_server(keys)
    assert not generate_curve_keys(keys)  # already there: kept
    assert curve_server(keys) == before
    assert generate_curve_keys(keys, overwrite=True)
    assert curve_server(keys) != before
    (keys / "client.key_secret").unlink()
    with pytest.raises(FileExistsError, match="not both keypairs"):
        generate_curve_keys(keys)


def test_missing_keys_name_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"server\.key_secret.*pagedserve keys"):
        curve_server(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"pagedserve keys"):
        start_curve_authenticator(zmq.Context.instance(), tmp_path)
    (tmp_path / "client.key_secret").write_text("not a certificate\n")
    with pytest.raises(ValueError, match="client.key_secret"):
        curve_client(tmp_path)


def test_a_client_needs_only_the_server_public_key(keys_dir: Path, tmp_path: Path) -> None:
    client_only = tmp_path / "client-only"
    client_only.mkdir()
    for name in ("client.key", "client.key_secret", "server.key"):
        (client_only / name).write_bytes((keys_dir / name).read_bytes())
    assert curve_client(client_only) == curve_client(keys_dir)
    with pytest.raises(FileNotFoundError, match="server.key_secret"):
        curve_server(client_only)
