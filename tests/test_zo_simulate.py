"""Seed/scalar training end to end: the CLI, the byte formula, bad uploads, saved state."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from safetensors import safe_open

from fedpeft.cache import ProcessCache
from fedpeft.client.app import make_client_app
from fedpeft.config.load import load_config
from fedpeft.server.app import run_server
from fedpeft.server.results import RunReporter
from fedpeft.simulation.inprocess import InProcessGrid
from fedpeft.simulation.runner import simulate
from fedpeft.wire.zo import ZO_DATA

REQUIRED = {"round", "train_loss", "eval_loss", "bytes_up", "bytes_down", "wall_s", "clients"}
REPO = Path(__file__).resolve().parents[1]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _cfg(name: str, *overrides: str):
    base = (
        "federation.num_clients=3",
        "federation.rounds=2",
        "data.max_examples_per_client=40",
        "eval.examples=16",
    )
    return load_config(REPO / "simulations" / name, [*base, *overrides])


def test_tiny_fedkseed_cli_writes_lora_compatible_metrics(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedpeft.cli", "simulate", "--config",
         "simulations/tiny_fedkseed.toml", "--out", str(out), "--quiet", "rounds=2",
         "zo.local_steps=20"],
        cwd=REPO, capture_output=True, text=True, timeout=1800,  # bounded, and generous
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert set(r) >= REQUIRED and r["clients"] == 4
        assert r["payload_up"] == 4 * 20 * (2 + 4)  # tau x (uint16 index + float32 scalar)
        assert r["regens_per_step_max"] == 3
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert (out / "zo_state.safetensors").is_file()


def test_bytes_up_per_client_round_follow_the_formula(tmp_path, cache):
    per_client = {}
    for tau in (10, 30):
        cfg = _cfg("tiny_fedkseed.toml", f"zo.local_steps={tau}", "federation.rounds=1")
        simulate(cfg, tmp_path / str(tau), quiet=True, cache=cache)
        row = _rows(tmp_path / str(tau))[1]
        assert row["payload_up"] / row["clients"] == tau * 6
        per_client[tau] = row["bytes_up_per_client"]
    # framed = payload + a fixed message overhead, up to the few bytes of protobuf's
    # variable-length length prefixes (a 60-byte field needs 1, a 180-byte one 2)
    overhead = {tau: per_client[tau] - tau * 6 for tau in per_client}
    assert abs(overhead[30] - overhead[10]) <= 4
    print(f"framing overhead per upload: {overhead}")


def test_float16_scalars_halve_the_scalar_bytes(tmp_path, cache):
    cfg = _cfg(
        "tiny_fedkseed.toml", "zo.local_steps=10", "federation.rounds=1", "zo.scalar_dtype=float16"
    )
    simulate(cfg, tmp_path, quiet=True, cache=cache)
    row = _rows(tmp_path)[1]
    assert row["payload_up"] / row["clients"] == 10 * (2 + 2)


def _corrupting(wrap, real: ClientApp, corrupt) -> ClientApp:
    def train(msg: Message, ctx: Context) -> Message:
        reply = real(msg, ctx)
        if ctx.node_config["partition-id"] == 1:
            corrupt(reply.content[ZO_DATA])
        return reply

    return wrap(real, {"train.zo": train})


def _bad_seed(rec) -> None:
    seeds = np.frombuffer(rec["seeds"], "<u2").copy()
    seeds[0] = 4000  # the pool has 1024 seeds
    rec["seeds"] = seeds.tobytes()


def _nan_scalar(rec) -> None:
    vals = np.frombuffer(rec["scalars"], "<f4").copy()
    vals[3] = np.nan
    rec["scalars"] = vals.tobytes()


def _short(rec) -> None:
    rec["scalars"] = rec["scalars"][:-4]


def _huge_scalar(rec) -> None:
    vals = np.frombuffer(rec["scalars"], "<f4").copy()
    vals[0] = 1e9  # a malicious scalar
    rec["scalars"] = vals.tobytes()


def _extra_pairs(rec) -> None:
    rec["seeds"] = rec["seeds"] + rec["seeds"][:2]
    rec["scalars"] = rec["scalars"] + rec["scalars"][:4]


@pytest.mark.parametrize(
    ("corrupt", "code", "reason"),
    [
        (_bad_seed, "seed_range", "seed index 4000 is outside the pool 0..1023"),
        (_nan_scalar, "nonfinite", "NaN or infinite"),
        (_short, "decode", "9 scalars"),
        (_huge_scalar, "norm", "above validation.max_scalar"),
        (_extra_pairs, "structure", "11 pairs .* expected 10 pairs"),
    ],
)
def test_bad_zo_upload_rejected_alone(tmp_path, cache, wrap_app, corrupt, code, reason):
    cfg = _cfg(
        "tiny_fedkseed.toml", "zo.local_steps=10", "federation.rounds=1", "federation.min_clients=2"
    )
    app = _corrupting(wrap_app, make_client_app(cfg, cache), corrupt)
    grid = InProcessGrid(app, [{"partition-id": i} for i in range(3)])
    run_server(grid, cfg, tmp_path, RunReporter(tmp_path, 1, quiet=True), cache)
    row = _rows(tmp_path)[1]
    assert row["clients"] == 2 and list(row["failures"]) == ["1"]
    assert row["rejected"] == {code: 1}
    assert re.search(reason, row["failures"]["1"]), row["failures"]


@pytest.mark.parametrize("target", ["full", "lora"])
def test_tiny_ferret_learns(tmp_path, cache, target):
    cfg = _cfg("tiny_ferret.toml", f"zo.target={target}", "lora.rank=4")
    summary = simulate(cfg, tmp_path, quiet=True, cache=cache)
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"] - 0.05
    if target == "lora":
        assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_fedkseed_lora_target_and_determinism(tmp_path, cache):
    cfg = _cfg(
        "tiny_fedkseed.toml", "zo.target=lora", "zo.lr=0.05", "zo.eps=0.01", "zo.local_steps=10"
    )
    simulate(cfg, tmp_path / "a", quiet=True, cache=cache)
    simulate(cfg, tmp_path / "b", quiet=True, cache=cache)  # same process: runtime state reused
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    keys = ("round", "train_loss", "eval_loss", "payload_up", "payload_down")
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]
    assert (tmp_path / "a" / "adapter").is_dir()


def test_federated_eval_is_refused_for_zo():
    from fedpeft.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.federated is for LoRA strategies"):
        _cfg("tiny_fedkseed.toml", "eval.federated=true")


@pytest.mark.ray
def test_fedkseed_on_ray_uses_full_syncs(tmp_path):
    cfg = _cfg("tiny_fedkseed.toml", "zo.local_steps=10", "simulation.backend=ray")
    simulate(cfg, tmp_path, quiet=True)
    rows = _rows(tmp_path)
    assert all(r["clients"] == 3 for r in rows[1:])
    # full syncs every round (a virtual client may land on another worker): every non-zero
    # coefficient, as (uint16 seed, float32 value) pairs, to every client
    assert rows[2]["payload_down"] == 3 * int(rows[1]["zo_changed_seeds"]) * 6


def test_full_sync_gives_the_incremental_runs_model_and_costs_every_coefficient(tmp_path):
    """zo.sync = full sends every nonzero coefficient as (uint16 seed, float32 value) to every
    client each round; the model is the incremental run's (to float32 rounding: a rebuild
    sums the directions in another order)."""
    base = ("zo.local_steps=10", "federation.rounds=3")
    for name, extra in (("incremental", ()), ("full", ("zo.sync=full",))):
        simulate(_cfg("tiny_fedkseed.toml", *base, *extra), tmp_path / name, quiet=True,
                 cache=ProcessCache())  # fmt: skip
    inc, full = _rows(tmp_path / "incremental"), _rows(tmp_path / "full")
    for a, b in zip(inc[1:], full[1:], strict=True):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)
        assert a["zo_changed_seeds"] == b["zo_changed_seeds"]
    changed = [int(r["zo_changed_seeds"]) for r in full[1:]]
    # round 2: everything the clients lack changed in round 1, so both send the same
    assert inc[2]["payload_down"] == full[2]["payload_down"] == 3 * changed[0] * 6
    # round 3: incremental sends round 2's changes, full every nonzero coefficient, which
    # are the union of rounds 1 and 2's changes
    assert inc[3]["payload_down"] == 3 * changed[1] * 6
    nonzero = full[3]["payload_down"] / 18
    assert nonzero == int(nonzero) and max(changed[:2]) <= nonzero <= sum(changed[:2])
    assert inc[3]["payload_down"] < full[3]["payload_down"]


def test_gaussian_directions_and_master_copies_train_end_to_end(tmp_path, cache):
    cfg = _cfg("tiny_fedkseed.toml", "zo.dist=gaussian", "zo.master=always", "zo.lr=1e-3",
               "zo.local_steps=20")  # fmt: skip
    summary = simulate(cfg, tmp_path, quiet=True, cache=cache)
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    with safe_open(str(tmp_path / "zo_state.safetensors"), "pt") as fh:
        spec = json.loads(fh.metadata()["spec"])
    assert spec["dist"] == "gaussian" and spec["master"] == "always"


def test_ferret_uploads_the_configured_number_of_directions(tmp_path, cache):
    """Ferret with zo.directions = 64 (default: 256): about 64 (uint16 block, uint16 seed,
    float32 value) triples per client; allocation gives every block at least one, so a few
    more when some blocks' share rounds to zero."""
    cfg = _cfg("tiny_ferret.toml", "zo.directions=64", "federation.rounds=1")
    simulate(cfg, tmp_path, quiet=True, cache=cache)
    row = _rows(tmp_path)[1]
    pairs = row["payload_up"] / (2 + 2 + 4)
    assert pairs == int(pairs) and row["clients"] * 64 <= pairs <= row["clients"] * 72
