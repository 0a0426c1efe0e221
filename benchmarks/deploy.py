"""Deployment cost on 127.0.0.1: round latency floor and bytes on the wire vs the payload.

For each case it runs, side by side in one invocation:

- the in-process simulation of the scenario (``fedpeft simulate``'s engine), and
- the same scenario deployed: ``fedpeft server`` (its link: a SuperLink on 127.0.0.1 behind
  the mutual-TLS front, left running with ``--keep``) and two ``fedpeft client`` nodes, each
  reaching the front through its own byte-counting TCP relay, so every byte a node sends or
  receives on the wire (TLS records, HTTP, Flower's protobuf objects, polling) is counted.

After the run it keeps the nodes connected and idle for ``--idle`` seconds to measure the
polling traffic alone. Round times come from a second deployed run without the relays (the
relay is one more hop in Python; its run's round times are reported apart).

Reported per case: mean round wall time (in-process vs deployed), and
per node and round (whole run / rounds, so connection set-up, discovery and polling while
training are included): wire bytes up/down, Flower message bytes (the serialized objects, as
``metrics.jsonl`` counts them, discovery included) and the encoded payload. Cases:

- ``floor``: the tiny model, 1 local step, no evaluation between rounds: what a round costs
  when training costs nothing;
- ``lora``: SmolLM2-135M, LoRA r8 on q/v (the default scenario), 2 steps per round.

Both nodes run on this machine, at the same time, so each gets ``--node-threads`` torch threads
(half the cores by default); the in-process run trains the two clients one after the other
with all cores.

    .venv/bin/python benchmarks/deploy.py [--cases floor lora] [--rounds 4] [--idle 15]
        [--quick]   # floor only, 1 round, 1 s idle, one deployed run (through the relays)

Writes ``benchmarks/results/deploy.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _bench import REPO, add_quick, results_path

from fedpeft.config.load import load_config
from fedpeft.deploy.credentials import write_credentials
from fedpeft.simulation.runner import simulate
from fedpeft.testing import free_port

CASES: dict[str, tuple[str, list[str]]] = {
    "floor": ("tiny.toml", ["train.local_steps=1", "eval.every=0", "eval.examples=16",
                            "data.max_examples_per_client=48"]),
    "lora": ("default.toml", ["train.local_steps=2", "eval.every=0", "eval.examples=16",
                              "data.max_examples_per_client=64"]),
}  # fmt: skip


class Relay:
    """A TCP relay 127.0.0.1:port -> target that counts the bytes in each direction."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.up = 0  # node -> SuperLink
        self.down = 0  # SuperLink -> node
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = int(self._sock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def _pump(self, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                with self._lock:
                    if upward:
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            try:
                link = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                conn.close()
                continue
            for sock in (conn, link):  # forward small HTTP frames at once, as the peers would
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(conn, link, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(link, conn, False), daemon=True).start()

    def close(self) -> None:
        self._sock.close()


def _cli(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "fedpeft.cli", *args], cwd=REPO, stdout=f,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _wait_text(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = path.read_text(errors="replace") if path.exists() else ""
        if text in body:
            return body
        if proc.poll() is not None:
            raise RuntimeError(f"{path.name}: exited {proc.returncode}\n{body[-3000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"{text!r} not in {path} after {timeout} s")


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def deployed(
    scenario: str, overrides: list[str], tmp: Path, idle_s: float, threads: int, relay: bool
) -> dict[str, Any]:
    """One deployed run; with ``relay`` each node talks through a byte-counting relay."""
    keys = tmp / "keys"
    write_credentials(keys, ["127.0.0.1"], ["node0", "node1"], 1, False)
    port = free_port()
    relays = [Relay(port), Relay(port)] if relay else []
    out = tmp / "run"
    server = _cli(
        ["server", "--config", f"simulations/{scenario}", "--out", str(out), "--keys", str(keys),
         "--port", str(port), "--keep", *overrides, "federation.connect_timeout_s=300"],
        tmp / "server.log",
    )  # fmt: skip
    nodes: list[subprocess.Popen[bytes]] = []
    link_pid = None
    try:
        _wait_text(tmp / "server.log", "flwr run", server, 180)
        for i in range(2):
            to = relays[i].port if relay else port
            args = ["client", "--superlink", f"127.0.0.1:{to}",
                    "--creds", str(keys / "nodes" / f"node{i}"),
                    "--state-dir", str(tmp / f"n{i}"), "--runtime-port", str(free_port()),
                    "--partition-id", str(i), "--num-partitions", "2", "--device", "cpu",
                    "--threads", str(threads)]  # fmt: skip
            nodes.append(_cli(args, tmp / f"node{i}.log"))
        t0 = time.perf_counter()
        if server.wait(timeout=3600) != 0:
            raise RuntimeError((tmp / "server.log").read_text()[-3000:])
        run_s = time.perf_counter() - t0
        body = (tmp / "server.log").read_text()
        link_pid = int(body.split("left running, pid ")[1].split(";")[0])
        at_end = [r.counts() for r in relays]
        time.sleep(idle_s if relay else 0)
        idle = [
            ((r.counts()[0] - a[0]) / idle_s, (r.counts()[1] - a[1]) / idle_s)
            for r, a in zip(relays, at_end, strict=True)
        ]
        workers = [json.loads((tmp / f"n{i}" / "worker.json").read_text()) for i in range(2)]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in nodes:
            p.wait(60)
        if link_pid is not None:
            os.killpg(link_pid, signal.SIGTERM)
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        for r in relays:
            r.close()
    return {"out": out, "wire": at_end, "idle_Bps": idle, "run_s": run_s, "workers": workers}


def case(
    name: str, rounds: int, idle_s: float, threads: int, tmp: Path, quick: bool = False
) -> dict[str, Any]:
    scenario, extra = CASES[name]
    overrides = [*extra, "federation.num_clients=2", "federation.min_clients=2",
                 f"federation.rounds={rounds}"]  # fmt: skip
    sim_out = tmp / f"{name}-sim"
    simulate(load_config(REPO / "simulations" / scenario, overrides), sim_out, quiet=True)
    dep = deployed(scenario, overrides, tmp / f"{name}-relay", idle_s, threads, relay=True)
    # --quick: the relay run stands in for the direct one (round times then include the relay)
    direct = (
        dep
        if quick
        else deployed(scenario, overrides, tmp / f"{name}-direct", idle_s, threads, relay=False)
    )
    sim_rows, dep_rows = _rows(sim_out)[1:], _rows(dep["out"])[1:]
    direct_rows = _rows(direct["out"])[1:]
    summary = json.loads((dep["out"] / "summary.json").read_text())
    n = len(dep_rows)
    # whole run (discovery included), as the relays count it
    flower_up = (sum(r["bytes_up"] for r in dep_rows) + summary["setup_bytes_up"]) / (2 * n)
    flower_down = (sum(r["bytes_down"] for r in dep_rows) + summary["setup_bytes_down"]) / (2 * n)
    payload_up = sum(r.get("payload_up", 0) for r in dep_rows) / (2 * n)
    payload_down = sum(r.get("payload_down", 0) for r in dep_rows) / (2 * n)
    wire_up = statistics.mean(w[0] for w in dep["wire"]) / n
    wire_down = statistics.mean(w[1] for w in dep["wire"]) / n
    return {
        "case": name,
        "rounds": n,
        "round_s_inprocess": statistics.mean(r["wall_s"] for r in sim_rows),
        "round_s_deployed": statistics.mean(r["wall_s"] for r in direct_rows),
        "round_s_deployed_min": min(r["wall_s"] for r in direct_rows),
        "train_s_max_deployed": statistics.mean(r["train_s_max"] for r in direct_rows),
        "train_s_max_inprocess": statistics.mean(r["train_s_max"] for r in sim_rows),
        "round_s_through_relay": statistics.mean(r["wall_s"] for r in dep_rows),
        "run_s_deployed": direct["run_s"],
        "wire_up": wire_up,
        "wire_down": wire_down,
        "flower_up": flower_up,
        "flower_down": flower_down,
        "payload_up": payload_up,
        "payload_down": payload_down,
        "idle_up_Bps": statistics.mean(i[0] for i in dep["idle_Bps"]),
        "idle_down_Bps": statistics.mean(i[1] for i in dep["idle_Bps"]),
        "model_loads": [w["model_loads"] for w in direct["workers"] + dep["workers"]],
        "requests": [w["requests"] for w in direct["workers"] + dep["workers"]],
        "same_final_loss": _rows(sim_out)[-1]["eval_loss"]
        == _rows(direct["out"])[-1]["eval_loss"]
        == _rows(dep["out"])[-1]["eval_loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--idle", type=float, default=15.0, help="idle seconds measured after a run")
    ap.add_argument("--tmp", default=None, help="keep the runs' files in this folder")
    ap.add_argument(
        "--node-threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="torch threads per node (both nodes share this machine's cores)",
    )
    add_quick(ap)
    args = ap.parse_args()
    if args.quick:
        args.cases, args.rounds, args.idle = ["floor"], 1, 1.0
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    results = []
    with tempfile.TemporaryDirectory(prefix="fdep", dir="/tmp") as scratch:
        tmp = args.tmp or scratch
        for name in args.cases:
            results.append(
                case(name, args.rounds, args.idle, args.node_threads, Path(tmp), args.quick)
            )
            print(json.dumps(results[-1]), flush=True)
    kb = 1024
    print(
        f"\n{'case':6} {'round s: in-proc':>16} {'deployed':>9} {'(min)':>6} {'ratio':>6}"
        f" | {'client train s: in-proc':>23} {'deployed':>9} | {'round s via relay':>17}"
    )
    for r in results:
        print(
            f"{r['case']:6} {r['round_s_inprocess']:16.3f} {r['round_s_deployed']:9.2f}"
            f" {r['round_s_deployed_min']:6.2f}"
            f" {r['round_s_deployed'] / r['round_s_inprocess']:5.1f}x"
            f" | {r['train_s_max_inprocess']:23.2f} {r['train_s_max_deployed']:9.2f}"
            f" | {r['round_s_through_relay']:17.2f}"
        )
    print(
        f"\nper node and round, KiB  {'wire up':>8} {'flower up':>9} {'payload':>8} {'wire/flw':>8}"
        f" | {'wire dn':>8} {'flower dn':>9} {'payload':>8} {'wire/flw':>8} | idle B/s up/dn"
    )
    for r in results:
        print(f"{r['case']:24} {r['wire_up'] / kb:8.1f} {r['flower_up'] / kb:9.1f}"
              f" {r['payload_up'] / kb:8.1f} {r['wire_up'] / r['flower_up']:7.2f}x"
              f" | {r['wire_down'] / kb:8.1f} {r['flower_down'] / kb:9.1f}"
              f" {r['payload_down'] / kb:8.1f} {r['wire_down'] / r['flower_down']:7.2f}x"
              f" | {r['idle_up_Bps']:.0f}/{r['idle_down_Bps']:.0f}")  # fmt: skip
    print("model loads per node:", {r["case"]: r["model_loads"] for r in results})
    results_path("deploy.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
