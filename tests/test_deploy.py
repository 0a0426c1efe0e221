"""A real deployment on 127.0.0.1: `fedpeft server` (TLS SuperLink, node authentication) and
two `fedpeft client` nodes (SuperNode + model worker), for a LoRA and a zeroth-order run.

Each run must give the bytes the in-process simulation of the same scenario and seed gives,
load the base model once per node, refuse a node whose key was never registered, and leave
no process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fedpeft.configio import load_config
from fedpeft.deploy.credentials import make_node_key, write_credentials
from fedpeft.simulation.runner import simulate

REPO = Path(__file__).resolve().parents[1]
LORA = ("federation.num_clients=2", "federation.rounds=2", "data.max_examples_per_client=48",
        "train.local_steps=3", "eval.examples=16", "eval.max_new_tokens=8")  # fmt: skip
ZO = ("federation.num_clients=2", "federation.rounds=2", "data.max_examples_per_client=40",
      "eval.examples=16", "zo.local_steps=10")  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "fedpeft.cli", *args],
            cwd=cwd,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
        )


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"exited {proc.returncode}:\n{path.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s:\n{path.read_text()[-3000:]}")


def _group_gone(pgid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> dict:
    """One SuperLink (``fedpeft server --keep``) and two registered nodes run the LoRA
    scenario, then the zeroth-order one is submitted to the same SuperLink (``--attach``);
    a third node with an unregistered key tries to join. Everything is stopped at the end."""
    tmp = tmp_path_factory.mktemp("dep")
    keys = tmp / "keys"
    write_credentials(keys, ["127.0.0.1"], ["node0", "node1"], 1, False)
    rogue = tmp / "rogue"
    rogue.mkdir()
    private, public = make_node_key()
    (rogue / "key").write_bytes(private)
    (rogue / "key").chmod(0o600)
    (rogue / "key.pub").write_bytes(public)
    port = _port()
    procs: list[subprocess.Popen[bytes]] = []
    result: dict = {"lora": tmp / "lora", "zo": tmp / "zo"}
    link_pid = None
    try:
        server = _start(
            ["server", "--config", "simulations/tiny.toml", "--out", str(tmp / "lora"),
             "--keys", str(keys), "--port", str(port), "--keep", *LORA,
             "federation.connect_timeout_s=120"],
            tmp / "server.log", REPO,
        )  # fmt: skip
        procs.append(server)
        _wait_for(tmp / "server.log", "flwr run", server, 120)  # keys registered
        link = f"127.0.0.1:{port}"
        for name, key in [("node0", keys / "nodes" / "node0"), ("node1", keys / "nodes" / "node1"),
                          ("rogue", rogue / "key")]:  # fmt: skip
            pid = {"node0": 0, "node1": 1, "rogue": 1}[name]
            procs.append(
                _start(
                    [
                        "client",
                        "--superlink",
                        link,
                        "--ca",
                        str(keys / "ca.crt"),
                        "--key",
                        str(key),
                        "--state-dir",
                        str(tmp / name),
                        "--runtime-port",
                        str(_port()),
                        "--partition-id",
                        str(pid),
                        "--num-partitions",
                        "2",
                        "--device",
                        "cpu",
                    ],
                    tmp / f"{name}.log",
                    REPO,
                )  # fmt: skip
            )
        result["lora_rc"] = server.wait(timeout=300)
        log = (tmp / "server.log").read_text()
        if "SuperLink left running (pid " in log:
            link_pid = int(log.split("SuperLink left running (pid ")[1].split(")")[0])
        result["rogue_rc"] = procs[3].wait(timeout=60)
        attach = _start(
            ["server", "--attach", "--config", "simulations/tiny_fedkseed.toml",
             "--out", str(tmp / "zo"), "--keys", str(keys), "--port", str(port), *ZO],
            tmp / "attach.log", REPO,
        )  # fmt: skip
        procs.append(attach)
        result["zo_rc"] = attach.wait(timeout=300)
        result["workers"] = [
            json.loads((tmp / n / "worker.json").read_text()) for n in ("node0", "node1")
        ]
        result["rogue_requests"] = json.loads((rogue / "worker.json").read_text())["requests"]
    finally:
        groups = [p.pid for p in procs] + ([link_pid] if link_pid else [])
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        if link_pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(link_pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        result["left"] = [g for g in groups if not _group_gone(g)]
        for pgid in result["left"]:
            os.killpg(pgid, signal.SIGKILL)
    result["logs"] = {p.name: p.read_text(errors="replace") for p in tmp.glob("*.log")}
    result["superlink_log"] = (tmp / "lora" / "superlink.log").read_text(errors="replace")
    return result


def _same_tensors(dep: Path, sim: Path, files: list[str]) -> None:
    """Bit-identical tensors and metadata (the safetensors header's key order varies between
    processes: it writes the metadata map in hash order, so compare contents, not bytes)."""
    for name in files:
        d, s = (safe_open(str(x / name), "pt") for x in (dep, sim))
        assert d.metadata() == s.metadata() and set(d.keys()) == set(s.keys())
        for key in s.keys():  # noqa: SIM118 (safe_open is not a dict)
            assert torch.equal(d.get_tensor(key), s.get_tensor(key)), (name, key)
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (dep, sim)]  # fmt: skip
    for k in ("eval_loss", "train_loss"):
        assert [r[k] for r in rows[0]] == [r[k] for r in rows[1]], k


@pytest.mark.deploy
def test_lora_run_on_superlink_and_supernodes_equals_the_simulation(federation, tmp_path, cache):
    assert federation["lora_rc"] == 0, federation["logs"]["server.log"][-4000:]
    simulate(
        load_config(REPO / "simulations" / "tiny.toml", LORA), tmp_path, quiet=True, cache=cache
    )
    _same_tensors(federation["lora"], tmp_path, ["adapter/adapter_model.safetensors"])


@pytest.mark.deploy
def test_zeroth_order_run_on_the_same_superlink_equals_the_simulation(federation, tmp_path, cache):
    assert federation["zo_rc"] == 0, federation["logs"]["attach.log"][-4000:]
    cfg = load_config(REPO / "simulations" / "tiny_fedkseed.toml", ZO)
    simulate(cfg, tmp_path, quiet=True, cache=cache)
    _same_tensors(federation["zo"], tmp_path, ["zo_state.safetensors"])


@pytest.mark.deploy
def test_each_node_loads_the_base_model_once(federation):
    # per run: discovery + 2 rounds; both runs use the same tiny model, still loaded once
    for w in federation["workers"]:
        assert w["model_loads"] == 1 and w["requests"] == 6, w


@pytest.mark.deploy
def test_an_unregistered_node_is_refused(federation):
    log = federation["logs"]["rogue.log"]
    assert federation["rogue_rc"] != 0, log[-3000:]
    assert "Failed to activate SuperNode" in log, log[-3000:]
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in federation["superlink_log"]
    assert federation["superlink_log"].count('"POST /v1/fleet/activate-node HTTP/1.1" 200') == 2
    assert federation["rogue_requests"] == 0


@pytest.mark.deploy
def test_every_process_is_shut_down(federation):
    assert federation["left"] == [], "process groups still alive after shutdown"
