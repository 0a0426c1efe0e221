"""A real deployment on 127.0.0.1, as an operator runs it, with the faults it must survive.

``fedpeft keys``, ``fedpeft server --keep`` (a SuperLink on 127.0.0.1 behind the mutual-TLS,
Fleet-only front; keys registered; the app signed) and ``fedpeft client`` nodes: two honest
ones, one claiming a partition the scenario lacks, one claiming a partition another node
holds, one with another base model (float16), and one whose key was never registered.

The LoRA run is SIGKILLed with its whole coordinator after a checkpoint and continued with
``fedpeft server --resume``, the nodes left running: they must come back by themselves and
the adapter must be the in-process simulation's, bit for bit. Then an outsider holding only
``ca.crt`` tries the Control API through the public port, the operator submits an unsigned
app (every node must refuse it), and a zeroth-order run is submitted to the same link.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open

from fedpeft.config.load import load_config
from fedpeft.deploy.credentials import add_nodes, write_credentials
from fedpeft.deploy.server_role import app_project
from fedpeft.server.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint
from fedpeft.simulation.runner import simulate

REPO = Path(__file__).resolve().parents[1]
LORA = ("federation.num_clients=2", "federation.rounds=3", "data.max_examples_per_client=48",
        "train.local_steps=3", "eval.examples=16", "eval.max_new_tokens=8")  # fmt: skip
ZO = ("federation.num_clients=2", "federation.rounds=2", "data.max_examples_per_client=40",
      "eval.examples=16", "zo.local_steps=10")  # fmt: skip
SCAFFOLD = (*LORA, "federation.rounds=2", "strategy.name=scaffold", "eval.personalized=true")
# name -> (partition id, extra flags): the honest nodes first
NODES = {
    "node0": (0, []),
    "node1": (1, []),
    "wrongid": (7, []),  # the scenario has partitions 0 and 1
    "dup": (1, []),  # node1's partition
    "fp16": (0, ["--dtype", "float16"]),  # another base model: its fingerprint differs
}
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
# every wait on a process is bounded, and generous: the story takes ~4.5 min on an idle
# 2-core machine and must hold with both cores busy
WAIT_S = 900


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "fedpeft.cli", *args], cwd=REPO, stdout=f,
            stderr=subprocess.STDOUT, start_new_session=True, env=ENV,
        )  # fmt: skip


def _flwr(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).parent / "flwr")
    env = {**ENV, "FLWR_HOME": str(home)}
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"exited {proc.returncode}:\n{path.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s:\n{path.read_text()[-3000:]}")


def _checkpointed(run: Path) -> int:
    try:
        return int(load_checkpoint(run / CHECKPOINT)["round"])
    except CheckpointError:
        return -1


def _coordinator_groups(server: subprocess.Popen[bytes], control: int) -> set[int]:
    """Process groups of the coordinator: the server, its link, the SuperLink and what the
    SuperLink started (they all name the SuperLink's port on 127.0.0.1)."""
    marks = (f"127.0.0.1:{control}", f"--control-port {control}", f"--port {control}")
    groups = {server.pid}
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if any(m in line for m in marks):
            with contextlib.suppress(psutil.Error):
                groups.add(os.getpgid(p.pid))
    return groups


def _group_gone(pgid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


FOREIGN_APP = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"
[project]
name = "foreign"
version = "1.0.0"
license = "Apache-2.0"
dependencies = []
[tool.flwr.app]
publisher = "outsider"
[tool.flwr.app.components]
serverapp = "foreign:app"
clientapp = "foreign:client"
"""
FOREIGN_CODE = """from pathlib import Path
from flwr.serverapp import ServerApp
from flwr.clientapp import ClientApp
app, client = ServerApp(), ClientApp()
@app.main()
def main(grid, context):
    Path({marker!r}).write_text("the outsider's code ran on the coordinator")
"""


@pytest.fixture(scope="module")
def federation(tmp_path_factory, free_port) -> dict:  # noqa: PLR0915 (one story, told in order)
    tmp = tmp_path_factory.mktemp("dep")
    keys = tmp / "keys"
    write_credentials(keys, ["127.0.0.1"], list(NODES), 1, False)
    port, control = free_port(), free_port()
    lora = tmp / "lora"
    res: dict = {"tmp": tmp, "keys": keys, "lora": lora, "zo": tmp / "zo"}
    server_args = ["server", "--config", "simulations/tiny.toml", "--out", str(lora),
                   "--keys", str(keys), "--host", "0.0.0.0", "--port", str(port),
                   "--control-port", str(control), "--keep", *LORA,
                   "federation.connect_timeout_s=300"]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    groups: set[int] = set()
    link_pid = None
    try:
        server = _start(server_args, tmp / "server.log")
        procs.append(server)
        _wait_for(tmp / "server.log", "flwr run", server, WAIT_S)  # link up, keys registered
        # a node with a valid certificate whose key the coordinator never registers
        add_nodes(keys, ["unregistered"], days=1)
        (keys / "nodes" / "unregistered").rename(tmp / "unregistered-creds")
        clients = {**NODES, "unregistered": (0, [])}
        for name, (pid, extra) in clients.items():
            creds = keys / "nodes" / name if name in NODES else tmp / "unregistered-creds"
            procs.append(_start([
                "client", "--superlink", f"127.0.0.1:{port}", "--creds", str(creds),
                "--state-dir", str(tmp / name), "--runtime-port", str(free_port()),
                "--partition-id", str(pid), "--num-partitions", "2", "--device", "cpu", *extra,
            ], tmp / f"{name}.log"))  # fmt: skip
        res["nodes"] = dict(zip(clients, procs[1:], strict=True))
        # --- the whole coordinator dies (SIGKILL: no cleanup) after a checkpoint
        deadline = time.monotonic() + WAIT_S
        while _checkpointed(lora) < 1:
            assert server.poll() is None and time.monotonic() < deadline, (
                tmp / "server.log"
            ).read_text()[-3000:]
            time.sleep(0.1)
        for g in _coordinator_groups(server, control):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(g, signal.SIGKILL)
        server.wait(timeout=30)
        res["killed_after"] = _checkpointed(lora)
        res["rows_at_kill"] = (lora / "metrics.jsonl").read_text()
        # --- and is started again with --resume; the nodes are left as they are
        resumed = _start([*server_args, "--resume"], tmp / "resume.log")
        procs.append(resumed)
        res["lora_rc"] = resumed.wait(timeout=2 * WAIT_S)
        res["alive_after_resume"] = [n for n, p in res["nodes"].items() if p.poll() is None]
        log = (tmp / "resume.log").read_text()
        if "left running, pid " in log:
            link_pid = int(log.split("left running, pid ")[1].split(";")[0])
            groups.add(link_pid)
        # --- an outsider with only ca.crt, through the public port
        res["outsider"] = _outsider(tmp, keys, port)
        res["runs"] = _flwr(lora / "flwr", "ls", "fedpeft", "--format", "json").stdout
        # --- the operator submits an app nobody signed: every node must refuse it
        unsigned = tmp / "unsigned"
        (unsigned / "app").mkdir(parents=True)
        scenario = (lora / "config.toml").read_text()
        text = app_project(scenario, unsigned, "federation.connect_timeout_s=15")
        (unsigned / "app" / "pyproject.toml").write_text(text)
        res["unsigned"] = _flwr(lora / "flwr", "run", str(unsigned / "app"), "fedpeft",
                                "--stream", timeout=WAIT_S)  # fmt: skip
        # --- a run that cannot start (a third client nobody runs): the operator is told why
        failing = _start(["server", "--attach", "--config", "simulations/tiny.toml",
                          "--out", str(tmp / "failing"), "--keys", str(keys), "--port", str(port),
                          "--control-port", str(control), *LORA, "federation.num_clients=3",
                          "federation.min_clients=3", "federation.connect_timeout_s=5"],
                         tmp / "failing.log")  # fmt: skip
        procs.append(failing)
        res["failing_rc"] = failing.wait(timeout=WAIT_S)
        # --- a zeroth-order run on the same link
        attach = _start(["server", "--attach", "--config", "simulations/tiny_fedkseed.toml",
                         "--out", str(tmp / "zo"), "--keys", str(keys), "--port", str(port),
                         "--control-port", str(control), *ZO], tmp / "attach.log")  # fmt: skip
        procs.append(attach)
        res["zo_rc"] = attach.wait(timeout=WAIT_S)
        # --- per-node state on real nodes: SCAFFOLD's control variates in Context.state
        stateful = _start(["server", "--attach", "--config", "simulations/tiny.toml",
                           "--out", str(tmp / "scaffold"), "--keys", str(keys), "--port",
                           str(port), "--control-port", str(control), *SCAFFOLD],
                          tmp / "scaffold.log")  # fmt: skip
        procs.append(stateful)
        res["scaffold_rc"] = stateful.wait(timeout=WAIT_S)
        res["workers"] = {n: json.loads((tmp / n / "worker.json").read_text()) for n in clients}
        res["control_listeners"] = [
            c.laddr.ip for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == control
        ]  # fmt: skip
    finally:
        groups |= {p.pid for p in procs}
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        if link_pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(link_pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        res["left"] = [g for g in groups if not _group_gone(g)]
        for pgid in res["left"]:
            os.killpg(pgid, signal.SIGKILL)
    res["logs"] = {p.stem: p.read_text(errors="replace") for p in tmp.glob("*.log")}
    return res


def _outsider(tmp: Path, keys: Path, port: int) -> dict[str, subprocess.CompletedProcess[str]]:
    """What someone who can reach the public port and holds ``ca.crt`` tries."""
    home = tmp / "outsider"
    (home / "app").mkdir(parents=True)
    marker = tmp / "foreign-ran"
    (home / "app" / "pyproject.toml").write_text(FOREIGN_APP)
    (home / "app" / "foreign.py").write_text(FOREIGN_CODE.format(marker=str(marker)))
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "target"\n[superlink.target]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{keys / "ca.crt"}"\n'
    )
    own = tmp / "outsider-key"
    own.mkdir()
    write_credentials(own, ["127.0.0.1"], ["me"], 1, False)
    return {
        "register": _flwr(
            home, "supernode", "register", str(own / "nodes/me/node.key.pub"), "target"
        ),  # fmt: skip
        "ls": _flwr(home, "ls", "target"),
        "nodes": _flwr(home, "supernode", "list", "target"),
        "stop": _flwr(home, "stop", "1", "target"),
        "run": _flwr(home, "run", str(home / "app"), "target"),
    }


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
def test_a_killed_coordinator_resumes_to_the_simulations_adapter(federation, tmp_path, cache):
    assert federation["lora_rc"] == 0, federation["logs"]["resume"][-4000:]
    assert 1 <= federation["killed_after"] < 3
    simulate(
        load_config(REPO / "simulations" / "tiny.toml", LORA), tmp_path, quiet=True, cache=cache
    )
    _same_tensors(federation["lora"], tmp_path, ["adapter/adapter_model.safetensors"])


@pytest.mark.deploy
def test_nodes_come_back_by_themselves_after_the_coordinator_restarts(federation):
    assert sorted(federation["alive_after_resume"]) == sorted([*NODES, "unregistered"])
    logs = federation["logs"]
    assert any("the coordinator dropped this node's session" in logs[n] for n in ("node0", "node1"))
    for name in ("node0", "node1"):  # the same `fedpeft client` started its SuperNode again
        starts = [x for x in logs[name].splitlines() if x.startswith("+ ") and "supernode" in x]
        assert len(starts) >= 2, logs[name][-3000:]


@pytest.mark.deploy
def test_discovery_names_every_node_it_left_out_and_tells_it(federation):
    found = json.loads((federation["lora"] / "summary.json").read_text())["discovery"]
    assert found["joined"] == ["0", "1"] and found["missing"] == {}
    reasons = sorted(found["refused"].values())
    assert len(reasons) == 3, reasons
    assert any("DataError: partition 7 is outside 0..1" in r for r in reasons), reasons
    assert any("joined earlier with the same client id" in r for r in reasons), reasons
    assert any("client 0: base model" in r for r in reasons), reasons
    logs = federation["logs"]
    told = {n for n in ("node1", "dup", "fp16") if "left this node (partition-id" in logs[n]}
    # fp16 every time; of node1 and dup, whichever answered second (in either of the runs)
    assert "fp16" in told and told & {"node1", "dup"}, told
    assert "left this node (partition-id 7)" not in logs["wrongid"]  # it knows: its own error


@pytest.mark.deploy
def test_an_outsider_with_only_the_ca_certificate_gets_nowhere(federation):
    for what, proc in federation["outsider"].items():
        assert proc.returncode != 0, (what, proc.stdout, proc.stderr)
    assert not (federation["tmp"] / "foreign-ran").exists()
    runs = json.loads(federation["runs"])["runs"]
    # the operator's run finished, nothing was stopped or started by the outsider
    assert all(r["status"] == "finished:completed" for r in runs), runs
    assert federation["control_listeners"] == ["127.0.0.1"]  # the Control API: loopback only


@pytest.mark.deploy
def test_every_node_refuses_an_app_the_operator_did_not_sign(federation):
    assert not (federation["tmp"] / "unsigned" / "summary.json").exists()
    outcome = json.loads((federation["tmp"] / "unsigned" / "outcome.json").read_text())
    assert "0 of 2 expected clients joined" in outcome["error"], outcome
    for name in ("node0", "node1"):  # Flower's own check on each node refused it
        assert "The FAB could not be verified" in federation["logs"][name]


@pytest.mark.deploy
def test_the_operator_is_told_why_a_run_ended_without_results(federation):
    assert federation["failing_rc"] == 1
    last = federation["logs"]["failing"].strip().splitlines()[-1]
    assert last.startswith("fedpeft server: the run ended without results: RoundError: round 0 "
                           "failed: 2 of 3 expected clients joined"), last  # fmt: skip
    assert "missing: client 2: no node claimed it;" in last


@pytest.mark.deploy
def test_zeroth_order_run_on_the_same_link_equals_the_simulation(federation, tmp_path, cache):
    assert federation["zo_rc"] == 0, federation["logs"]["attach"][-4000:]
    cfg = load_config(REPO / "simulations" / "tiny_fedkseed.toml", ZO)
    simulate(cfg, tmp_path, quiet=True, cache=cache)
    _same_tensors(federation["zo"], tmp_path, ["zo_state.safetensors"])


@pytest.mark.deploy
def test_per_node_state_on_real_nodes_equals_the_simulation(federation, tmp_path, cache):
    """SCAFFOLD keeps each client's control variate in its node's Context.state, which the
    deployed SuperNode carries between the ClientApp processes of its messages: round 2 and
    the personalized evaluation (each node's own model) equal the in-process run's."""
    assert federation["scaffold_rc"] == 0, federation["logs"]["scaffold"][-4000:]
    cfg = load_config(REPO / "simulations" / "tiny.toml", SCAFFOLD)
    simulate(cfg, tmp_path, quiet=True, cache=cache)
    dep = federation["tmp"] / "scaffold"
    _same_tensors(dep, tmp_path, ["adapter/adapter_model.safetensors"])
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (dep, tmp_path)]  # fmt: skip
    for k in ("personal_eval_loss_mean", "personal_eval_loss_worst10", "scaffold_c_norm"):
        assert [r.get(k) for r in rows[0]] == [r.get(k) for r in rows[1]], k
    assert rows[0][-1]["scaffold_c_norm"] > 0


@pytest.mark.deploy
def test_each_node_loads_the_base_model_once_per_stretch_of_runs(federation):
    """Once for the LoRA runs and the zeroth-order run after them; once more for the SCAFFOLD
    run on a node that trained in the full-model zeroth-order run (which tuned the loaded
    weights in place): node0 holds partition 0 in every run; node1 and dup share the rest."""
    workers, logs = federation["workers"], federation["logs"]
    assert workers["node0"]["model_loads"] == 2, workers
    for name in ("node0", "node1", "dup"):
        again = logs[name].count("loading the base model again")
        assert workers[name]["model_loads"] == 1 + again, (name, workers)
        assert workers[name]["requests"] >= 4, workers
    assert workers["unregistered"]["requests"] == 0


@pytest.mark.deploy
def test_an_unregistered_node_is_refused_and_keeps_trying(federation):
    log = federation["logs"]["unregistered"]
    assert "the coordinator refused to activate this node" in log, log[-3000:]
    assert log.count("starting it again") >= 2


@pytest.mark.deploy
def test_every_process_is_shut_down(federation):
    assert federation["left"] == [], "process groups still alive after shutdown"
