"""The public conformance checks (``fedpeft.testing.check_strategy``) on every registered
strategy of both families and the shipped plug-in; the checks themselves fail strategies that
ignore updates, weight them wrongly or lose state; and each in-tree strategy's own metrics.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedpeft.algorithms.base import StrategyContext
from fedpeft.algorithms.capabilities import capabilities_of
from fedpeft.algorithms.registry import build_strategy, registered, resolve
from fedpeft.errors import AggregationError
from fedpeft.prune.layout import LayerLayout, PruneLayout
from fedpeft.testing import ConformanceError, check_strategy
from fedpeft.testing.conformance import CHECKS
from fedpeft.wire.messages import ClientInfo, Header, LoraSpec

PLUGIN = str(Path(__file__).resolve().parents[1] / "strategies" / "median.py") + ":CoordinateMedian"
STRATEGIES = [*registered(), PLUGIN]
SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


# a pruning strategy's layout; the suite's module names lie outside it (nothing is pruned)
LAYOUT = PruneLayout("llama", (LayerLayout(groups=2, per_group=2, head_dim=4, ffn=16),) * 3)


def _build(name, initial):
    layout = LAYOUT if capabilities_of(resolve(name)).needs_layout else None
    return build_strategy(
        name, {}, StrategyContext(initial=initial, spec=SPEC, seed=0, layout=layout)
    )


def _clients(n):
    return [
        ClientInfo(header=Header("r", 0, "fp", "", 10 + i, str(i)), device="cpu") for i in range(n)
    ]


def _updates(make_update, n=3):
    return [make_update(client=str(i), num_examples=10 + 7 * i, seed=i) for i in range(n)]


def _equal(x, y):
    return set(x) == set(y) and all(
        torch.equal(x[m].a, y[m].a) and torch.equal(x[m].b, y[m].b) and x[m].alpha == y[m].alpha
        for m in x
    )


@pytest.fixture(params=STRATEGIES)
def name(request):
    return request.param


def test_every_registered_strategy_and_the_plugin_pass_the_public_checks(name):
    assert check_strategy(name) == list(CHECKS)


def test_options_reach_the_checks():
    """HetLoRA with example weights is checked as example-weighted (and passes)."""
    check_strategy("hetlora", {"weighting": "examples"})


# Throwaway strategies a plug-in author might write by mistake; each must fail its check.
BROKEN = """
from dataclasses import dataclass
from fedpeft.algorithms.capabilities import Capabilities
from fedpeft.algorithms.fedavg import FedAvg
from fedpeft.algorithms.base import AggregateResult


class NoOp(FedAvg):
    def aggregate_train(self, server_round, updates):
        if not updates:
            return super().aggregate_train(server_round, updates)
        return AggregateResult(adapter=self.ctx.initial, spec=self.ctx.spec)


class EqualWeights(FedAvg):
    capabilities = Capabilities(family="lora", linear=True)  # says: example-weighted

    def aggregate_train(self, server_round, updates):
        from dataclasses import replace
        same = [replace(u, header=replace(u.header, num_examples=1)) for u in updates]
        return super().aggregate_train(server_round, same)


class Forgetful(FedAvg):
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
"""


@pytest.mark.parametrize(
    ("cls", "failed"),
    [("NoOp", {"identical", "depends", "linear", "weights", "refusals"}),
     ("EqualWeights", {"linear", "weights"}),
     ("Forgetful", {"state"})],
)  # fmt: skip
def test_the_checks_fail_strategies_that_ignore_misweight_or_forget(tmp_path, cls, failed):
    (tmp_path / "broken.py").write_text(BROKEN)
    with pytest.raises(ConformanceError) as err:
        check_strategy(f"{tmp_path / 'broken.py'}:{cls}")
    assert set(err.value.failures) == failed, err.value.failures


# What each in-tree strategy reports after aggregating three rank-4 updates in round 1
# (stacking strategies hold every client's components: rank 3 x 4; RoLoRA trains B first).
METRICS = {
    "fedavg": {"fedavg_clients": 3.0},
    "ffa": {"ffa_clients": 3.0},
    "flexlora": {"flexlora_clients": 3.0, "flexlora_global_rank": 12.0},
    "flora": {"flora_clients": 3.0, "flora_global_rank": 12.0},
    "hetlora": {"hetlora_clients": 3.0},
    "rolora": {"rolora_clients": 3.0, "rolora_trained_b": 1.0},
}


@pytest.mark.parametrize("strategy", sorted(METRICS))
def test_round_metrics_of_the_in_tree_strategies(strategy, make_update):
    ups = _updates(make_update, 3)
    strat = _build(strategy, ups[0].factors)
    strat.configure_train(1, _clients(3))
    assert dict(strat.aggregate_train(1, ups).metrics) == METRICS[strategy]


@pytest.mark.parametrize("strategy", sorted(METRICS))
def test_empty_input_names_the_strategy(strategy, make_update):
    with pytest.raises(AggregationError, match=f"'{strategy}'"):
        _build(strategy, make_update().factors).aggregate_train(1, [])
