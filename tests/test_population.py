"""Populations far larger than a round: a fixed number of clients per round, clients that
draw their records on demand, nodes made when first asked, and discovery of the sampled
clients only (issue 21, item 2)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message
from safetensors.torch import load_file

from fedpeft.client.app import make_client_app
from fedpeft.config.rules import deployment_problems
from fedpeft.data.clients import client_eval_records, client_records, drawn_indices, get_task
from fedpeft.errors import ConfigError, DataError, RoundError
from fedpeft.models import get_model
from fedpeft.rounds import clients_per_round
from fedpeft.server.app import Outcome, run_server
from fedpeft.server.discovery import ClientIds, Roster
from fedpeft.server.results import RunReporter
from fedpeft.simulation.inprocess import FIRST_NODE_ID, InProcessGrid, PartitionConfigs
from fedpeft.simulation.partition import key_mix, label_skew
from fedpeft.simulation.runner import simulate
from fedpeft.zo.runtime import discard_changed_models

MILLION = 1_000_000
POPULATION = (
    f"federation.num_clients={MILLION}",
    "federation.clients_per_round=100",
    "federation.discovery=sampled",
    "federation.records_per_client=4",
    "federation.partition=dirichlet",
)


# ---------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["federation.clients_per_round=9"], "clients_per_round (9) must be <= num_clients (3)"),
        (["federation.clients_per_round=2", "federation.fraction_train=0.5"],
         "clients_per_round (2) and fraction_train (0.5) both set"),
        (["federation.clients_per_round=1", "federation.min_clients=2"],
         "clients_per_round (1) must be >= min_clients (2)"),
        (["federation.records_per_client=4", "federation.partition=natural"],
         "federation.records_per_client draws records per client"),
        (["federation.records_per_client=-1"], "records_per_client must be >= 0"),
        (["federation.discovery=some"], "federation.discovery must be one of"),
        (["federation.discovery=sampled", "simulation.backend=ray"], "simulation.backend = 'ray'"),
        (["federation.discovery=sampled", "eval.federated=true"], "eval.federated"),
        (["federation.discovery=sampled", 'devices.tiers=["tx2"]'], "devices.tiers"),
        (["federation.discovery=sampled", "strategy.name=flora", "ranks.mode=tiers",
          "ranks.tiers=[2,4]"], "ranks.mode = 'tiers'"),
        (["federation.records_per_client=4", "federation.partition=iid",
          "federation.centralized=true", "federation.min_clients=1"],
         "federation.records_per_client = 4"),
    ],
)  # fmt: skip
def test_population_settings_are_decided_at_load(tiny_config, overrides, names) -> None:
    with pytest.raises(ConfigError, match="federation") as err:
        tiny_config(*overrides)
    assert names in str(err.value)


def test_a_fixed_number_of_clients_per_round(tiny_config) -> None:
    cfg = tiny_config("federation.num_clients=10", "federation.clients_per_round=4")
    assert clients_per_round(cfg, 10) == 4
    assert clients_per_round(cfg, 3) == 3  # fewer joined than asked for: all of them
    frac = tiny_config("federation.num_clients=10", "federation.fraction_train=0.25")
    assert clients_per_round(frac, 10) == 3


def test_deployments_refuse_what_only_a_simulation_can_do(tiny_config) -> None:
    assert deployment_problems(tiny_config()) == []
    (why,) = deployment_problems(tiny_config("federation.discovery=sampled"))
    assert "federation.discovery = 'sampled'" in why


# ---------------------------------------------------------------- drawn records
def test_a_client_of_a_million_draws_its_records_without_splitting_the_data(
    tiny_config, cache
) -> None:
    cfg = tiny_config(*POPULATION)
    task = get_task(cfg.data, cfg.federation.seed, cache)
    last = client_records(cfg, MILLION - 1, cache)
    assert 1 <= len(last) <= 4
    assert all(r in task.train for r in last)
    assert client_records(cfg, MILLION - 1, cache) == last  # seeded by its id
    assert client_records(cfg, 0, cache) != last
    assert cache.count("partition:") == 0  # nothing was computed for the other clients
    with pytest.raises(DataError, match="outside 0..999999"):
        client_records(cfg, MILLION, cache)
    held = client_eval_records(cfg, 12345, cache)
    assert len(held) >= 1 and all(r in task.eval for r in held)


def test_a_split_that_cannot_give_every_client_a_record_names_the_fix(tiny_config, cache):
    cfg = tiny_config(f"federation.num_clients={MILLION}", "federation.partition=iid")
    with pytest.raises(DataError, match="federation.records_per_client"):
        client_records(cfg, 0, cache)


def test_drawn_key_mixes_are_skewed_by_alpha(tiny_config, cache) -> None:
    """Smaller dirichlet_alpha, farther each client's keys from the global mix; eval records
    come from the keys the client trains on."""
    skews = []
    for alpha in (0.05, 100.0):
        cfg = tiny_config(*POPULATION, f"federation.dirichlet_alpha={alpha}",
                          "federation.records_per_client=40")  # fmt: skip
        task = get_task(cfg.data, cfg.federation.seed, cache)
        keys = [r["domain"] for r in task.train]
        parts = [drawn_indices(cfg, task, c, held_out=False, cache=cache) for c in range(40)]
        skews.append(label_skew(parts, keys))
        for c in range(5):
            mine = {keys[i] for i in parts[c]}
            held = drawn_indices(cfg, task, c, held_out=True, cache=cache)
            if alpha < 1 and len(mine) == 1:  # one dominant key: its held-out records too
                assert {task.eval[j]["domain"] for j in held} <= mine
    assert skews[0] > skews[1] + 0.2, skews


def test_key_mix_matches_the_dirichlet_mean() -> None:
    prior = np.array([0.5, 0.3, 0.2])
    rng = np.random.default_rng(0)
    mean = np.mean([key_mix(prior, 1.0, rng) for _ in range(4000)], axis=0)
    np.testing.assert_allclose(mean, prior, atol=0.02)
    assert key_mix(np.ones(1), 0.5, rng).tolist() == [1.0]


# ---------------------------------------------------------------- nodes and ids
def test_nodes_are_made_when_first_asked_and_addressed_by_client_id() -> None:
    configs = PartitionConfigs(MILLION)
    assert len(configs) == MILLION
    assert configs[-1] == {"partition-id": MILLION - 1, "num-partitions": MILLION}
    with pytest.raises(IndexError):
        configs[MILLION]
    grid = InProcessGrid(None, configs)  # type: ignore[arg-type]  # no message is sent
    assert grid.started == 0
    assert len(grid.get_node_ids()) == MILLION  # type: ignore[arg-type]
    assert grid.node_of("999999") == FIRST_NODE_ID + 999_999
    for bad in ("1000000", "007", "-1", "a", ""):
        assert grid.node_of(bad) is None, bad
    assert grid.context(FIRST_NODE_ID + 5).node_config["partition-id"] == 5
    assert grid.started == 1
    with pytest.raises(KeyError):
        grid.context(FIRST_NODE_ID - 1)


def test_client_ids_are_a_range_not_a_list() -> None:
    ids = ClientIds(MILLION)
    assert len(ids) == MILLION and ids[0] == "0" and ids[-1] == "999999"
    assert "999999" in ids and "1000000" not in ids and "01" not in ids and 5 not in ids
    assert list(ClientIds(3)) == ["0", "1", "2"] and ClientIds(5)[1:3] == ["1", "2"]


class _Counting(InProcessGrid):
    """Counts the messages pushed, by type."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pushed: dict[str, int] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for m in messages:
            kind = m.metadata.message_type
            self.pushed[kind] = self.pushed.get(kind, 0) + 1
        return super().push_messages(messages)


