"""The Fleet-only front of a deployment: what nodes reach of the coordinator, and nothing else.

Flower 1.41's SuperLink serves its Fleet API (nodes), Control API (``flwr`` CLI: register
nodes, list, stop and submit runs) and Runtime API (the ServerApp) on one port, and the
Control API has no authentication outside Flower's enterprise edition. A SuperLink reachable
from the network can therefore be taken over by anyone who can reach it. fedpeft keeps the
SuperLink on 127.0.0.1 and puts this proxy on the public port:

- **mutual TLS**: the front presents the coordinator's certificate and accepts only clients
  with a certificate the deployment's CA signed (``tls.pem`` of a node folder from
  ``fedpeft keys``); the TLS handshake is Python's ``ssl`` (OpenSSL) under uvicorn;
- **only the Fleet routes** a SuperNode with a registered key uses (:data:`FLEET_ROUTES`, all
  ``POST``) are forwarded; everything else, the Control and Runtime APIs included, is
  answered 404 without reaching the SuperLink;
- **bounded requests**: a body larger than ``max_body`` is refused (413) from its declared
  length, before it is read; a body without a length is refused (411);
- Flower's own node authentication still applies behind it: each Fleet request is signed with
  the node's registered key and checked by the SuperLink.

The same class runs on each node as the **tunnel**: ``fedpeft client`` listens on 127.0.0.1
without TLS for its own SuperNode (which cannot present a client certificate) and forwards to
the coordinator's front over mutual TLS with the node's ``tls.pem``.

When the SuperLink cannot be reached (it is restarting) the proxy answers 503, which Flower's
SuperNode treats as transient and retries. HTTP parsing is uvicorn's (h11), forwarding is
httpx's; this module only decides what passes.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from fedpeft.errors import ConfigError, FedpeftError

__all__ = ["FLEET_ROUTES", "MAX_BODY", "FleetProxy", "ProxyServer", "ServerTLS", "client_tls"]

log = logging.getLogger(__name__)

#: The Fleet API routes of flwr 1.41 that an authenticated SuperNode calls
#: (``flwr.supernode.fleet_http_client``); ``register-node`` and ``unregister-node`` are
#: left out: with node authentication only the operator registers keys.
FLEET_ROUTES = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "activate-node",
        "deactivate-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
MAX_BODY = 64 * 1024 * 1024  # Flower pushes arrays in <= 5 MiB objects; one request, one object
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
     "upgrade", "host", "content-length", "content-encoding"}
)  # fmt: skip

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: ``(path, status, body) -> body``: sees (and may replace) every upstream response
OnResponse = Callable[[str, int, bytes], bytes]


@dataclass(frozen=True)
class ServerTLS:
    """TLS of a listening front: its certificate and key, and with ``client_ca`` a client
    certificate signed by that CA is required (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


def client_tls(ca: Path, identity: Path | None = None) -> ssl.SSLContext:
    """TLS for connecting to a front: trust ``ca``; present ``identity`` (key + certificate
    in one PEM file) when given."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if identity is not None:
        ctx.load_cert_chain(identity)
    return ctx


class FleetProxy:
    """An ASGI app that forwards the Fleet routes to ``upstream`` and refuses the rest.

    Parameters
    ----------
    upstream : str
        Base URL of what is behind (``https://127.0.0.1:9093`` for the front, the
        coordinator's front for a node's tunnel).
    verify : ssl.SSLContext
        How to connect to ``upstream``.
    max_body : int
        Largest request body forwarded, in bytes.
    on_response : OnResponse | None
        Called with every upstream response (the front attaches app signatures to
        ``get-fab`` replies; the tunnel watches ``activate-node``).
    """

    def __init__(
        self,
        upstream: str,
        verify: ssl.SSLContext,
        max_body: int = MAX_BODY,
        on_response: OnResponse | None = None,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.verify = verify
        self.max_body = max_body
        self.on_response = on_response
        self.refused: Counter[str] = Counter()  # reason -> requests refused
        self.forwarded = 0
        self.reachable = True  # whether the last forward reached upstream (logged on change)
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = str(scope.get("path", "")), str(scope.get("method", ""))
        if method != "POST" or path not in FLEET_ROUTES:
            await self._refuse(send, 404, "not-fleet", f"{method} {path[:80]}")
            return
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        length = next((v for k, v in headers if k == "content-length"), None)
        if length is None or not length.isdigit():
            await self._refuse(send, 411, "no-length", path)
            return
        if int(length) > self.max_body:
            await self._refuse(send, 413, "too-large", f"{path} of {length} bytes")
            return
        body = await _read_body(receive, int(length))
        if body is None:
            await self._refuse(send, 413, "too-large", f"{path}: body longer than declared")
            return
        await self._forward(send, path, body, [(k, v) for k, v in headers if k not in HOP_BY_HOP])

    async def _forward(
        self, send: Send, path: str, body: bytes, headers: list[tuple[str, str]]
    ) -> None:
        assert self._client is not None, "served without its lifespan"
        try:
            r = await self._client.post(self.upstream + path, content=body, headers=headers)
        except httpx.HTTPError as err:  # SuperLink restarting, network down: nodes retry 503
            if self.reachable:
                log.warning("fleet proxy: %s unreachable (%s); answering 503 until it is back",
                            self.upstream, err)  # fmt: skip
            self.reachable = False
            await _respond(send, 503, b"upstream unavailable", "text/plain")
            return
        if not self.reachable:
            log.warning("fleet proxy: %s reachable again", self.upstream)
            self.reachable = True
        content = r.content
        if self.on_response is not None:
            content = self.on_response(path, r.status_code, content)
        self.forwarded += 1
        out = [(k, v) for k, v in r.headers.items() if k.lower() not in HOP_BY_HOP]
        await _respond(send, r.status_code, content, headers=out)

    async def _refuse(self, send: Send, status: int, reason: str, what: str) -> None:
        if self.refused[reason] < 20 or self.refused[reason] % 1000 == 0:  # bounded logging
            log.warning("fleet proxy: refused %s (%s, HTTP %d)", what, reason, status)
        self.refused[reason] += 1
        await _respond(send, status, f"refused: {reason}\n".encode(), "text/plain")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                self._client = httpx.AsyncClient(
                    verify=self.verify, timeout=httpx.Timeout(120.0), follow_redirects=False
                )
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _read_body(receive: Receive, length: int) -> bytes | None:
    """The request body, or ``None`` if it runs past ``length`` bytes."""
    chunks, size = [], 0
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            break
        chunk = bytes(event.get("body", b""))
        size += len(chunk)
        if size > length:
            return None
        chunks.append(chunk)
        if not event.get("more_body", False):
            break
    return b"".join(chunks)


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> None:
    out = list(headers or [])
    if content_type is not None:
        out.append(("content-type", content_type))
    out.append(("content-length", str(len(body))))
    encoded = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in out]
    await send({"type": "http.response.start", "status": status, "headers": encoded})
    await send({"type": "http.response.body", "body": body})


class ProxyServer:
    """Runs an ASGI app (a :class:`FleetProxy`) with uvicorn in a background thread.

    Parameters
    ----------
    app : ASGIApp
        What to serve.
    host, port : str, int
        Where to listen (port 0: any free port; see :attr:`port`).
    tls : ServerTLS | None
        Serve HTTPS (``None``: plain HTTP, for a node's tunnel on 127.0.0.1).
    """

    def __init__(self, app: ASGIApp, host: str, port: int, tls: ServerTLS | None) -> None:
        self.app = app
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as err:
            self._sock.close()
            raise ConfigError(f"cannot listen on {host}:{port}: {err}") from None
        self.port = int(self._sock.getsockname()[1])
        tls_args: dict[str, Any] = {}
        if tls is not None:
            tls_args = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
            if tls.client_ca is not None:
                tls_args |= {"ssl_ca_certs": str(tls.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(
            app, lifespan="on", log_level="warning", access_log=False, ws="none",
            timeout_keep_alive=30, timeout_graceful_shutdown=2, **tls_args,
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="fleet-proxy",
            daemon=True,
        )  # fmt: skip

    def start(self, timeout_s: float = 30.0) -> None:
        """Serve in the background; return once connections are accepted."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._sock.close()
                raise FedpeftError(f"the fleet proxy on {self.host}:{self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop serving (open connections are closed)."""
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()
