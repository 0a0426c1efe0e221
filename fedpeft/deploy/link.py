"""``fedpeft link``: the coordinator's long-lived half: a SuperLink nobody outside can command.

It runs two things and keeps them together:

1. ``flower-superlink`` on **127.0.0.1** only (``--control-port``, default ``--port`` + 1), with
   TLS and node authentication: its Control API (register nodes, submit and stop runs) and
   Runtime API (the ServerApp) are reachable from this machine alone;
2. the **front** (:mod:`fedpeft.deploy.proxy`) on ``--host:--port``: mutual TLS (only holders
   of a node certificate from ``fedpeft keys`` get through the handshake), only the Fleet
   routes, bounded requests; it attaches the operator's app signatures
   (``KEYS/apps/``, :mod:`fedpeft.deploy.signing`) to the apps nodes fetch.

The SuperLink is started so that it gets SIGTERM if this process dies, even by SIGKILL, and
it stops its own children; SIGTERM or SIGINT here stops both cleanly. If the SuperLink exits
by itself, so does this command, with its exit code (a service manager restarts it).
``fedpeft server`` runs this as a child for one run, or attaches (``--attach``) to one left running
(``--keep``, or the ``server/fedpeft-link.service`` unit).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from fedpeft.deploy.credentials import Credentials
from fedpeft.deploy.procs import flower_command, flower_env, start, stop, wait_port
from fedpeft.deploy.proxy import MAX_BODY, FleetProxy, ProxyServer, ServerTLS, client_tls
from fedpeft.deploy.signing import AppSignatures, attach_signature
from fedpeft.errors import ConfigError, ProtocolError

__all__ = ["CONNECTION", "LinkRole", "control_port", "flwr_config"]

CONNECTION = "fedpeft"
log = logging.getLogger(__name__)


def control_port(port: int, given: int | None) -> int:
    """The SuperLink's port on 127.0.0.1: ``given``, or the front's ``port`` + 1."""
    return given if given is not None else port + 1


def flwr_config(address: str, ca_cert: Path) -> str:
    """The ``flwr`` CLI's ``config.toml`` with one connection, ``fedpeft``."""
    return "\n".join(
        [
            "[superlink]",
            f'default = "{CONNECTION}"',
            "",
            f"[superlink.{CONNECTION}]",
            f"address = {json.dumps(address)}",
            f"root-certificates = {json.dumps(str(ca_cert))}",
            "",
        ]
    )


@dataclass
class LinkRole:
    """The SuperLink (127.0.0.1) and its Fleet-only front (``host:port``).

    Parameters
    ----------
    keys : Path
        The folder ``fedpeft keys`` wrote (CA, coordinator certificate, ``apps/``).
    state : Path
        ``superlink.log`` and ``flwr/config.toml`` (the ``flwr`` CLI's connection) go here.
    host, port : str, int
        Where the front listens for nodes.
    control_port : int | None
        The SuperLink's port on 127.0.0.1 (``None``: ``port + 1``).
    database : Path | None
        The SuperLink's ``--database`` (node registrations survive its restarts).
    max_body : int
        Largest request the front forwards, in bytes.
    """

    keys: Path
    state: Path
    host: str = "0.0.0.0"
    port: int = 9092
    control_port: int | None = None
    database: Path | None = None
    max_body: int = MAX_BODY

    @property
    def internal(self) -> int:
        """The SuperLink's port on 127.0.0.1."""
        return control_port(self.port, self.control_port)

    def _creds(self) -> Credentials:
        creds = Credentials.at(self.keys)
        files = (creds.ca_cert, creds.server_cert, creds.server_key)
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise ConfigError(
                f"missing {missing}; create them with `fedpeft keys --out {self.keys}`"
            )
        if self.internal == self.port:
            raise ConfigError(f"--control-port must differ from --port ({self.port})")
        return creds

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT or until the SuperLink exits; returns the exit code."""
        creds = self._creds()
        state = self.state.resolve()
        (state / "flwr").mkdir(parents=True, exist_ok=True)
        address = f"127.0.0.1:{self.internal}"
        (state / "flwr" / "config.toml").write_text(flwr_config(address, creds.ca_cert.resolve()))
        env = flower_env(state / "flwr")
        cmd = [
            flower_command("flower-superlink"),
            "--ssl-ca-certfile", str(creds.ca_cert), "--ssl-certfile", str(creds.server_cert),
            "--ssl-keyfile", str(creds.server_key),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.internal),
        ]  # fmt: skip
        if self.database is not None:
            cmd += ["--database", str(self.database)]
        print("+", " ".join(cmd), f"> {state / 'superlink.log'}", flush=True)
        with open(state / "superlink.log", "ab") as out:
            link = start(cmd, env, out, die_with_parent=True)
        stopping = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stopping.set()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        front: ProxyServer | None = None
        try:
            wait_port("127.0.0.1", self.internal, 120.0, link)
            front = self._front(creds)
            front.start()
            print(
                f"fedpeft link: nodes connect to {self.host}:{front.port} (mutual TLS, Fleet API "
                f"only); the SuperLink listens on {address} (this machine only); "
                f"FLWR_HOME={state / 'flwr'} flwr ... {CONNECTION}",
                flush=True,
            )
            while not stopping.is_set() and link.poll() is None:
                stopping.wait(0.5)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if front is not None:
                front.stop()
            rc = stop(link)
        if stopping.is_set():
            return 0
        print(f"fedpeft link: the SuperLink exited with code {rc}; see {state / 'superlink.log'}")
        return rc if rc != 0 else 1

    def _front(self, creds: Credentials) -> ProxyServer:
        signatures = AppSignatures(self.keys / "apps")

        def sign(path: str, status: int, body: bytes) -> bytes:
            if path != "/v1/fleet/get-fab" or status != 200:
                return body
            try:
                return attach_signature(body, signatures)
            except ProtocolError as err:
                log.warning("fedpeft link: get-fab reply left as it was: %s", err)
                return body

        proxy = FleetProxy(
            f"https://127.0.0.1:{self.internal}",
            client_tls(creds.ca_cert),
            self.max_body,
            on_response=sign,
        )
        tls = ServerTLS(creds.server_cert, creds.server_key, client_ca=creds.ca_cert)
        return ProxyServer(proxy, self.host, self.port, tls)