class _Swapped(_Counting):
    """Addresses client 0 at client 1's node and the other way round."""

    def node_of(self, client_id: str) -> int | None:
        swap = {"0": "1", "1": "0"}
        return super().node_of(swap.get(client_id, client_id))


def test_a_node_that_answers_as_another_client_is_refused(tiny_config, cache) -> None:
    cfg = tiny_config("federation.num_clients=4")
    grid = _Swapped(make_client_app(cfg, cache), PartitionConfigs(4))
    fingerprint = get_model(cfg.model, cache).fingerprint
    roster = Roster(ClientIds(4), "run", fingerprint, on_demand=True)
    why = roster.ask_clients(grid, ["0", "1", "2"], timeout=600)
    assert sorted(why) == ["0", "1"] and "2" in roster.clients
    assert why["0"] == "did not join: client 1: its node is client 0's"
    assert why["1"] == "did not join: client 0: its node is client 1's"
    assert set(roster.missing()) == {"0", "1"}
    assert roster.report()["asked"] == 3


# ---------------------------------------------------------------- whole runs
def _run(cfg, out: Path, cache, grid: InProcessGrid) -> Outcome:
    outcome = Outcome()
    reporter = RunReporter(out, cfg.federation.rounds, quiet=True)
    try:
        outcome.summary = run_server(grid, cfg, out, reporter, cache, outcome=outcome, nodes=grid)
    finally:
        discard_changed_models(cache)
    return outcome


