"""End to end: the CLI on the shipped tiny scenario, determinism, adapter reload, backends."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from fedpeft.client.app import make_client_app
from fedpeft.config import ModelConfig
from fedpeft.errors import RoundError
from fedpeft.models import load_model
from fedpeft.server.app import Outcome, make_server_app
from fedpeft.server.results import TIME_KEYS, RunReporter
from fedpeft.simulation.inprocess import InProcessGrid
from fedpeft.simulation.runner import simulate

REQUIRED = {"round", "train_loss", "eval_loss", "bytes_up", "bytes_down", "wall_s", "clients"}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedpeft.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=1800,  # bounded, and generous: a busy 2-core machine may be 5x slower
    )


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, repo):
    """The shipped tiny scenario run twice through the real CLI, in separate processes."""
    outs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"tiny{i}")
        proc = _cli(
            "simulate", "--config", "simulations/tiny.toml", "--out", str(out), "--quiet", cwd=repo
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(out)
    return outs


def test_tiny_cli_writes_metrics_adapter_and_config(tiny_runs):
    out = tiny_runs[0]
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        assert set(r) >= REQUIRED
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["clients"] == 4
        assert r["bytes_up"] >= r["payload_up"] > 0
    assert (out / "config.toml").read_text().count("[federation]") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["bytes_up_per_client_round"] > 0


def test_tiny_loss_goes_down(tiny_runs):
    rows = _rows(tiny_runs[0])
    evals = [r["eval_loss"] for r in rows]
    trains = [r["train_loss"] for r in rows[1:]]
    assert evals[-1] < evals[0] - 0.05, evals
    assert trains[-1] < trains[0], trains


def test_same_config_same_metrics(tiny_runs):
    assert _without_times(_rows(tiny_runs[0])) == _without_times(_rows(tiny_runs[1]))
    a = (tiny_runs[0] / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (tiny_runs[1] / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b


def test_adapter_reloads_with_peft_and_changes_the_model(tiny_runs):
    from peft import PeftModel

    base = load_model(ModelConfig(name="tiny")).base_model
    ids = torch.tensor([[70, 71, 72, 73]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, str(tiny_runs[0] / "adapter"))
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, after)


def test_bad_override_names_valid_keys(repo, tmp_path):
    proc = _cli(
        "simulate",
        "--config",
        "simulations/tiny.toml",
        "--out",
        str(tmp_path),
        "no_such_key=1",
        cwd=repo,
    )
    assert proc.returncode == 2
    assert "unknown key 'no_such_key'" in proc.stderr
    assert "federation" in proc.stderr and "lora" in proc.stderr


def test_all_config_errors_reported_at_once(repo, tmp_path):
    proc = _cli(
        "simulate", "--config", "simulations/tiny.toml", "--out", str(tmp_path),
        "lora.rank=0", "train.lr=-1", "federation.partition=random", cwd=repo,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "3 problems" in proc.stderr and "lora.rank" in proc.stderr and "train.lr" in proc.stderr


def test_base_model_loaded_once_for_all_clients(tiny_config, tmp_path, cache):
    cfg = tiny_config("federation.num_clients=5", "federation.rounds=2")
    simulate(cfg, tmp_path, quiet=True, cache=cache)
    assert cache.count("model:") == 1
    assert cache.count("client-data:") == 5


class _LateNodes(InProcessGrid):
    """Nodes that connect one by one, as Ray's virtual nodes and real SuperNodes do."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.asked = 0

    def get_node_ids(self):
        self.asked += 1
        return list(super().get_node_ids())[: max(0, self.asked - 3)]


def _run_on(grid, cfg, out, cache):
    outcome = Outcome()
    app = make_server_app(
        cfg, out, RunReporter(out, cfg.federation.rounds, quiet=True), outcome, cache
    )
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    app(grid, ctx)
    return outcome


def test_coordinator_waits_for_every_node_to_connect(tiny_config, tmp_path, cache):
    cfg = tiny_config("federation.rounds=1")
    (tmp_path / "a").mkdir()
    simulate(cfg, tmp_path / "a", quiet=True, cache=cache)
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    grid = _LateNodes(make_client_app(cfg, cache), nodes)
    outcome = _run_on(grid, cfg, tmp_path / "b", cache)
    assert outcome.error is None and grid.asked >= 6
    rows = _rows(tmp_path / "b")
    assert rows[-1]["clients"] == 3
    assert _without_times(rows) == _without_times(_rows(tmp_path / "a"))


def test_too_few_nodes_connected_is_a_clean_error(tiny_config, tmp_path, cache):
    cfg = tiny_config("federation.connect_timeout_s=0.5", "federation.min_clients=2")
    grid = InProcessGrid(make_client_app(cfg, cache), [{"partition-id": 0, "num-partitions": 3}])
    with pytest.raises(
        RoundError,
        match="1 of 3 expected clients joined within .*connect_timeout_s = 0.5 s"
        ".*missing: clients 1, 2: no node claimed it; refused: none",
    ):
        _run_on(grid, cfg, tmp_path, cache)


def test_plugin_strategy_runs_end_to_end(tiny_config, tmp_path, cache, repo):
    cfg = tiny_config(f"strategy.name={repo / 'strategies' / 'median.py'}:CoordinateMedian")
    summary = simulate(cfg, tmp_path, quiet=True, cache=cache)
    assert summary["strategy"].endswith("median.py:CoordinateMedian")
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]


