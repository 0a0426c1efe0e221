"""Crash-safe coordinator: exact checkpoints; a SIGKILLed run resumes bit-identically."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fedpeft.algorithms.base import AggregateResult, ZoGlobal
from fedpeft.algorithms.fedavg import FedAvg
from fedpeft.algorithms.registry import register_strategy
from fedpeft.errors import RoundError
from fedpeft.server.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    load_checkpoint,
    result_from_state,
    result_state,
    save_checkpoint,
)
from fedpeft.simulation.runner import simulate
from fedpeft.wire.messages import LoraFactors, LoraSpec
from fedpeft.wire.zo import ZoSpec

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"wall_s", "eval_s", "train_s_max", "sim_client_s", "step_s_max", "forward_s_max"}


def test_checkpoint_round_trips_every_kind_of_value(tmp_path):
    state = {
        "tensor": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "empty": torch.zeros(0, 4),
        "array": np.array([1, 2, 3], np.uint16),
        "f64": np.linspace(0, 1, 7),
        "floats": [0.1, float("nan"), float("inf"), -0.0, 1e-310],
        "ints": {1: "one", (2, "x"): [None, True, False]},
        "tuple": (1, (2.5, "s")),
        "tuple_t": (torch.ones(2), "x"),
        "np_scalar": np.int64(7),
        "blob": b"\x00\xffmask",
        "nested": {"a": {"b": [torch.ones(1)]}},
    }
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, state)
    back = load_checkpoint(path)
    assert back["tensor"].dtype == torch.bfloat16 and torch.equal(back["tensor"], state["tensor"])
    assert back["empty"].shape == (0, 4)
    assert back["array"].dtype == np.uint16 and back["array"].tolist() == [1, 2, 3]
    assert np.array_equal(back["f64"], state["f64"])
    f = back["floats"]
    assert f[0] == 0.1 and math.isnan(f[1]) and f[2] == math.inf and f[4] == 1e-310
    assert math.copysign(1, f[3]) == -1
    assert back["ints"] == {1: "one", (2, "x"): [None, True, False]}
    assert back["tuple"] == (1, (2.5, "s")) and back["np_scalar"] == 7
    assert torch.equal(back["tuple_t"][0], torch.ones(2)) and back["tuple_t"][1] == "x"
    assert back["blob"] == b"\x00\xffmask"
    assert torch.equal(back["nested"]["a"]["b"][0], torch.ones(1))
    assert not path.with_name(CHECKPOINT + ".tmp").exists()


@pytest.mark.parametrize("kind", ["lora", "zo-full", "zo-lora"])
def test_a_global_model_survives_the_checkpoint_file_exactly(kind, tmp_path):
    """result_state -> safetensors file -> result_from_state gives the same global model."""
    spec = LoraSpec(rank=2, alpha=3.0, target_modules=("q_proj",), dropout=0.1)
    if kind == "lora":
        g = torch.Generator().manual_seed(0)
        adapter = {"m.q_proj": LoraFactors(torch.randn(2, 5, generator=g),
                                           torch.randn(4, 2, generator=g), 3.0)}  # fmt: skip
        result = AggregateResult(adapter=adapter, spec=spec, metrics={"x": 1.5})
    else:
        zspec = ZoSpec(algorithm="ferret", target=kind[3:], num_seeds=8, pool_seed=3,
                       lora=spec if kind == "zo-lora" else None)  # fmt: skip
        coeffs = np.arange(16, dtype=np.float32).reshape(2, 8) / 7
        result = AggregateResult(zo=ZoGlobal(zspec, 4, coeffs), metrics={"y": 2.0})
    save_checkpoint(tmp_path / CHECKPOINT, {"current": result_state(result)})
    back = result_from_state(load_checkpoint(tmp_path / CHECKPOINT)["current"])
    assert back.metrics == result.metrics
    if kind == "lora":
        assert back.spec == spec and back.zo is None
        f, h = back.adapter["m.q_proj"], result.adapter["m.q_proj"]
        assert torch.equal(f.a, h.a) and torch.equal(f.b, h.b) and f.alpha == 3.0
    else:
        assert back.adapter is None and back.zo.spec == result.zo.spec and back.zo.version == 4
        assert np.array_equal(back.zo.coeffs, coeffs) and back.zo.coeffs.dtype == np.float32


def test_checkpoint_refuses_what_it_cannot_restore_and_reports_bad_files(tmp_path):
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path / CHECKPOINT, {"x": 1j})
    assert str(err.value) == (
        "cannot checkpoint a complex (1j); state_dict() must hold only tensors, numpy arrays, "
        "numbers, strings, bytes, None, lists, tuples, dicts"
    )
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(missing)
    assert str(err.value) == (
        f"no checkpoint at {str(missing)!r}: the run never completed round 0 there, or the "
        "folder is not a fedpeft run folder"
    )
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(bad)


def _handmade(path: Path, tree: object, tensors: dict | None = None, key: str = "fedpeft") -> Path:
    from safetensors.torch import save

    meta = {key: json.dumps(tree)} if tree is not None else {}
    path.write_bytes(save(tensors or {"t0": torch.zeros(1)}, metadata=meta))
    return path


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"format": 2, "state": {}}, "is not in format 1, the one this fedpeft reads"),
        ([1, 2], "is not in format 1"),
        ({"format": 1, "state": {"float": "1.0", "bytes": "AA=="}}, "malformed checkpoint entry"),
        ({"format": 1, "state": {"zzz": 1}}, "unknown checkpoint entry kind 'zzz'"),
        ({"format": 1, "state": [1, 2]}, "holds no state"),
        ({"format": 1, "state": {"tensor": "t9"}}, "is unreadable: 't9'"),
        ({"format": 1, "state": {"bytes": "not base64!"}}, "is unreadable"),
        ({"format": 1, "state": {"bytes": "A!P8="}}, "is unreadable"),  # strict base64 only
        (None, "is unreadable: 'fedpeft'"),
    ],
)
def test_a_damaged_checkpoint_is_refused_with_the_reason(tmp_path, tree, message):
    path = _handmade(tmp_path / CHECKPOINT, tree)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_a_handmade_checkpoint_decodes_to_known_values(tmp_path):
    tree = {"format": 1, "state": {"dict": [
        ["f", {"float": "0.5"}], ["b", {"bytes": "AP8="}], [["k", 1], {"tuple": [1, "x"]}],
        ["t", {"tensor": "t0"}], ["n", {"ndarray": "t0"}], ["l", [None, True]],
    ]}}  # fmt: skip
    got = load_checkpoint(_handmade(tmp_path / CHECKPOINT, tree, {"t0": torch.tensor([1.5, 2.0])}))
    assert got["f"] == 0.5 and got["b"] == b"\x00\xff" and got[("k", 1)] == (1, "x")
    assert torch.equal(got["t"], torch.tensor([1.5, 2.0])) and got["l"] == [None, True]
    assert isinstance(got["n"], np.ndarray) and got["n"].tolist() == [1.5, 2.0]
    save_checkpoint(tmp_path / "again.safetensors", {"g": np.float64(0.1), "i": np.int32(3)})
    back = load_checkpoint(tmp_path / "again.safetensors")
    assert type(back["g"]) is float and back["g"] == 0.1 and type(back["i"]) is int


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, {"round": 1})

    def crash(*args, **kwargs):
        raise OSError("disk pulled out")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk pulled out"):
        save_checkpoint(path, {"round": 2})
    assert load_checkpoint(path) == {"round": 1}
    monkeypatch.undo()
    monkeypatch.setattr(Path, "open", crash)  # the temporary file cannot even be created
    with pytest.raises(OSError, match="^disk pulled out$"):
        save_checkpoint(path, {"round": 3})
    monkeypatch.undo()
    assert load_checkpoint(path) == {"round": 1}


WAIT_S = 1800  # bounded, and generous: a busy 2-core machine may be 5x slower


@contextlib.contextmanager
def _cli(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``fedpeft simulate`` in its own process group, killed with its children on the way out
    (a timed-out or failed test leaves nothing running)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a full pipe would block it
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedpeft.cli", "simulate", "--quiet", *args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc.log = log  # type: ignore[attr-defined]
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _output(proc: subprocess.Popen[bytes]) -> str:
    proc.log.seek(0)  # type: ignore[attr-defined]
    return proc.log.read().decode(errors="replace")[-3000:]  # type: ignore[attr-defined]


def _rows(run: Path) -> list[dict[str, object]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118


def _checkpointed_round(run: Path) -> int:
    try:
        return int(load_checkpoint(run / CHECKPOINT)["round"])
    except CheckpointError:
        return -1


@pytest.mark.parametrize(
    "extra",
    [(), ("strategy.name=fedsa", "eval.personalized=true"),
     ("strategy.name=scaffold", "server_opt.name=adam", "server_opt.lr=0.01",
      "train.lr_schedule=cosine"),
     ("model.quantization=nf4", "model.double_quant=true", "train.gradient_checkpointing=true")],
    ids=["fedavg", "fedsa", "scaffold-fedadam-cosine", "nf4-checkpointing"],
)  # fmt: skip
def test_sigkill_mid_run_then_resume_gives_the_bit_identical_adapter(extra, tmp_path):
    """Per-node state (SCAFFOLD's variates, FedSA-LoRA's personal B) is checkpointed with the
    coordinator for the simulated nodes, and a server optimizer's moments with the strategy,
    so they resume exactly too (the schedule depends on the round alone)."""
    scenario = ("--config", "simulations/tiny.toml", "rounds=5", "eval.examples=8", *extra)
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    with _cli(*scenario, "--out", str(clean)) as ref:
        assert ref.wait(timeout=WAIT_S) == 0, _output(ref)
    with _cli(*scenario, "--out", str(crashed)) as victim:
        deadline = time.monotonic() + WAIT_S
        while _checkpointed_round(crashed) < 2 and victim.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)  # no chance to clean up: as if the machine died
        assert victim.wait(timeout=60) == -signal.SIGKILL
    done = _checkpointed_round(crashed)
    assert 2 <= done < 5 and not (crashed / "summary.json").exists()
    with _cli("--resume", str(crashed)) as resumed:
        assert resumed.wait(timeout=WAIT_S) == 0, _output(resumed)
    a = _tensors(clean / "adapter" / "adapter_model.safetensors")
    b = _tensors(crashed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(clean) == _rows(crashed)  # every round's losses, clients and bytes
    assert json.loads((crashed / "summary.json").read_text())["rounds"] == 5


def test_resume_needs_the_same_scenario(tiny_config, tmp_path, cache):
    cfg = tiny_config("federation.rounds=1")
    simulate(cfg, tmp_path, quiet=True, cache=cache)
    other = tiny_config("federation.rounds=2")
    with pytest.raises(CheckpointError, match="resume with the run folder's own config.toml"):
        simulate(other, tmp_path, quiet=True, cache=cache, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        simulate(cfg, tmp_path / "empty", quiet=True, cache=cache, resume=True)


def test_resume_after_a_failed_round_retries_it(tiny_config, tmp_path, cache, outage):
    """A round that fails (too few updates) leaves the last good checkpoint; resume redoes it."""
    cfg = tiny_config("federation.rounds=2")
    clean = simulate(cfg, tmp_path / "clean", quiet=True, cache=cache)
    outage(2)
    with pytest.raises(RoundError, match="round 2 failed"):
        simulate(cfg, tmp_path / "run", quiet=True, cache=cache)
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["round"] == 1
    outage(None)
    again = simulate(cfg, tmp_path / "run", quiet=True, cache=cache, resume=True)
    assert again["after"] == clean["after"]
    assert _rows(tmp_path / "run") == _rows(tmp_path / "clean")


def test_round_retries_rerun_a_failed_round_with_the_strategy_state_restored(
    tiny_config, tmp_path, cache, monkeypatch
):
    from fedpeft.server import coordinator

    cfg = tiny_config("federation.rounds=2", "validation.round_retries=1")
    clean = simulate(cfg, tmp_path / "clean", quiet=True, cache=cache)
    real, calls = coordinator.exchange, []

    def flaky(grid, instructions, nodes, server_round, *args, **kwargs):
        got = real(grid, instructions, nodes, server_round, *args, **kwargs)
        calls.append(server_round)
        if calls.count(server_round) == 1 and server_round == 2:
            got.updates = []  # everyone timed out the first time
        return got

    monkeypatch.setattr(coordinator, "exchange", flaky)
    again = simulate(cfg, tmp_path / "run", quiet=True, cache=cache)
    assert calls == [1, 2, 2]
    assert again["after"] == clean["after"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("attempts") for r in rows] == [None, 1, 2]


class _CountingFedAvg:
    """FedAvg whose state counts its configure_train calls (a stateful plan step, like a
    bandit's or a sampler's), so a retry that kept a failed attempt's state shows up."""

    Config = FedAvg.Config
    capabilities = FedAvg.capabilities

    def __init__(self, config, ctx) -> None:
        self.inner, self.configured = FedAvg(config, ctx), 0

    def configure_train(self, server_round, clients):
        self.configured += 1
        return self.inner.configure_train(server_round, clients)

    def aggregate_train(self, server_round, updates):
        return self.inner.aggregate_train(server_round, updates)

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "configured": self.configured}

    def load_state_dict(self, state):
        self.inner.load_state_dict(state["inner"])
        self.configured = int(state["configured"])


