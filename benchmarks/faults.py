"""The deployment's fault table, measured: what each fault costs, every case in its own process.

Cases (``--cases``; all by default):

- ``errors``: the tiny scenario in process, 3 clients x 10 rounds, clean vs one client whose
  every reply is a 30 MB error text: rounds finished, ``metrics.jsonl`` and checkpoint bytes;
- ``pull``: one 200 MB reply pulled as the deployed coordinator pulls it (Flower's
  ``HttpGrid`` over a recorded runtime, :mod:`fedpeft.testing`): Flower's own
  ``pull_messages`` vs fedpeft's bounded pull with the automatic limit of the default
  scenario's training reply (1 MB + 8 x 460,800 bytes): bytes pulled, growth of the resident
  set while pulling (sampled every 5 ms);
- ``restart``: deployed on 127.0.0.1 (``fedpeft server``, two ``fedpeft client`` nodes), the
  whole coordinator SIGKILLed after round 1 of 4 and started again with ``--resume``, the
  nodes left alone: seconds until the nodes had rejoined (the next row) and until the end,
  and whether the adapter equals the in-process simulation's bit for bit;
- ``orphans``: deployed; ``fedpeft server`` alone SIGKILLed mid-run (seconds until its
  SuperLink is gone), then one ``fedpeft client`` SIGKILLed (seconds until its SuperNode is
  gone);
- ``hung``: deployed, ``federation.round_timeout_s = 30``, ``probe_timeout_s = 5``: one node
  is frozen (SIGSTOP) from round 2 to round 4 of 8, then thawed: each round's wall time and
  what the row says about that node.

    .venv/bin/python benchmarks/faults.py [--cases errors pull restart orphans hung]
        [--quick]   # errors (3 MB texts, 2 rounds) and pull (a 20 MB reply) only

Writes ``benchmarks/results/faults.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from _bench import REPO, add_quick, results_path
from deploy import _cli, _wait_text

from fedpeft.testing import free_port

TINY = ["federation.num_clients=2", "data.max_examples_per_client=48", "train.local_steps=3",
        "eval.examples=16", "eval.max_new_tokens=8", "eval.every=0"]  # fmt: skip
REPLY_LIMIT = 1_000_000 + 8 * 460_800  # the default scenario's automatic training-reply limit


# ------------------------------------------------------------------ in-process cases
def inner_errors(
    variant: str, out: Path, rounds: int = 10, size: int = 30_000_000
) -> dict[str, Any]:
    """One in-process run; ``variant`` ``bloat`` makes client 1 answer ``size``-byte errors."""
    from flwr.app import Context, Message

    from fedpeft.client.app import make_client_app
    from fedpeft.config.load import load_config
    from fedpeft.deploy.apps import FORWARDED
    from fedpeft.server.app import run_server
    from fedpeft.server.results import RunReporter
    from fedpeft.simulation.inprocess import InProcessGrid

    overrides = [*TINY, "federation.num_clients=3", f"federation.rounds={rounds}"]
    cfg = load_config(REPO / "simulations" / "tiny.toml", overrides)
    real = make_client_app(cfg)
    app = type(real)()

    def answer(msg: Message, ctx: Context) -> Message:
        bad = variant == "bloat" and msg.metadata.message_type == "train.lora"
        if bad and ctx.node_config["partition-id"] == 1:
            raise RuntimeError("x" * size)
        return real(msg, ctx)

    for category, action in FORWARDED:
        getattr(app, category)(action)(answer)
    grid = InProcessGrid(app, [{"partition-id": i} for i in range(3)])
    summary = run_server(grid, cfg, out, RunReporter(out, rounds, quiet=True))
    return {
        "rounds": summary["rounds"],
        "failures": summary["failures"],
        "metrics_bytes": (out / "metrics.jsonl").stat().st_size,
        "checkpoint_bytes": (out / "checkpoint.safetensors").stat().st_size,
    }


def inner_pull(variant: str, values_n: int = 50_000_000) -> dict[str, Any]:
    """Pull one reply of ``values_n`` float32 (200 MB) through Flower's HttpGrid.

    ``variant``: flower | bounded.
    """
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, RecordDict

    from fedpeft._flwr import pull_bounded, set_task_identity
    from fedpeft.testing import RecordedRuntime, http_grid_on

    set_task_identity(7, 1)
    ins = Message(RecordDict(), 5, "train.lora")
    ins.metadata.__dict__["_message_id"] = ins.object_id
    # distinct values: Flower stores identical chunks once (content-addressed)
    values = np.random.default_rng(0).random(values_n, dtype=np.float32)
    big = ArrayRecord({"x": Array(values)})
    reply = Message(RecordDict({"u": big}), reply_to=ins)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    runtime = RecordedRuntime(reply)
    grid = http_grid_on(runtime)
    del big, reply, values
    gc.collect()
    me = psutil.Process()
    before, peak, stop = me.memory_info().rss, [0], threading.Event()

    def sample() -> None:  # the resident set while the pull runs, every 5 ms
        while not stop.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            stop.wait(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    ids = [m.metadata.message_id for m, _ in runtime.messages]
    if variant == "flower":
        got = list(grid.pull_messages(ids))
    else:
        got = pull_bounded(grid, ids, {ins.metadata.message_id: REPLY_LIMIT})
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    return {
        "pulled_bytes": runtime.pulled,
        "rss_growth_mib": (max(peak[0], me.memory_info().rss) - before) / 2**20,
        "seconds": seconds,
        "rejected": got[0].has_error(),
    }


# ------------------------------------------------------------------ deployed cases
class Deployment:
    """``fedpeft keys``, ``fedpeft server`` and two ``fedpeft client`` nodes in ``tmp``."""

    def __init__(self, tmp: Path, overrides: list[str]) -> None:
        from fedpeft.deploy.credentials import write_credentials

        self.tmp = tmp
        self.keys = tmp / "keys"
        write_credentials(self.keys, ["127.0.0.1"], ["node0", "node1"], 1, False)
        self.port, self.control = free_port(), free_port()
        self.out = tmp / "run"
        self.args = ["server", "--config", "simulations/tiny.toml", "--out", str(self.out),
                     "--keys", str(self.keys), "--port", str(self.port), "--control-port",
                     str(self.control), *overrides]  # fmt: skip
        self.procs: list[subprocess.Popen[bytes]] = []
        self.nodes: list[subprocess.Popen[bytes]] = []

    def server(self, *extra: str, log: str = "server") -> subprocess.Popen[bytes]:
        proc = _cli([*self.args, *extra], self.tmp / f"{log}.log")
        self.procs.append(proc)
        return proc

    def begin(self, rows: int) -> subprocess.Popen[bytes]:
        """Start the server, then the nodes; return the server once ``rows`` rows exist."""
        server = self.server()
        _wait_text(self.tmp / "server.log", "flwr run", server, 180)
        self.start_nodes()
        self.wait_rows(rows, server)
        return server

    def start_nodes(self) -> None:
        for i in range(2):
            self.nodes.append(_cli([
                "client", "--superlink", f"127.0.0.1:{self.port}",
                "--creds", str(self.keys / "nodes" / f"node{i}"), "--state-dir",
                str(self.tmp / f"n{i}"), "--runtime-port", str(free_port()),
                "--partition-id", str(i),
                "--num-partitions", "2", "--device", "cpu", "--threads", "1",
            ], self.tmp / f"node{i}.log"))  # fmt: skip
        self.procs += self.nodes

    def rows(self) -> list[dict[str, Any]]:
        path = self.out / "metrics.jsonl"
        text = path.read_text() if path.exists() else ""
        return [json.loads(x) for x in text.splitlines()]

    def wait_rows(self, n: int, server: subprocess.Popen[bytes], timeout: float = 600) -> float:
        """Seconds until ``metrics.jsonl`` has ``n`` rows (``server`` must keep running)."""
        t0 = time.monotonic()
        while len(self.rows()) < n:
            if time.monotonic() - t0 > timeout or server.poll() is not None:
                raise RuntimeError(f"{n} rows not reached: {self.tmp} (server {server.poll()})")
            time.sleep(0.1)
        return time.monotonic() - t0

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGCONT)
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for p in psutil.process_iter(["cmdline"]):  # anything naming this run's SuperLink
            if f"127.0.0.1:{self.control}" in " ".join(p.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    p.kill()


def _gone_after(pids: list[int], timeout: float = 120) -> float:
    t0 = time.monotonic()
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids):
        if time.monotonic() - t0 > timeout:
            return float("inf")
        time.sleep(0.05)
    return time.monotonic() - t0


def _pids(needle: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if needle in " ".join(p.info["cmdline"] or [])]  # fmt: skip


def case_restart(tmp: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    from fedpeft.config.load import load_config
    from fedpeft.simulation.runner import simulate

    dep = Deployment(tmp, [*TINY, "federation.rounds=4", "federation.connect_timeout_s=300"])
    try:
        server = dep.begin(2)  # round 1 checkpointed and written
        for p in psutil.process_iter(["cmdline"]):
            line = " ".join(p.info["cmdline"] or [])
            if f"127.0.0.1:{dep.control}" in line or f"--control-port {dep.control}" in line:
                with contextlib.suppress(psutil.Error, ProcessLookupError):
                    os.killpg(os.getpgid(p.pid), signal.SIGKILL)
        os.killpg(server.pid, signal.SIGKILL)
        done = len(dep.rows())
        t0 = time.monotonic()
        resumed = dep.server("--resume", log="resume")
        back = dep.wait_rows(done + 1, resumed)
        rc = resumed.wait(600)
        total = time.monotonic() - t0
        sim = tmp / "sim"
        simulate(load_config(REPO / "simulations" / "tiny.toml", [*TINY, "federation.rounds=4"]),
                 sim, quiet=True)  # fmt: skip
        name = "adapter/adapter_model.safetensors"
        a, b = load_file(str(dep.out / name)), load_file(str(sim / name))
        same = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
        alive = all(n.poll() is None for n in dep.nodes)
    finally:
        dep.close()
    return {"rows_before_kill": done, "rc": rc, "rejoined_s": back, "resumed_run_s": total,
            "bit_identical": same, "nodes_never_exited": alive}  # fmt: skip


def case_orphans(tmp: Path) -> dict[str, Any]:
    dep = Deployment(tmp, [*TINY, "federation.rounds=20", "federation.connect_timeout_s=300"])
    try:
        server = dep.begin(2)
        links = _pids(f"--port {dep.control}")  # the SuperLink (127.0.0.1 only)
        server.send_signal(signal.SIGKILL)  # the process only, not its group
        link_s = _gone_after(links)
        node = dep.nodes[0]
        supernodes = [c.pid for c in psutil.Process(node.pid).children()
                      if "supernode" in " ".join(c.cmdline())]  # fmt: skip
        if not supernodes:
            raise RuntimeError(f"no SuperNode under {psutil.Process(node.pid).children()}")
        node.send_signal(signal.SIGKILL)
        node_s = _gone_after(supernodes)
    finally:
        dep.close()
    return {"superlink_gone_s": link_s, "supernode_gone_s": node_s}


def case_hung(tmp: Path) -> dict[str, Any]:
    timeouts = ["federation.round_timeout_s=30", "federation.probe_timeout_s=5",
                "federation.min_clients=1"]  # fmt: skip
    dep = Deployment(tmp, [*TINY, "federation.rounds=8", "federation.connect_timeout_s=300",
                           *timeouts])  # fmt: skip
    try:
        server = dep.begin(2)  # round 1 done
        frozen = [dep.nodes[1].pid, *(c.pid for c in psutil.Process(dep.nodes[1].pid).children())]
        groups = {os.getpgid(p) for p in frozen}
        for g in groups:
            os.killpg(g, signal.SIGSTOP)
        dep.wait_rows(5, server)  # rounds 2, 3, 4
        for g in groups:
            os.killpg(g, signal.SIGCONT)
        rc = server.wait(600)
    finally:
        dep.close()
    rows = dep.rows()[1:]
    return {
        "rc": rc,
        "rounds": [
            {
                "round": r["round"],
                "wall_s": round(r["wall_s"], 1),
                "node1": r["failures"].get("1", "ok")[:70],
            }
            for r in rows
        ],  # fmt: skip
    }


# ------------------------------------------------------------------ driver
def _inner(args: list[str]) -> dict[str, Any]:
    """Run one in-process case in a fresh interpreter; returns its JSON."""
    proc = subprocess.run([sys.executable, __file__, "--inner", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=1800)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=["errors", "pull", "restart", "orphans", "hung"])
    ap.add_argument("--inner", nargs="+", default=None, help=argparse.SUPPRESS)
    add_quick(ap)
    args = ap.parse_args()
    if args.quick:
        args.cases = [c for c in args.cases if c in ("errors", "pull")]
    # quick: 2 rounds of 3 MB error texts; a 20 MB reply (still above the pull limit)
    errors_size = ["2", "3000000"] if args.quick else ["10", "30000000"]
    pull_size = ["5000000"] if args.quick else ["50000000"]
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.inner:
        kind, *rest = args.inner
        if kind == "errors":
            got = inner_errors(rest[0], Path(rest[1]), int(rest[2]), int(rest[3]))
        else:
            got = inner_pull(rest[0], int(rest[1]))
        print(json.dumps(got))
        return
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "errors" in args.cases:
            results["errors"] = {v: _inner(["errors", v, str(tmp / f"errors-{v}"), *errors_size])
                                 for v in ("clean", "bloat")}  # fmt: skip
            print("errors", json.dumps(results["errors"]))
        if "pull" in args.cases:
            results["pull"] = {v: _inner(["pull", v, *pull_size]) for v in ("flower", "bounded")}
            print("pull", json.dumps(results["pull"]))
        for name, fn in (("restart", case_restart), ("orphans", case_orphans),
                         ("hung", case_hung)):  # fmt: skip
            if name in args.cases:
                (tmp / name).mkdir()
                results[name] = fn(tmp / name)
                print(name, json.dumps(results[name]))
    out = results_path("faults.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
