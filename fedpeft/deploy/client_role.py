"""``fedpeft client``: one edge node = a Flower SuperNode, fedpeft's model worker and a tunnel.

The command runs, in one process:

- the **model worker** (:class:`fedpeft.deploy.worker.ModelWorker`), which keeps the base
  model and data loaded across rounds, runs and SuperNode restarts;
- the **tunnel** (:class:`fedpeft.deploy.proxy.FleetProxy` on 127.0.0.1): the SuperNode talks
  to it, and it talks to the coordinator's front over mutual TLS with the node's certificate
  (Flower's SuperNode cannot present one itself), forwarding only Fleet routes. Flower's node
  authentication insists on TLS, so the SuperNode reaches the tunnel over TLS too, with a
  throwaway certificate made at each start (:func:`~fedpeft.deploy.credentials.write_loopback_tls`);

and starts ``flower-supernode`` as a child with node authentication
(``--auth-supernode-private-key``), ``--trusted-entities`` (it runs only apps the operator
signed) and a node config naming the worker's socket plus what the user gave
(``partition-id``, ``num-partitions``, ``device``, ``dtype``, ``quantization``,
``data-path``, ``own-data``, ``max-rank``, ``memory-mb``). The SuperNode gets SIGTERM if this
process dies.

**Recovery.** When the SuperNode exits for any reason but a stop request (the coordinator
restarted and forgot its session, its key is not registered yet, its previous session is still
held), the command says why, waits (2 s, doubling to 60 s; reset after a session that worked)
and starts it again: a node comes back by itself after a coordinator restart. It exits with 0
on SIGTERM/SIGINT, and with an error only for its own configuration (a missing file, a bad
option). The node's folder is the one ``fedpeft keys`` wrote for it (``nodes/<name>/``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from fedpeft.deploy.credentials import NodeFiles, write_loopback_tls
from fedpeft.deploy.procs import flower_command, flower_env, start, stop
from fedpeft.deploy.proxy import FleetProxy, ProxyServer, ServerTLS, client_tls
from fedpeft.deploy.worker import ModelWorker
from fedpeft.errors import ConfigError, clip

__all__ = ["ActivationWatch", "ClientRole", "node_config_string"]

BACKOFF_S = 2.0
MAX_BACKOFF_S = 60.0


def node_config_string(values: Mapping[str, str | int | float]) -> str:
    """Flower's ``--node-config`` syntax: ``key=value`` pairs, strings quoted."""
    parts = []
    for k, v in values.items():
        if isinstance(v, str):
            if '"' in v or "\\" in v:
                raise ConfigError(f"node config value {v!r} of {k!r} may not contain quotes")
            parts.append(f'{k}="{v}"')
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


class ActivationWatch:
    """Watches the SuperNode's ``activate-node`` calls through the tunnel, to say why it
    could not connect (the SuperLink's own reason) or that it had been connected."""

    def __init__(self) -> None:
        self.connected = False  # activated since the last reset
        self.refusal = ""  # the SuperLink's reason for the last refused activation
        self._lock = threading.Lock()

    def __call__(self, path: str, status: int, body: bytes) -> bytes:
        """The tunnel's response hook (returns the body unchanged)."""
        if path == "/v1/fleet/activate-node":
            with self._lock:
                self.connected = self.connected or status == 200
                if status != 200:
                    self.refusal = _flower_reason(body)
        return body

    def reset(self) -> tuple[bool, str]:
        """What happened since the last reset: (connected, last refusal), and start over."""
        with self._lock:
            seen = (self.connected, self.refusal)
            self.connected, self.refusal = False, ""
            return seen

    @staticmethod
    def explain(rc: int, connected: bool, refusal: str, key: Path) -> str:
        """Why the SuperNode exited, in the operator's words.

        Flower 1.41's SuperLink gives a refused activation one public reason for both causes
        (its log on the coordinator says which), so both are named.
        """
        if refusal:
            return (
                f"the coordinator refused to activate this node ({clip(refusal, 300)}): "
                f"either its key ({key}.pub) is not registered there (`fedpeft server` "
                "registers KEYS/nodes/*/node.key.pub when it starts), or the coordinator "
                "still holds this node's previous session, which it lets go about a minute "
                "after its last heartbeat"
            )
        if connected:
            return "the coordinator dropped this node's session (it restarted or stopped)"
        return f"it exited with code {rc} before connecting; see its log above"


def _flower_reason(body: bytes) -> str:
    try:
        error = json.loads(body)
    except ValueError:
        return clip(body.decode("utf-8", "replace"), 300)
    if isinstance(error, dict):
        parts = (error.get("detail"), error.get("extra"))
        return clip(" ".join(str(p) for p in parts if p) or str(error), 300)
    return clip(str(error), 300)


