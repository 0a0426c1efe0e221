"""Streaming aggregation: an exact sum, folded in any arrival order, the batch path's global."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message

from fedpeft._flwr import GridWrapper
from fedpeft.client.app import make_client_app
from fedpeft.errors import ConfigError
from fedpeft.server.app import Outcome, run_server
from fedpeft.server.exact_sum import TOP, ExactSum
from fedpeft.server.results import RunReporter
from fedpeft.server.validate import weight_cap
from fedpeft.simulation.inprocess import InProcessGrid
from fedpeft.zo.runtime import discard_changed_models

ZO_SMALL = ("zo.num_seeds=64", "zo.local_steps=4", "zo.lr=1e-4", "zo.eps=1e-3")
# every linear strategy (capability `linear` without per-client statistics), small settings
LINEAR = {
    "fedavg": (),
    "fedavg-unweighted": ("strategy.options.weighted=false",),
    "ffa": ("strategy.name=ffa",),
    "rolora": ("strategy.name=rolora",),
    "fedsa": ("strategy.name=fedsa", "eval.personalized=true"),
    "scaffold": ("strategy.name=scaffold",),
    "fedadam": ("server_opt.name=adam", "server_opt.lr=0.01"),
    "fedkseed": ("strategy.name=fedkseed", *ZO_SMALL),
    # a clip that binds: each client's scalars are clipped as they are summed, on both paths
    "fedkseed-clipped": ("strategy.name=fedkseed", *ZO_SMALL, "strategy.options.scalar_clip=0.05"),
    # client-level DP: each change clipped as it is summed (a clip that binds), noise added
    "fedavg-dp": ("dp.noise_multiplier=0.5", "dp.clip_norm=0.01"),
    "fedkseed-dp": (
        "strategy.name=fedkseed",
        *ZO_SMALL,
        "dp.noise_multiplier=0.5",
        "dp.clip_norm=0.01",
    ),  # fmt: skip
    # robust clipping with the strategy's mean: each update clipped as it is summed (binding)
    "fedavg-robust-clip": ("robust.clip_norm=0.01",),
    "fedkseed-robust-clip": ("strategy.name=fedkseed", *ZO_SMALL, "robust.scalar_clip=0.05"),
    "ferret": ("strategy.name=ferret", "zo.num_seeds=16", "train.local_steps=2"),
    "ferret-clipped": (
        "strategy.name=ferret",
        "zo.num_seeds=16",
        "train.local_steps=2",
        "strategy.options.scalar_clip=0.001",
    ),  # fmt: skip
}


# ---------------------------------------------------------------------- the exact sum
def test_exact_sum_is_the_same_in_any_order_and_correctly_rounded() -> None:
    gen = torch.Generator().manual_seed(0)
    scales = [10.0**e for e in range(-12, 6)]  # values 17 decades apart in one sum
    xs = [torch.randn(300, generator=gen, dtype=torch.float64) * s for s in scales * 3]
    sums = []
    for order in (range(len(xs)), reversed(range(len(xs))), random.Random(1).sample(range(54), 54)):
        acc = ExactSum(300)
        for i in order:
            acc.add(xs[i])
        sums.append(acc.value())
    assert torch.equal(sums[0], sums[1]) and torch.equal(sums[0], sums[2])
    fsums = [math.fsum(float(x[i]) for x in xs) for i in range(300)]
    exact = torch.tensor(fsums, dtype=torch.float64)
    assert torch.equal(sums[0], exact)  # fsum is correctly rounded; so is this sum here
    # a float sum in another order differs in the last bits: the property is not free
    float_sums = [sum(xs), sum(reversed(xs))]
    assert not torch.equal(float_sums[0], float_sums[1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 2.0**TOP])
def test_exact_sum_refuses_values_outside_its_range(bad: float) -> None:
    acc = ExactSum(2)
    acc.add(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="not finite or not below"):
        acc.add(torch.tensor([bad, 0.0]))
    assert acc.terms == 1 and acc.value().tolist() == [1.0, 2.0]


def test_weight_cap_is_ratio_times_the_median_of_reported_counts() -> None:
    assert weight_cap([10, 20, 1000], 2.0) == 40
    assert weight_cap([10, 20, 1000], 0.0) is None
    assert weight_cap([1, 1], 0.5) == 1


# ---------------------------------------------------------------------- rounds
class ShuffledGrid(GridWrapper):
    """Delivers each window's messages, and hands back their replies, in a seeded random
    order: the arrival order of a real transport."""

    def __init__(self, grid: InProcessGrid, seed: int) -> None:
        super().__init__(grid)
        self.rng = random.Random(seed)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        msgs = list(messages)
        self.rng.shuffle(msgs)
        replies = list(self.grid.send_and_receive(msgs, timeout=timeout))
        self.rng.shuffle(replies)
        return replies


def _run(cfg, out: Path, cache, shuffle: int | None) -> Outcome:
    n = cfg.federation.num_clients
    grid = InProcessGrid(make_client_app(cfg, cache), [{"partition-id": i} for i in range(n)])
    outcome = Outcome()
    wrapped = ShuffledGrid(grid, shuffle) if shuffle is not None else grid
    rounds = cfg.federation.rounds
    try:
        run_server(wrapped, cfg, out, RunReporter(out, rounds, quiet=True), cache, outcome=outcome)
    finally:  # as simulate() does: the next run starts from the true base weights
        discard_changed_models(cache)
    assert outcome.model is not None
    return outcome


def _tensors(outcome: Outcome) -> dict[str, torch.Tensor]:
    m = outcome.model
    assert m is not None
    if m.zo is not None:
        return {"coeffs": torch.from_numpy(np.asarray(m.zo.coeffs))}
    assert m.adapter is not None
    return {f"{k}.{p}": getattr(f, p) for k, f in m.adapter.items() for p in ("a", "b")}


def _stream_and_batch(tiny_config, common: tuple[str, ...], tmp_path: Path, cache) -> dict:
    """``common`` run streaming in windows of 2 and 3 clients, each in its own shuffled
    arrival order, then on the batch path: ``stream2``, ``stream3``, ``batch``."""
    runs = {
        f"stream{w}": _run(
            tiny_config(*common, "federation.aggregation=stream", f"federation.window={w}"),
            tmp_path / f"stream{w}",
            cache,
            shuffle=w,
        )  # fmt: skip
        for w in (2, 3)
    }
    runs["batch"] = _run(tiny_config(*common), tmp_path / "batch", cache, shuffle=None)
    return runs


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_streaming_gives_one_global_in_any_arrival_order(tiny_config, tmp_path, cache, name):
    """Replies folded as they arrive, in two shuffled orders and windows of 2 and 3 clients,
    and the batch path (which folds the replies it collected) give bit-identical globals."""
    runs = _stream_and_batch(tiny_config, ("federation.num_clients=5", *LINEAR[name]),
                             tmp_path, cache)  # fmt: skip
    a, b, ref = (_tensors(o) for o in runs.values())
    assert a.keys() == b.keys() == ref.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-identical across arrival orders
        assert torch.equal(a[k], ref[k]), k  # and with the batch path
    assert any(bool((v != 0).any()) for v in a.values())  # something was learned
    for run in ("stream2", "stream3", "batch"):  # a strategy's client count counts the clients
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        counts = [
            r[k]
            for r in rows
            for k in r
            if k in ("fedavg_clients", "ffa_clients", "rolora_clients")
        ]
        assert counts == ([] if name.startswith(("fedkseed", "ferret")) else [5.0, 5.0]), run
        if "robust" in name:  # the fold counts what it clipped, as the robust wrapper does
            clipped = [r["robust_clipped"] for r in rows if r["round"] > 0]
            assert len(clipped) == 2 and all(c > 0 for c in clipped), (run, clipped)


def test_streaming_screens_each_reply_against_its_simulated_device(tiny_config, tmp_path, cache):
    """``[devices]`` with streaming: a reply is screened before it is summed. Client 1's
    uplink makes it miss the deadline by its bytes alone (deterministic); streaming in two
    shuffled orders and the batch path drop it alike and give the same global bit for bit."""
    fast = {"speed": 1.0, "up_mbps": 1000.0, "down_mbps": 1000.0, "memory_mb": 10**6}
    slow = {**fast, "up_mbps": 1e-4}  # any reply takes hours to upload
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps({str(c): slow if c == 1 else fast for c in range(5)}))
    common = ("federation.num_clients=5", f"devices.file={json.dumps(str(devices))}",
              "devices.deadline_s=600")  # fmt: skip
    runs = _stream_and_batch(tiny_config, common, tmp_path, cache)
    ref = _tensors(runs["batch"])
    for name, outcome in runs.items():
        got = _tensors(outcome)
        assert all(torch.equal(got[k], ref[k]) for k in ref), name
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for r in rows[1:]:
            assert r["client_ids"] == ["0", "2", "3", "4"], name
            assert r["failures"]["1"].startswith("deadline: missed the deadline"), name
            assert r["sim_round_s"] == 600.0, name


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ("strategy.name=flora", "is not linear"),
        ("strategy.name=fedkseed-pro", "statistics of each client"),
        ("secagg.enabled=true", "secagg.enabled"),
        ("robust.rule=median", "robust.rule"),
        ("ranks.mode=tiers", "different ranks"),
    ],
)
def test_streaming_refuses_what_it_cannot_fold(tiny_config, override, reason) -> None:
    extra = ("strategy.name=ffa", "ranks.tiers=[2,4]") if override.startswith("ranks") else ()
    with pytest.raises(ConfigError, match=reason) as err:
        tiny_config("federation.aggregation=stream", *extra, override)
    assert "federation.aggregation" in str(err.value)


def test_unknown_aggregation_is_refused(tiny_config) -> None:
    with pytest.raises(ConfigError, match="federation.aggregation must be one of"):
        tiny_config("federation.aggregation=fold")


def test_a_streaming_round_of_2000_clients_holds_a_bounded_share_of_their_updates(repo):
    """2,000 synthetic clients reply with 245 KB updates (491 MB together); streaming with 32
    in flight must stay under 150 MiB above the coordinator's memory before the round (the
    batch path holds every update: about 560 MiB more, measured with the same script)."""
    script = repo / "benchmarks" / "scale_round.py"
    args = ["--clients", "2000", "--shape", "small", "--aggregation", "stream", "--window", "32"]
    out = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["bytes_up"] > 2000 * got["update_mb"] * 1e6  # every update did arrive
    assert got["global_b_abs_mean"] > 0
    assert got["peak_rss_mib"] - got["rss_before_mib"] < 150, got
