"""``fedpeft server``: the coordinator of a deployed run, on Flower's SuperLink.

One command does what a Flower user would otherwise type in four steps, with the same Flower
commands underneath (each is printed, so nothing is hidden):

1. start ``flower-superlink`` with TLS (``KEYS/ca.crt``, ``server.pem``, ``server.key`` from
   ``fedpeft keys``) and ``--enable-supernode-auth``; runtime dependency installation off
   (nodes run the fedpeft installed on them);
2. register every node public key ``KEYS/nodes/*.pub`` with ``flwr supernode register``
   (a node whose key is not registered is refused by the SuperLink);
3. write a Flower app folder ``OUT/app`` whose run config carries the resolved scenario
   (:mod:`fedpeft.deploy.apps`) and submit it with ``flwr run OUT/app fedpeft --stream``;
   the coordinator waits for ``federation.num_clients`` nodes
   (``federation.connect_timeout_s``), runs the rounds and writes ``OUT/metrics.jsonl``,
   ``OUT/summary.json`` and ``OUT/adapter/`` exactly as ``fedpeft simulate`` does;
4. stop the SuperLink (``--keep`` leaves it running for further ``flwr run`` submissions).

The ``flwr`` CLI's configuration lives in ``OUT/flwr/config.toml`` (connection ``fedpeft``),
so the user's own ``~/.flwr`` is not touched; ``FLWR_HOME=OUT/flwr flwr ls fedpeft`` and
friends work against the running SuperLink.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedpeft.configio import config_to_dict, dump_toml, load_config
from fedpeft.deploy.procs import flower_command, flower_env, start, stop, wait_port
from fedpeft.errors import ConfigError, FedpeftError

__all__ = ["CONNECTION", "ServerRole", "app_project", "flwr_config"]

CONNECTION = "fedpeft"


def app_project(scenario: str, out: Path, overrides: str = "", resume: bool = False) -> str:
    """The ``pyproject.toml`` of the Flower app a deployed run submits."""
    return "\n".join(
        [
            "# Written by `fedpeft server`: the Flower app of one deployed fedpeft run.",
            "[build-system]",
            'requires = ["hatchling"]',
            'build-backend = "hatchling.build"',
            "",
            "[project]",
            'name = "fedpeft-run"',
            'version = "1.0.0"',
            'description = "A fedpeft run (the code is the fedpeft installed on every node)"',
            'license = "Apache-2.0"',
            "dependencies = []",
            "",
            "[tool.flwr.app]",
            'publisher = "fedpeft"',
            "",
            "[tool.flwr.app.components]",
            'serverapp = "fedpeft.deploy.apps:server_app"',
            'clientapp = "fedpeft.deploy.apps:client_app"',
            "",
            "[tool.flwr.app.config]",
            f"scenario = {json.dumps(scenario)}",
            f"overrides = {json.dumps(overrides)}",
            f"out = {json.dumps(str(out))}",
            f"resume = {'true' if resume else 'false'}",
            "",
        ]
    )


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
class ServerRole:
    """One deployed run: SuperLink up, nodes registered, run submitted, SuperLink down.

    Parameters
    ----------
    config : Path
        The scenario TOML (the same one ``fedpeft simulate`` takes).
    overrides : Sequence[str]
        ``KEY=VALUE`` overrides applied here, before the scenario is sent.
    out : Path
        Run folder (results, ``app/``, ``flwr/``, ``superlink.log``).
    keys : Path
        The folder ``fedpeft keys`` wrote.
    host, port : str, int
        Where the SuperLink listens (Fleet, Control and Runtime APIs share it in 1.41).
    keep : bool
        Leave the SuperLink running after the run.
    attach : bool
        Use the SuperLink already running at ``host:port`` (started by an earlier
        ``--keep`` or as a service): no start, no key registration, no stop.
    resume : bool
        Continue the run in ``out`` from its checkpoint instead of starting over.
    """

    config: Path
    overrides: Sequence[str]
    out: Path
    keys: Path
    host: str = "127.0.0.1"
    port: int = 9092
    keep: bool = False
    attach: bool = False
    resume: bool = False

    def _files(self) -> tuple[Path, Path, Path, list[Path]]:
        ca, cert, key = self.keys / "ca.crt", self.keys / "server.pem", self.keys / "server.key"
        missing = [str(p) for p in (ca, cert, key) if not p.exists()]
        pubs = sorted((self.keys / "nodes").glob("*.pub"))
        if missing:
            raise ConfigError(
                f"missing {missing}; create them with `fedpeft keys --out {self.keys}`"
            )
        if not pubs:
            raise ConfigError(
                f"no node public keys in {self.keys / 'nodes'}; `fedpeft keys --nodes N` makes them"
            )
        return ca, cert, key, pubs

    def _flwr(self, args: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        cmd = [flower_command("flwr"), *args]
        print("+", " ".join(cmd), flush=True)
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    def register(self, pubs: Sequence[Path], env: dict[str, str]) -> None:
        """Register each node's public key with the SuperLink (``flwr supernode register``)."""
        for pub in pubs:
            proc = self._flwr(
                ["supernode", "register", str(pub), CONNECTION, "--name", pub.stem], env
            )
            if proc.returncode != 0:
                raise FedpeftError(f"registering {pub} failed:\n{proc.stdout}{proc.stderr}")

    def submit(self, out: Path, env: dict[str, str]) -> int:
        """``flwr run OUT/app fedpeft --stream``; returns its exit code (1 if no summary)."""
        t0 = time.perf_counter()
        submit = [flower_command("flwr"), "run", str(out / "app"), CONNECTION, "--stream"]
        print("+", " ".join(submit), flush=True)
        rc = subprocess.run(submit, env=env).returncode
        if rc == 0 and not (out / "summary.json").exists():
            print("fedpeft server: the run ended without summary.json; see the log above")
            rc = 1
        if rc == 0:
            print(f"fedpeft server: run done in {time.perf_counter() - t0:.1f} s; results in {out}")
        return rc

    def run(self) -> int:
        """Do the four steps; returns the exit code of ``flwr run``."""
        cfg = load_config(self.config, self.overrides)
        if self.attach:
            ca = self.keys / "ca.crt"
            if not ca.exists():
                raise ConfigError(f"{ca} does not exist; `fedpeft keys` creates it")
        else:
            ca, cert, key, pubs = self._files()
        out = self.out.resolve()
        (out / "app").mkdir(parents=True, exist_ok=True)
        (out / "flwr").mkdir(parents=True, exist_ok=True)
        # the flwr CLI runs on this machine: a wildcard listen address is reached on loopback
        # (which `fedpeft keys` always puts in the certificate)
        local = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        address = f"{local}:{self.port}"
        (out / "flwr" / "config.toml").write_text(flwr_config(address, ca.resolve()))
        scenario = dump_toml(config_to_dict(cfg))
        (out / "app" / "pyproject.toml").write_text(app_project(scenario, out, resume=self.resume))
        (out / "summary.json").unlink(missing_ok=True)
        env = flower_env(out / "flwr", {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})
        if self.attach:
            wait_port(local, self.port, 10.0)
            return self.submit(out, env)
        cmd = [
            flower_command("flower-superlink"),
            "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", self.host, "--port", str(self.port),
        ]  # fmt: skip
        print("+", " ".join(cmd), f"> {out / 'superlink.log'}", flush=True)
        with open(out / "superlink.log", "ab") as log:
            link = start(cmd, env, log)
        try:
            wait_port(local, self.port, 60.0, link)
            self.register(pubs, env)
            rc = self.submit(out, env)
            if self.keep:
                print(f"fedpeft server: SuperLink left running (pid {link.pid}) on {address}")
                return rc
        except BaseException:
            stop(link)
            raise
        stop(link)
        return rc
