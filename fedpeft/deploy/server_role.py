"""``fedpeft server``: one deployed run, from a locked-down SuperLink to results.

The steps, each Flower command printed as it runs:

1. start ``fedpeft link`` (:mod:`fedpeft.deploy.link`) as a child: a SuperLink on
   127.0.0.1 behind a front that lets only nodes with a certificate from ``fedpeft keys``
   reach only the Fleet API; the child gets SIGTERM if this process dies, and stops its
   SuperLink (``--keep`` leaves it running for further runs; ``--attach`` uses one already
   running, e.g. the ``server/fedpeft-link.service`` unit);
2. register every node's public key (``KEYS/nodes/*/node.key.pub``) with
   ``flwr supernode register`` on 127.0.0.1;
3. write a Flower app folder ``OUT/app`` whose run config carries the resolved scenario
   (:mod:`fedpeft.deploy.apps`), build it as ``flwr run`` does and sign it with the operator
   key (``KEYS/operator.key``, :mod:`fedpeft.deploy.signing`): nodes run nothing else;
4. submit it with ``flwr run OUT/app fedpeft --stream``; the coordinator waits for the
   scenario's clients (``federation.connect_timeout_s``), runs the rounds and writes
   ``OUT/metrics.jsonl``, ``OUT/summary.json`` and ``OUT/adapter/`` as ``fedpeft simulate``
   does. If the run ends without results, the reason is printed: the coordinator's error
   (``OUT/outcome.json``) or what Flower recorded for the run (stopped, failed and why);
5. stop the link.

The ``flwr`` CLI's configuration lives in ``OUT/flwr/config.toml`` (connection ``fedpeft``),
so the user's own ``~/.flwr`` is not touched; ``FLWR_HOME=OUT/flwr flwr ls fedpeft`` and
friends work against the SuperLink, from this machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedpeft._flwr import build_fab
from fedpeft.config.load import config_to_dict, dump_toml, load_config
from fedpeft.config.rules import deployment_problems
from fedpeft.deploy.apps import OUTCOME
from fedpeft.deploy.credentials import Credentials
from fedpeft.deploy.link import CONNECTION, control_port, flwr_config
from fedpeft.deploy.procs import flower_command, flower_env, start, stop, wait_port
from fedpeft.deploy.signing import AppSignatures, load_operator_key
from fedpeft.errors import ConfigError, FedpeftError, clip

__all__ = ["CONNECTION", "ServerRole", "app_project", "flwr_config"]


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


@dataclass
class ServerRole:
    """One deployed run (see the module docstring).

    Parameters
    ----------
    config : Path
        The scenario TOML (the same one ``fedpeft simulate`` takes).
    overrides : Sequence[str]
        ``KEY=VALUE`` overrides applied here, before the scenario is sent.
    out : Path
        Run folder (results, ``app/``, ``flwr/``, ``link/``, ``link.log``).
    keys : Path
        The folder ``fedpeft keys`` wrote.
    host, port : str, int
        Where nodes reach the coordinator (the front).
    control_port : int | None
        The SuperLink's port on 127.0.0.1 (``None``: ``port + 1``).
    keep : bool
        Leave the link running after the run.
    attach : bool
        Use the link already running (``--keep`` earlier, or a service): no start, no key
        registration, no stop.
    resume : bool
        Continue the run in ``out`` from its checkpoint instead of starting over.
    """

    config: Path
    overrides: Sequence[str]
    out: Path
    keys: Path
    host: str = "127.0.0.1"
    port: int = 9092
    control_port: int | None = None
    keep: bool = False
    attach: bool = False
    resume: bool = False

    @property
    def internal(self) -> int:
        """The SuperLink's port on 127.0.0.1."""
        return control_port(self.port, self.control_port)

    def _pubs(self, creds: Credentials) -> list[Path]:
        missing = [str(p) for p in (creds.ca_cert, creds.operator_key) if not p.is_file()]
        if missing:
            raise ConfigError(f"missing {missing}; `fedpeft keys --out {self.keys}` creates them")
        pubs = sorted((self.keys / "nodes").glob("*/node.key.pub"))
        if not pubs and not self.attach:
            raise ConfigError(
                f"no node keys in {self.keys / 'nodes'}; `fedpeft keys --nodes N` makes them"
            )
        return pubs

    def _flwr(self, args: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        cmd = [flower_command("flwr"), *args]
        print("+", " ".join(cmd), flush=True)
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    def register(self, pubs: Sequence[Path], env: dict[str, str]) -> None:
        """Register each node's public key with the SuperLink (``flwr supernode register``)."""
        for pub in pubs:
            name = pub.parent.name
            proc = self._flwr(["supernode", "register", str(pub), CONNECTION, "--name", name], env)
            if proc.returncode != 0:
                raise FedpeftError(f"registering {pub} failed:\n{proc.stdout}{proc.stderr}")

    def sign(self, app: Path, creds: Credentials) -> str:
        """Build the app as ``flwr run`` will and sign it; returns its SHA-256."""
        key, _ = load_operator_key(creds.operator_key)
        path = AppSignatures(self.keys / "apps").add(build_fab(app), key)
        print(f"fedpeft server: app {path.stem[:12]} signed with {creds.operator_key}", flush=True)
        return path.stem

    def submit(self, out: Path, env: dict[str, str], fab_hash: str = "") -> int:
        """``flwr run OUT/app fedpeft --stream``; returns 0 only with results in ``out``."""
        t0 = time.perf_counter()
        submit = [flower_command("flwr"), "run", str(out / "app"), CONNECTION, "--stream"]
        print("+", " ".join(submit), flush=True)
        rc = subprocess.run(submit, env=env).returncode
        if rc == 0 and (out / "summary.json").exists():
            print(f"fedpeft server: run done in {time.perf_counter() - t0:.1f} s; results in {out}")
            return 0
        why = self.why(out, env, fab_hash)
        print(f"fedpeft server: the run ended without results: {why}", flush=True)
        return rc or 1

    def why(self, out: Path, env: dict[str, str], fab_hash: str) -> str:
        """Why the run ended early: the coordinator's own error, else Flower's record of the
        latest run of this app (``fab_hash``)."""
        try:
            return str(json.loads((out / OUTCOME).read_text(encoding="utf-8"))["error"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        proc = self._flwr(["ls", CONNECTION, "--format", "json"], env)
        try:
            runs = json.loads(proc.stdout)["runs"]
            ours = [r for r in runs if r["fab-hash"] and fab_hash.startswith(r["fab-hash"])]
            run = max(ours, key=lambda r: str(r["pending-at"]))
        except (ValueError, KeyError, TypeError):
            return clip(f"no record of the run on the SuperLink: {proc.stdout}{proc.stderr}")
        return clip(
            f"Flower records run {run.get('run-id')} as {run.get('status')!r}"
            + (f" ({run['status-details']})" if run.get("status-details") else "")
            + "; a stopped run was stopped with `flwr stop` from this machine, a failed one "
            "lost its coordinator (see the log above)"
        )

    def run(self) -> int:
        """Do the steps; returns 0 when the run finished with results."""
        cfg = load_config(self.config, self.overrides)
        if problems := deployment_problems(cfg):  # refused before the SuperLink starts
            raise ConfigError(problems)
        creds = Credentials.at(self.keys)
        pubs = self._pubs(creds)
        out = self.out.resolve()
        (out / "app").mkdir(parents=True, exist_ok=True)
        (out / "flwr").mkdir(parents=True, exist_ok=True)
        address = f"127.0.0.1:{self.internal}"
        (out / "flwr" / "config.toml").write_text(flwr_config(address, creds.ca_cert.resolve()))
        scenario = dump_toml(config_to_dict(cfg))
        (out / "app" / "pyproject.toml").write_text(app_project(scenario, out, resume=self.resume))
        (out / "summary.json").unlink(missing_ok=True)
        env = flower_env(out / "flwr", {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})
        link = None
        if not self.attach:
            cmd = [
                sys.executable, "-m", "fedpeft.cli", "link", "--keys", str(self.keys.resolve()),
                "--state", str(out / "link"), "--host", self.host, "--port", str(self.port),
                "--control-port", str(self.internal),
            ]  # fmt: skip
            print("+", " ".join(cmd), f"> {out / 'link.log'}", flush=True)
            with open(out / "link.log", "ab") as log:
                link = start(cmd, env, log, die_with_parent=not self.keep)
        try:
            wait_port("127.0.0.1", self.internal, 120.0, link)
            local = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
            wait_port(local, self.port, 60.0, link)
            if link is not None:
                self.register(pubs, env)
            fab_hash = self.sign(out / "app", creds)
            rc = self.submit(out, env, fab_hash)
        except BaseException:
            if link is not None:
                stop(link)
            raise
        if link is not None and self.keep:
            print(f"fedpeft server: the link (SuperLink and front) is left running, pid "
                  f"{link.pid}; stop it with `kill {link.pid}`", flush=True)  # fmt: skip
        elif link is not None:
            stop(link)
        return rc
