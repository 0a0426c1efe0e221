"""The node's long-lived model worker: the base model loads once per node, not once per round.

Flower 1.41's SuperNode starts a fresh ``flwr-clientapp`` process for every message (Flower
issue #3670), so a ClientApp that loads its model itself reloads it every round. On a
deployed node, ``fedpeft client`` therefore runs a :class:`ModelWorker` next to the SuperNode:
a process that keeps the base model, the node's data and the client caches in memory, and
serves the fedpeft ClientApp over a Unix socket. The per-message ClientApp
(:mod:`fedpeft.deploy.apps`) only forwards the message's content and the node's ``Context``
to it and returns the worker's reply, so every round after the first costs no model load.

The socket lives in a directory only the node's user can enter (mode 0700) and is itself
0600. Frames carry Flower's own protobuf encodings of the ``Context`` and the message content
(:func:`fedpeft._flwr.context_to_bytes`, :func:`~fedpeft._flwr.records_to_bytes`) and a
small JSON header; nothing is unpickled. A frame is::

    u32 header length | header (UTF-8 JSON) | u64 length | context | u64 length | content

The request header is ``{"v": 1, "type": "<message type>"}``; the reply header is
``{"v": 1, "error": null | "<reason>"}`` and its context carries the updated node state.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import struct
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict

from fedpeft._flwr import (
    SERVER_NODE_ID,
    context_from_bytes,
    context_to_bytes,
    records_from_bytes,
    records_to_bytes,
    set_message_id,
    set_task_identity,
)
from fedpeft.cache import PROCESS_CACHE, ProcessCache
from fedpeft.errors import ConfigError, ProtocolError, clip

__all__ = ["ModelWorker", "WorkerReply", "call_worker", "read_frame", "write_frame"]

VERSION = 1
MAX_HEADER = 64 * 1024
MAX_SOCKET_PATH = 107  # sun_path on Linux, less its terminating NUL
MAX_PART = 4 * 1024**3  # a LoRA update is MBs; this only stops absurd lengths early
log = logging.getLogger(__name__)


def write_frame(sock: socket.socket, header: dict[str, Any], *parts: bytes) -> None:
    """Send a JSON header and byte parts, each length-prefixed."""
    head = json.dumps(header).encode()
    chunks = [struct.pack(">I", len(head)), head]
    for part in parts:
        chunks += [struct.pack(">Q", len(part)), part]
    sock.sendall(b"".join(chunks))


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ProtocolError(f"worker connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket, parts: int) -> tuple[dict[str, Any], list[bytes]]:
    """Read a frame written by :func:`write_frame` with ``parts`` byte parts."""
    (n,) = struct.unpack(">I", _read_exact(sock, 4))
    if n > MAX_HEADER:
        raise ProtocolError(f"worker frame header of {n} bytes exceeds {MAX_HEADER}")
    try:
        header = json.loads(_read_exact(sock, n))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"worker frame header is not JSON: {err}") from None
    if not isinstance(header, dict) or header.get("v") != VERSION:
        raise ProtocolError(f"worker frame header {header!r} is not protocol version {VERSION}")
    out = []
    for _ in range(parts):
        (size,) = struct.unpack(">Q", _read_exact(sock, 8))
        if size > MAX_PART:
            raise ProtocolError(f"worker frame part of {size} bytes exceeds {MAX_PART}")
        out.append(_read_exact(sock, size))
    return header, out


@dataclass
class WorkerReply:
    """What the worker returns: the reply content or an error, and the node's new state."""

    content: RecordDict | None
    error: str | None
    state: RecordDict