@dataclass
class ClientRole:
    """One edge node (see the module docstring).

    Parameters
    ----------
    superlink : str
        The coordinator's ``host:port`` (its front; the host must be in its certificate).
    creds : Path
        This node's folder from ``fedpeft keys`` (``nodes/<name>/``).
    state_dir : Path
        Where the worker's socket, its stats file and the SuperNode's files live.
    node_config : Mapping[str, str | int | float]
        Node config values (``partition-id``, ``device``, ...).
    runtime_port : int
        Port of the SuperNode's local Runtime API (distinct per node on one machine).
    threads : int | None
        CPU threads torch may use in the worker (``None``: torch's default).
    backoff_s, max_backoff_s : float
        Wait before restarting the SuperNode, doubling up to the maximum.
    """

    superlink: str
    creds: Path
    state_dir: Path
    node_config: Mapping[str, str | int | float] = field(default_factory=dict)
    runtime_port: int = 9094
    threads: int | None = None
    backoff_s: float = BACKOFF_S
    max_backoff_s: float = MAX_BACKOFF_S

    def _files(self) -> NodeFiles:
        files = NodeFiles.at(self.creds.resolve())
        missing = files.missing()
        if missing:
            raise ConfigError(
                f"the node folder {self.creds} lacks {missing}; copy the whole folder "
                "`fedpeft keys` wrote for this node (KEYS/nodes/<name>/)"
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", self.runtime_port))
            except OSError as err:
                raise ConfigError(
                    f"--runtime-port {self.runtime_port} is taken on this machine ({err}); "
                    "give each node on one machine its own"
                ) from None
        return files

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns 0 (configuration errors raise)."""
        files = self._files()
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        state = self.state_dir.resolve()
        worker = ModelWorker(state / "worker" / "worker.sock", stats_path=state / "worker.json")
        worker.bind()
        threading.Thread(target=worker.serve_forever, name="model-worker", daemon=True).start()
        watch = ActivationWatch()
        tls = client_tls(files.ca_cert, identity=files.tls)
        loop_ca, loop_cert, loop_key = write_loopback_tls(state / "tunnel")
        tunnel = ProxyServer(
            FleetProxy(f"https://{self.superlink}", tls, on_response=watch),
            "127.0.0.1", 0, ServerTLS(loop_cert, loop_key),
        )  # fmt: skip
        tunnel.start()
        stopping = threading.Event()
        current: list[int] = []  # the running SuperNode's pid, for the signal handler

        def on_signal(signum: int, frame: FrameType | None) -> None:
            # Only signal here: the main thread may be inside wait(), and waiting again from
            # a handler would deadlock on Popen's wait lock; the loop below reaps.
            stopping.set()
            for pid in current:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._serve(files, state, worker, (tunnel.port, loop_ca), watch, stopping, current)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            tunnel.stop()
            worker.shutdown()
        stats = worker.stats()
        print(
            f"fedpeft client: stopped; the worker served {stats['requests']} messages with "
            f"{stats['model_loads']} base-model load(s)",
            flush=True,
        )
        return 0

    def _serve(
        self, files: NodeFiles, state: Path, worker: ModelWorker, tunnel: tuple[int, Path],
        watch: ActivationWatch, stopping: threading.Event, current: list[int],
    ) -> None:  # fmt: skip
        values = {**self.node_config, "worker": str(worker.path)}
        tunnel_port, tunnel_ca = tunnel
        cmd = [
            flower_command("flower-supernode"),
            "--superlink", f"127.0.0.1:{tunnel_port}", "--root-certificates", str(tunnel_ca),
            "--auth-supernode-private-key", str(files.auth_key),
            "--trusted-entities", str(files.trusted),
            "--node-config", node_config_string(values),
            "--port", str(self.runtime_port),
        ]  # fmt: skip
        print(f"fedpeft client: tunnel 127.0.0.1:{tunnel_port} -> {self.superlink} (mutual TLS "
              f"with {files.tls})", flush=True)  # fmt: skip
        failures = 0
        while not stopping.is_set():
            print("+", " ".join(cmd), flush=True)
            node = start(cmd, flower_env(state / "flwr"), die_with_parent=True)
            current[:] = [node.pid]
            if stopping.is_set():  # a stop request came while it was starting
                stop(node)
            rc = node.wait()
            stop(node)  # its children, if any are left
            current.clear()
            if stopping.is_set():
                break
            connected, refusal = watch.reset()
            failures = 0 if connected else failures + 1
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** max(failures - 1, 0))
            why = watch.explain(rc, connected, refusal, files.auth_key)
            print(f"fedpeft client: the SuperNode stopped: {why}; starting it again in "
                  f"{delay:.0f} s", flush=True)  # fmt: skip
            stopping.wait(delay)
