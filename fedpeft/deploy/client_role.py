"""``fedpeft client``: one edge node = a Flower SuperNode plus fedpeft's long-lived model worker.

The command runs the model worker (:class:`fedpeft.deploy.worker.ModelWorker`) in its own
process and starts ``flower-supernode`` as a child with TLS (``--root-certificates``) and
node authentication (``--auth-supernode-private-key``). The node config it passes tells the
per-message ClientApp where the worker's socket is (``worker``) plus what the user gave:
``partition-id``/``num-partitions`` (which share of the scenario's data file this node
trains on), ``device``, ``dtype``, ``data-path`` (this node's copy of that file),
``own-data`` (the file is the node's own: all of it), ``max-rank``, ``memory-mb``.

When the SuperNode exits (the SuperLink refused its key, or it was stopped), the worker
stops too and the command returns the SuperNode's exit code; SIGTERM/SIGINT stop both.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from fedpeft.deploy.procs import flower_command, flower_env, start, stop
from fedpeft.deploy.worker import ModelWorker
from fedpeft.errors import ConfigError

__all__ = ["ClientRole", "node_config_string"]


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


@dataclass
class ClientRole:
    """One edge node.

    Parameters
    ----------
    superlink : str
        The SuperLink's ``host:port``.
    ca_cert : Path
        The CA certificate (``ca.crt`` from ``fedpeft keys``).
    auth_key : Path
        This node's private key (``nodes/nodeN`` from ``fedpeft keys``).
    state_dir : Path
        Where the worker's socket, its stats file and the SuperNode's files live.
    node_config : Mapping[str, str | int | float]
        Node config values (``partition-id``, ``device``, ...).
    runtime_port : int
        Port of the SuperNode's local Runtime API (distinct per node on one machine).
    threads : int | None
        CPU threads torch may use in the worker (``None``: torch's default).
    """

    superlink: str
    ca_cert: Path
    auth_key: Path
    state_dir: Path
    node_config: Mapping[str, str | int | float] = field(default_factory=dict)
    runtime_port: int = 9094
    threads: int | None = None

    def run(self) -> int:
        """Serve until the SuperNode exits; returns its exit code."""
        for p in (self.ca_cert, self.auth_key):
            if not p.exists():
                raise ConfigError(f"{p} does not exist; `fedpeft keys` creates it")
        if self.threads is not None:
            if self.threads < 1:
                raise ConfigError(f"--threads must be >= 1, got {self.threads}")
            import torch

            torch.set_num_threads(self.threads)
        state = self.state_dir.resolve()
        worker = ModelWorker(state / "worker" / "worker.sock", stats_path=state / "worker.json")
        worker.bind()
        thread = threading.Thread(target=worker.serve_forever, name="model-worker", daemon=True)
        thread.start()
        values = {**self.node_config, "worker": str(worker.path)}
        cmd = [
            flower_command("flower-supernode"),
            "--superlink", self.superlink,
            "--root-certificates", str(self.ca_cert),
            "--auth-supernode-private-key", str(self.auth_key),
            "--node-config", node_config_string(values),
            "--port", str(self.runtime_port),
        ]  # fmt: skip
        print("+", " ".join(cmd), flush=True)
        node = start(cmd, flower_env(state / "flwr"))
        stopping = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            # Only signal here: the main thread is inside node.wait(), and waiting again
            # from a handler would deadlock on Popen's wait lock; the finally below reaps.
            stopping.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGTERM)

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            rc = node.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            stop(node)
            worker.shutdown()
        stats = worker.stats()
        print(
            f"fedpeft client: SuperNode exited with code {rc}; the worker served "
            f"{stats['requests']} messages with {stats['model_loads']} base-model load(s)",
            flush=True,
        )
        if rc != 0 and not stopping.is_set() and stats["requests"] == 0:
            print(
                "fedpeft client: the SuperNode stopped before any message. If its log says "
                "'Failed to activate SuperNode', the SuperLink does not know this node's key: "
                f"register {self.auth_key}.pub there (fedpeft server registers KEYS/nodes/*.pub "
                "when it starts) and start this node again.",
                flush=True,
            )
        return 0 if stopping.is_set() else rc