def test_a_million_clients_with_100_a_round_start_at_once(tiny_config, tmp_path, cache):
    """Nothing is made per client of the population: the grid makes the 100 sampled nodes,
    the coordinator asks only them who they are, and only they draw records. (Measured
    start-up times are in docs/scale.md; a test does not time.)"""
    cfg = tiny_config(*POPULATION, "federation.rounds=1", "train.local_steps=1",
                      "federation.aggregation=stream")  # fmt: skip
    grid = _Counting(make_client_app(cfg, cache), PartitionConfigs(MILLION))
    outcome = _run(cfg, tmp_path, cache, grid)
    summary = outcome.summary
    assert summary is not None and summary["rounds"] == 1
    assert grid.started == 100
    assert grid.pushed == {"query.info": 100, "train.lora": 100}
    assert cache.count("partition:") == 0 and cache.count("client-data:") == 100
    found = summary["discovery"]
    assert found["expected"] == MILLION and found["asked"] == 100
    assert len(found["joined"]) == 100 and found["missing"] == {}
    assert summary["num_clients"] == 100
    assert len(grid.state_dict()) == 100  # the checkpoint holds the nodes that exist


def test_sampled_discovery_trains_the_clients_full_discovery_would(tiny_config, tmp_path, cache):
    """With ids 0..9 numeric and string order agree, so both kinds of discovery draw the
    same clients from one seed and give one global model, bit for bit."""
    models = []
    for discovery in ("all", "sampled"):
        cfg = tiny_config("federation.num_clients=6", "federation.clients_per_round=3",
                          f"federation.discovery={discovery}", "train.local_steps=1")  # fmt: skip
        grid = _Counting(make_client_app(cfg, cache), PartitionConfigs(6))
        outcome = _run(cfg, tmp_path / discovery, cache, grid)
        assert outcome.model is not None and outcome.model.adapter is not None
        models.append({k: (f.a, f.b) for k, f in outcome.model.adapter.items()})
        if discovery == "all":
            assert grid.pushed["query.info"] == 6  # everyone, before the first round
        else:  # the clients drawn in rounds 1 and 2, each asked once
            assert grid.pushed["query.info"] == grid.started < 6
    for k in models[0]:
        for x, y in zip(models[0][k], models[1][k], strict=True):
            assert torch.equal(x, y), k


def test_a_resumed_run_with_sampled_discovery_continues_exactly(
    tiny_config, tmp_path, cache, outage
):
    """SCAFFOLD keeps a control variate on each node: the checkpoint holds the nodes that
    exist, and a resumed coordinator asks its drawn clients who they are again (its roster
    starts empty), then trains them from the same state."""
    cfg = tiny_config("federation.num_clients=6", "federation.clients_per_round=4",
                      "federation.discovery=sampled", "federation.records_per_client=8",
                      "federation.partition=iid", "strategy.name=scaffold",
                      "federation.rounds=3", "train.local_steps=1")  # fmt: skip
    clean = simulate(cfg, tmp_path / "clean", quiet=True, cache=cache)
    outage(3)
    with pytest.raises(RoundError, match="round 3 failed"):
        simulate(cfg, tmp_path / "run", quiet=True, cache=cache)
    outage(None)
    again = simulate(cfg, tmp_path / "run", quiet=True, cache=cache, resume=True)
    assert again["after"] == clean["after"]
    a = load_file(str(tmp_path / "clean" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again["discovery"]["asked"] == 4  # asked again after the restart: round 3's