def call_worker(path: str | Path, message: Message, context: Context) -> WorkerReply:
    """Hand ``message`` and the node's ``context`` to the worker at ``path``; wait for it.

    Raises
    ------
    ProtocolError
        If the worker cannot be reached or answers with a malformed frame.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError as err:
            raise ProtocolError(
                f"cannot reach the node's model worker at {path}: {err}; is `fedpeft client` "
                "running on this node?"
            ) from None
        header = {"v": VERSION, "type": message.metadata.message_type}
        write_frame(sock, header, context_to_bytes(context), records_to_bytes(message.content))
        reply, (ctx, content) = read_frame(sock, 2)
    error = reply.get("error")
    state = context_from_bytes(ctx).state
    if error is not None:
        return WorkerReply(content=None, error=str(error), state=state)
    return WorkerReply(content=records_from_bytes(content), error=None, state=state)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        try:
            header, (ctx, content) = read_frame(self.request, 2)
            context = context_from_bytes(ctx)
        except (ProtocolError, struct.error) as err:
            log.warning("model worker: dropped a malformed request: %s", err)
            return
        error: str | None = None
        reply = RecordDict()
        try:
            reply = self.server.worker.handle(str(header.get("type", "")), content, context)
        except Exception as ex:  # the ClientApp's failure becomes the message's error reply
            error = f"{type(ex).__name__}: {ex}"
            if not isinstance(ex, ValueError):
                error += "\n" + traceback.format_exc(limit=-3)
            log.warning("model worker: %s failed: %s", header.get("type"), clip(error))
        write_frame(
            self.request,
            {"v": VERSION, "error": error},
            context_to_bytes(context),
            b"" if error is not None else records_to_bytes(reply),
        )


class _Server(socketserver.UnixStreamServer):
    worker: ModelWorker


class ModelWorker:
    """Serves the fedpeft ClientApp on a Unix socket, keeping models and data in memory.

    Parameters
    ----------
    socket_path : str | Path
        Where to listen; its directory is created with mode 0700.
    cache : ProcessCache
        The worker's cache (models, tokenized data, client state); the process cache by
        default.
    stats_path : str | Path | None
        A JSON file rewritten after each request: requests served, base-model loads, pid.
    app_factory : Callable[[ProcessCache], Any] | None
        Builds the ClientApp (default :func:`fedpeft.client.app.make_client_app`, reading
        the scenario from each message's run config).
    """

    def __init__(
        self,
        socket_path: str | Path,
        cache: ProcessCache = PROCESS_CACHE,
        stats_path: str | Path | None = None,
        app_factory: Callable[[ProcessCache], Any] | None = None,
    ) -> None:
        self.path = Path(socket_path)
        self.cache = cache
        self.stats_path = Path(stats_path) if stats_path is not None else None
        if app_factory is None:
            from fedpeft.client.app import make_client_app

            self.app = make_client_app(None, cache)
        else:
            self.app = app_factory(cache)
        self.requests = 0
        self.busy_s = 0.0
        self._server: _Server | None = None
        self._lock = threading.Lock()

    def handle(self, message_type: str, content: bytes, context: Context) -> RecordDict:
        """Run the ClientApp on one message; ``context.state`` is updated in place."""
        t0 = time.perf_counter()
        with self._lock:
            # Rebuild the instruction as the coordinator sent it (Message reads its source
            # from the process's task identity), then let the app reply to it.
            set_task_identity(context.run_id, SERVER_NODE_ID)
            msg = Message(records_from_bytes(content), context.node_id, message_type)
            set_message_id(msg)
            reply = self.app(msg, context)
            self.requests += 1
            self.busy_s += time.perf_counter() - t0
            self.write_stats()
        if reply.has_error():
            raise RuntimeError(reply.error.reason)
        return reply.content

    def stats(self) -> dict[str, Any]:
        """Requests served, base models loaded, busy seconds and the worker's pid."""
        return {
            "requests": self.requests,
            "model_loads": self.cache.count("model:"),
            "busy_s": round(self.busy_s, 3),
            "pid": os.getpid(),
        }

    def write_stats(self) -> None:
        """Rewrite the stats file atomically (if one was given)."""
        if self.stats_path is None:
            return
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.stats()), encoding="utf-8")
        tmp.replace(self.stats_path)

    def bind(self) -> None:
        """Create the socket (a stale one from a dead worker is replaced)."""
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"socket path {self.path} is longer than {MAX_SOCKET_PATH} bytes (the limit "
                "of Unix sockets); choose a shorter --state-dir"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        if self.path.exists():
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = _Server(str(self.path), _Handler)
        finally:
            os.umask(old)
        self._server.worker = self
        self.write_stats()

    def serve_forever(self) -> None:
        """Serve requests until :meth:`shutdown` (binds first if needed)."""
        if self._server is None:
            self.bind()
        assert self._server is not None
        self._server.serve_forever(poll_interval=0.2)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop serving (from another thread) and remove the socket.

        Waits at most ``timeout_s`` for a request in progress: a hung ClientApp does not
        keep the node from stopping (the serving thread is a daemon).
        """
        if self._server is not None:
            server, self._server = self._server, None
            done = threading.Thread(target=server.shutdown, daemon=True)
            done.start()
            done.join(timeout_s)
            server.server_close()
        self.path.unlink(missing_ok=True)
