"""Optional CURVE encryption and authentication for the ZeroMQ links between services.

Without it the scheduler's sockets accept any peer that can reach them, in clear text:
fine on loopback (the default bind address), not on a shared network. With
`--zmq-curve-keys DIR` on every service, each link is encrypted, gateways and executors
check that they talk to the real scheduler (they know its public key), and the scheduler
admits only clients whose public key is in DIR (checked by a ZAP authenticator thread;
without one libzmq would let any client key through).

DIR, as `pagedserve keys DIR` writes it (ZeroMQ's certificate files, zmq.auth format):

    server.key  server.key_secret    the scheduler's keypair (it binds)
    client.key  client.key_secret    the keypair gateways and executors share (they connect)

Every public `*.key` file in DIR is an authorized client, so another client is admitted by
generating its keypair and dropping its public `.key` file there. The scheduler needs
`server.key_secret` and the public keys; a client needs only `server.key` and its own
keypair, so a deployment may give clients a directory without the server's secret.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

SERVER_NAME = "server"
CLIENT_NAME = "client"


@dataclass(frozen=True)
class CurveEndpoint:
    """One side's CURVE settings for a socket: its own keypair, and for a client the
    server's public key it insists on (None: this side is the server)."""

    public_key: bytes
    secret_key: bytes
    server_key: bytes | None


def _key_files(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.key", directory / f"{name}.key_secret"


def curve_keys_exist(directory: str | os.PathLike[str]) -> bool:
    return all(path.is_file() for name in (SERVER_NAME, CLIENT_NAME) for path in _key_files(Path(directory), name))


def generate_curve_keys(directory: str | os.PathLike[str], *, overwrite: bool = False) -> bool:
    """Write the server and client keypairs into `directory` (created if missing).
    Unless `overwrite`, existing keys are kept (services running with them would otherwise
    be locked out): returns False, writing nothing, when both keypairs are there, and
    raises FileExistsError when only some of the files are (rather than mix old and new)."""
    path = Path(directory)
    if not overwrite:
        if curve_keys_exist(path):
            return False
        present = [file.name for name in (SERVER_NAME, CLIENT_NAME) for file in _key_files(path, name) if file.exists()]
        if present:
            raise FileExistsError(f"{path} holds {', '.join(present)} but not both keypairs; replace them with --force")
    path.mkdir(parents=True, exist_ok=True)
    for name in (SERVER_NAME, CLIENT_NAME):
        _, secret_file = zmq.auth.create_certificates(path, name)
        os.chmod(secret_file, 0o600)  # secrets readable by the owner only
    return True


def _load(file: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    if not file.is_file():
        raise FileNotFoundError(
            f"CURVE key file {file} not found: create the keys with `pagedserve keys {file.parent}`"
        )
    try:
        public_key, secret_key = zmq.auth.load_certificate(file)
    except (OSError, ValueError) as error:
        raise ValueError(f"CURVE key file {file} is unreadable: {error}") from None
    if secret and secret_key is None:
        raise ValueError(f"CURVE key file {file} holds no secret key")
    return public_key, secret_key


def curve_server(directory: str | os.PathLike[str]) -> CurveEndpoint:
    """The binding side's settings (the scheduler)."""
    public_key, secret_key = _load(_key_files(Path(directory), SERVER_NAME)[1], secret=True)
    assert secret_key is not None
    return CurveEndpoint(public_key, secret_key, None)


def curve_client(directory: str | os.PathLike[str]) -> CurveEndpoint:
    """The connecting side's settings (gateways and executors)."""
    public_file, secret_file = _key_files(Path(directory), CLIENT_NAME)
    public_key, secret_key = _load(secret_file, secret=True)
    assert secret_key is not None
    server_key, _ = _load(_key_files(Path(directory), SERVER_NAME)[0], secret=False)
    return CurveEndpoint(public_key, secret_key, server_key)


def apply_curve(sock: zmq.Socket[Any], endpoint: CurveEndpoint) -> None:
    """Make `sock` a CURVE server or client; call before bind/connect."""
    sock.setsockopt(zmq.CURVE_PUBLICKEY, endpoint.public_key)
    sock.setsockopt(zmq.CURVE_SECRETKEY, endpoint.secret_key)
    if endpoint.server_key is None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
    else:
        sock.setsockopt(zmq.CURVE_SERVERKEY, endpoint.server_key)


def start_curve_authenticator(context: zmq.Context[Any], directory: str | os.PathLike[str]) -> ThreadAuthenticator:
    """Admit only clients whose public key is a `*.key` file in `directory`, for every
    CURVE server socket of `context`. Start it before binding; `stop()` it when done.
    One per context (it binds the context's ZAP endpoint)."""
    path = Path(directory)
    if not any(path.glob("*.key")):
        raise FileNotFoundError(f"no public CURVE keys (*.key) in {path}: create them with `pagedserve keys {path}`")
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(path))
    return authenticator