def test_a_retried_round_starts_from_the_state_before_the_failed_attempt(
    tiny_config, tmp_path, cache, monkeypatch
):
    from fedpeft.server import coordinator

    register_strategy("test-counting", _CountingFedAvg)
    cfg = tiny_config(
        "strategy.name=test-counting", "federation.rounds=2", "validation.round_retries=2"
    )
    real, calls = coordinator.exchange, []

    def flaky(grid, instructions, nodes, server_round, *args, **kwargs):
        got = real(grid, instructions, nodes, server_round, *args, **kwargs)
        calls.append(server_round)
        if server_round == 2 and calls.count(2) < 3:
            got.updates = []  # two failed attempts, the third succeeds
        return got

    monkeypatch.setattr(coordinator, "exchange", flaky)
    simulate(cfg, tmp_path, quiet=True, cache=cache)
    assert calls == [1, 2, 2, 2]
    # one configure_train per round that counted: the failed attempts were undone
    assert load_checkpoint(tmp_path / CHECKPOINT)["strategy"]["configured"] == 2


def test_zeroth_order_resume_with_fresh_clients_does_a_full_sync(tmp_path, monkeypatch):
    """Seed/scalar runs resume too; restarted clients rebuild from theta_0 with a full sync.

    Exact on the coordinator's side; on the clients the rebuilt weights sum the directions in
    another order than the uninterrupted run did, so results agree to float32 rounding.
    """
    from fedpeft.cache import ProcessCache
    from fedpeft.config.load import load_config
    from fedpeft.server import coordinator

    cfg = load_config(ROOT / "simulations" / "tiny_fedkseed.toml", ["federation.rounds=3"])
    clean = simulate(cfg, tmp_path / "clean", quiet=True, cache=ProcessCache())
    real = coordinator.exchange

    def outage_in_round_3(grid, instructions, nodes, server_round, *args, **kwargs):
        got = real(grid, instructions, nodes, server_round, *args, **kwargs)
        if server_round == 3:
            got.updates = []
        return got

    monkeypatch.setattr(coordinator, "exchange", outage_in_round_3)
    with pytest.raises(RoundError, match="round 3 failed"):
        simulate(cfg, tmp_path / "run", quiet=True, cache=ProcessCache())
    monkeypatch.setattr(coordinator, "exchange", real)
    again = simulate(cfg, tmp_path / "run", quiet=True, cache=ProcessCache(), resume=True)
    assert again["after"]["eval_loss"] == pytest.approx(clean["after"]["eval_loss"], rel=1e-5)
    a = _tensors(tmp_path / "clean" / "zo_state.safetensors")["coeffs"]
    b = _tensors(tmp_path / "run" / "zo_state.safetensors")["coeffs"]
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-6) and bool(b.abs().sum() > 0)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(not r.get("failures") for r in rows)