def test_centralized_reference_runs_the_same_step_budget(tiny_config, tmp_path, cache):
    cfg = tiny_config(
        "federation.centralized=true", "federation.num_clients=3", "federation.min_clients=1"
    )
    simulate(cfg, tmp_path, quiet=True, cache=cache)
    rows = _rows(tmp_path)
    assert all(r["clients"] == 1 for r in rows[1:])
    assert rows[1]["num_examples"] == 3 * cfg.data.max_examples_per_client  # union of 3 clients
    assert rows[1]["local_steps_max"] == cfg.train.local_steps * 3


def test_federated_evaluation_on_each_clients_held_out_share(tiny_config, tmp_path, cache):
    cfg = tiny_config("eval.federated=true", "federation.num_clients=3")
    simulate(cfg, tmp_path, quiet=True, cache=cache)
    rows = _rows(tmp_path)
    for r in rows:
        assert r["fed_eval_clients"] == 3 and r["fed_eval_failures"] == {}
        assert r["fed_eval_bytes_up"] > 0 and r["fed_eval_loss"] > 0
    assert "fed_eval_rougeL" in rows[0] and "fed_eval_rougeL" in rows[-1]
    assert rows[-1]["fed_eval_loss"] < rows[0]["fed_eval_loss"]
    assert cache.count("client-eval:") == 3


@pytest.mark.ray
@pytest.mark.parametrize("strategy", ["scaffold", "fedsa"])
def test_ray_backend_matches_the_in_process_run(strategy, tiny_config, tmp_path, cache):
    """Flower's Ray engine runs the same apps; seeded clients give the same adapter, and the
    per-node state (SCAFFOLD's control variate, FedSA-LoRA's personal B, each in the node's
    Context.state) gives the same round 2 and the same personalized evaluation."""
    cfg = tiny_config(
        "simulation.ray_num_cpus=1", f"strategy.name={strategy}", "eval.personalized=true"
    )
    simulate(cfg, tmp_path / "inprocess", quiet=True, cache=cache)
    summary = simulate(cfg, tmp_path / "ray", backend="ray", quiet=True)
    ip, ray = _rows(tmp_path / "inprocess"), _rows(tmp_path / "ray")
    assert [r["round"] for r in ray] == [0, 1, 2]
    assert all(r["clients"] == 3 and r["bytes_up"] > 0 for r in ray[1:])
    own = "personal_eval_loss_mean"
    assert summary["after"][own] < summary["before"][own]
    # Ray's 64-bit random node ids make message metadata a few bytes longer: compare the rest.
    drop = {"bytes_up", "bytes_down", "bytes_up_per_client", "bytes_down_per_client",
            "personal_eval_bytes_up", "personal_eval_bytes_down"}  # fmt: skip
    strip = [{k: v for k, v in r.items() if k not in drop} for r in _without_times(ip)]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in _without_times(ray)]
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "inprocess" / adapter).read_bytes() == (
        tmp_path / "ray" / adapter
    ).read_bytes()


@pytest.fixture
def ray_cluster(tmp_path, free_port):
    """An existing Ray cluster (``ray start --head --block``) declaring 2 CPUs and 1 GPU.

    The port is chosen before Ray binds it; if something took it meanwhile, Ray exits and is
    started again on another port (three tries). Workers bind random ports, so the head port
    never falls in Ray's own worker range."""
    ray = Path(sys.executable).parent / "ray"
    log = open(tmp_path / "ray.log", "wb")  # noqa: SIM115 (closed below)
    proc = None
    try:
        for _attempt in range(3):
            port = free_port()
            log.truncate(0)
            proc = subprocess.Popen(
                [str(ray), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                 "--num-gpus", "1", "--include-dashboard", "false", "--disable-usage-stats",
                 # Workers on random ports: Ray's default worker range (10002-19999) overlaps
                 # the range free_port draws from, and Ray refuses a head port inside it.
                 "--min-worker-port", "0", "--max-worker-port", "0",
                 "--temp-dir", tempfile.mkdtemp(prefix="ray", dir="/tmp")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            deadline = time.monotonic() + 300  # bounded, and generous under load
            while b"Ray runtime started" not in (tmp_path / "ray.log").read_bytes():
                if proc.poll() is not None:
                    break
                assert time.monotonic() < deadline, (tmp_path / "ray.log").read_text()[-2000:]
                time.sleep(0.2)
            if proc.poll() is None:
                break
            text = (tmp_path / "ray.log").read_text()
            assert "already in use" in text or "port" in text.lower(), text[-2000:]
        assert proc is not None and proc.poll() is None, (tmp_path / "ray.log").read_text()
        yield f"127.0.0.1:{port}", proc
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@pytest.mark.ray
def test_ray_backend_joins_an_existing_cluster_with_fractional_gpus(
    tiny_config, tmp_path, cache, ray_cluster
):
    """Two virtual clients share the cluster's one (declared) GPU at 0.5 each."""
    address, proc = ray_cluster
    cfg = tiny_config(
        f"simulation.ray_address={address!r}", "simulation.ray_num_gpus=0.5", "model.device=cpu"
    )
    simulate(cfg, tmp_path / "inprocess", quiet=True, cache=cache)
    simulate(cfg, tmp_path / "cluster", backend="ray", quiet=True)
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "inprocess" / adapter).read_bytes() == (
        tmp_path / "cluster" / adapter
    ).read_bytes()
    assert proc.poll() is None  # the run left the user's cluster running
