"""A real deployment on 127.0.0.1: `fedpeft server` (TLS SuperLink, node authentication) and
two `fedpeft client` nodes (SuperNode + model worker), for a LoRA and a zeroth-order run.

Each run must give the bytes the in-process simulation of the same scenario and seed gives,
load the base model once per node, refuse a node whose key was never registered, and leave
no process behind.
"""

from __future__ import annotations

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


def _federation(tmp: Path, scenario: str, overrides: tuple[str, ...]) -> dict:
    """Keys, server, two registered nodes and one rogue node; returns what happened."""
    keys = tmp / "keys"
    write_credentials(keys, ["127.0.0.1"], ["node0", "node1"], 1, False)
    rogue = tmp / "rogue"
    rogue.mkdir()
    private, public = make_node_key()
    (rogue / "key").write_bytes(private)
    (rogue / "key").chmod(0o600)
    (rogue / "key.pub").write_bytes(public)
    port = _port()
    out = tmp / "run"
    procs: list[subprocess.Popen[bytes]] = []
    result: dict = {"out": out}
    try:
        server = _start(
            ["server", "--config", f"simulations/{scenario}", "--out", str(out),
             "--keys", str(keys), "--port", str(port), *overrides,
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
        result["server_rc"] = server.wait(timeout=300)
        result["rogue_rc"] = procs[3].wait(timeout=60)
        result["workers"] = [
            json.loads((tmp / n / "worker.json").read_text()) for n in ("node0", "node1")
        ]
        result["rogue_requests"] = json.loads((rogue / "worker.json").read_text())["requests"]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        result["left"] = [p.pid for p in procs if not _group_gone(p.pid)]
        for pgid in result["left"]:
            os.killpg(pgid, signal.SIGKILL)
    result["logs"] = {p.name: p.read_text(errors="replace") for p in tmp.glob("*.log")}
    return result


def _check(result: dict, reference: Path, files: list[str]) -> None:
    logs = result["logs"]
    assert result["server_rc"] == 0, logs["server.log"][-4000:]
    for name in files:  # bit-identical tensors and metadata (the header's key order varies:
        # safetensors writes the metadata map in hash order, so compare contents, not bytes)
        dep, sim = (safe_open(str(d / name), "pt") for d in (result["out"], reference))
        assert dep.metadata() == sim.metadata() and set(dep.keys()) == set(sim.keys())
        for key in sim.keys():  # noqa: SIM118 (safe_open is not a dict)
            assert torch.equal(dep.get_tensor(key), sim.get_tensor(key)), (name, key)
    sim = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    dep = [json.loads(x) for x in (result["out"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_loss"] for r in dep] == [r["eval_loss"] for r in sim]
    assert [r["train_loss"] for r in dep] == [r["train_loss"] for r in sim]
    # discovery + 2 rounds on each node, one base-model load per node
    for w in result["workers"]:
        assert w["model_loads"] == 1 and w["requests"] == 3, w
    # the rogue node's key was never registered: the SuperLink refused it and it exited
    assert result["rogue_rc"] != 0, logs["rogue.log"][-3000:]
    assert "Failed to activate SuperNode" in logs["rogue.log"], logs["rogue.log"][-3000:]
    link = (result["out"] / "superlink.log").read_text(errors="replace")
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in link
    assert link.count('"POST /v1/fleet/activate-node HTTP/1.1" 200') == 2
    assert result["rogue_requests"] == 0
    assert result["left"] == [], "process groups still alive after shutdown"


@pytest.mark.deploy
def test_lora_run_on_superlink_and_supernodes_equals_the_simulation(tmp_path, cache):
    ref = tmp_path / "sim"
    simulate(load_config(REPO / "simulations" / "tiny.toml", LORA), ref, quiet=True, cache=cache)
    result = _federation(tmp_path / "dep", "tiny.toml", LORA)
    _check(result, ref, ["adapter/adapter_model.safetensors"])


@pytest.mark.deploy
def test_zeroth_order_run_on_superlink_and_supernodes_equals_the_simulation(tmp_path, cache):
    ref = tmp_path / "sim"
    cfg = load_config(REPO / "simulations" / "tiny_fedkseed.toml", ZO)
    simulate(cfg, ref, quiet=True, cache=cache)
    result = _federation(tmp_path / "dep", "tiny_fedkseed.toml", ZO)
    _check(result, ref, ["zo_state.safetensors"])
