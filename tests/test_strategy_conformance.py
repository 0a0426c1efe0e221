"""The conformance suite every LoRA strategy must pass: registered ones and the shipped plug-in.

Checks the interface's invariants, not any one algorithm's maths: plans for every sampled
client, modules and layer shapes preserved (a strategy may return another rank, e.g. a
stack), identical updates give that update's product back, the result
does not depend on reply order, inputs are not mutated, the same inputs give the same output,
``state_dict`` round-trips, and malformed or empty input raises ``AggregationError``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fedpeft.algorithms.capabilities import capabilities_of
from fedpeft.errors import AggregationError
from fedpeft.prune.layout import LayerLayout, PruneLayout
from fedpeft.strategies.base import StrategyContext
from fedpeft.strategies.registry import build_strategy, registered, resolve
from fedpeft.wire import ClientInfo, Header, LoraSpec

PLUGIN = str(Path(__file__).resolve().parents[1] / "strategies" / "median.py") + ":CoordinateMedian"
# LoRA strategies; seed/scalar strategies have their own suite (test_zo_strategies.py)
STRATEGIES = [n for n in registered() if capabilities_of(resolve(n)).family == "lora"] + [PLUGIN]
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


def test_plans_every_sampled_client(name, make_update):
    strat = _build(name, make_update().factors)
    plans = strat.configure_train(1, _clients(4))
    assert set(plans) <= {"0", "1", "2", "3"} and plans
    for plan in plans.values():
        assert set(plan.adapter) == set(make_update().factors)
        for f in plan.adapter.values():
            assert f.rank == plan.spec.rank


def test_preserves_structure(name, make_update):
    ups = _updates(make_update)
    res = _build(name, ups[0].factors).aggregate_train(1, ups)
    assert set(res.adapter) == set(ups[0].factors)
    assert res.spec is not None
    for m, f in res.adapter.items():
        assert f.a.shape[1] == ups[0].factors[m].a.shape[1]  # in_features
        assert f.b.shape[0] == ups[0].factors[m].b.shape[0]  # out_features
        assert f.rank == res.spec.rank and f.alpha == res.spec.alpha
        assert torch.isfinite(f.a).all() and torch.isfinite(f.b).all()


def test_identical_updates_give_that_update(name, make_update):
    one = make_update(client="0")
    same = [copy.deepcopy(one) for _ in range(3)]
    same = [
        type(u)(header=Header("run", 1, "fp", "h", 10 + i, str(i)), factors=u.factors)
        for i, u in enumerate(same)
    ]
    res = _build(name, one.factors).aggregate_train(1, same)
    for m, f in one.factors.items():
        # the layer's update (alpha / r) B A, whatever factorisation the strategy keeps
        g = res.adapter[m]  # (alpha / r) B A written out, not the wire type's delta()
        got = (g.alpha / g.a.shape[0]) * (g.b.double() @ g.a.double())
        want = (f.alpha / f.a.shape[0]) * (f.b.double() @ f.a.double())
        assert torch.allclose(got, want, atol=1e-5)


def test_reply_order_does_not_matter(name, make_update):
    ups = _updates(make_update, 4)
    a = _build(name, ups[0].factors).aggregate_train(1, ups)
    b = _build(name, ups[0].factors).aggregate_train(1, list(reversed(ups)))
    assert _equal(a.adapter, b.adapter)


def test_does_not_mutate_inputs(name, make_update):
    ups = _updates(make_update)
    before = copy.deepcopy(ups)
    _build(name, ups[0].factors).aggregate_train(1, ups)
    for u, v in zip(ups, before, strict=True):
        assert _equal(u.factors, v.factors)


def test_state_dict_round_trip(name, make_update, tmp_path):
    """Through the coordinator's checkpoint file, as a resumed run restores it."""
    from fedpeft.server.checkpoint import load_checkpoint, save_checkpoint

    ups = _updates(make_update)
    first = _build(name, ups[0].factors)
    first.aggregate_train(1, ups)
    save_checkpoint(tmp_path / "state.safetensors", first.state_dict())
    resumed = _build(name, make_update(seed=99).factors)
    resumed.load_state_dict(load_checkpoint(tmp_path / "state.safetensors"))
    nxt = _updates(make_update, 3)
    a = first.aggregate_train(2, nxt)
    b = resumed.aggregate_train(2, nxt)
    assert _equal(a.adapter, b.adapter)
    pa, pb = first.configure_train(3, _clients(2)), resumed.configure_train(3, _clients(2))
    assert all(_equal(pa[c].adapter, pb[c].adapter) for c in pa)


def test_rejects_mismatched_ranks(name, make_update):
    ups = [make_update(client="0", rank=4), make_update(client="1", rank=2, seed=1)]
    strat = _build(name, ups[0].factors)
    if capabilities_of(resolve(name)).heterogeneous_ranks:
        got = strat.aggregate_train(1, ups).adapter
        assert set(got) == set(ups[0].factors)
        for m, f in got.items():  # the layer's shape is kept, whatever rank comes back
            assert f.a.shape[1] == 10 and f.b.shape[0] == 12 and f.a.shape[0] == f.b.shape[1]
            assert bool(torch.isfinite(f.a).all() and torch.isfinite(f.b).all())
            assert float(f.delta().norm()) > 0, m
    else:
        with pytest.raises(AggregationError, match="client 1"):
            strat.aggregate_train(1, ups)


def test_rejects_mismatched_modules(name, make_update):
    ups = [
        make_update(client="0"),
        make_update(client="1", modules=("m.q_proj", "m.k_proj"), seed=1),
    ]
    with pytest.raises(AggregationError, match="client 1"):
        _build(name, ups[0].factors).aggregate_train(1, ups)


def test_rejects_empty_input(name, make_update):
    with pytest.raises(AggregationError):
        _build(name, make_update().factors).aggregate_train(1, [])


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
