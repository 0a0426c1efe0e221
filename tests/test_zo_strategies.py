"""Conformance of the seed/scalar strategies (fedkseed, fedkseed-pro, ferret) and their maths."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from fedpeft.algorithms.base import StrategyContext
from fedpeft.algorithms.capabilities import capabilities_of
from fedpeft.algorithms.fedkseed import pro_probabilities
from fedpeft.algorithms.registry import build_strategy, registered, resolve
from fedpeft.config import TrainConfig
from fedpeft.errors import AggregationError
from fedpeft.server.fold import Fold
from fedpeft.wire.messages import ClientInfo, Header, LoraSpec
from fedpeft.wire.zo import ZoInstruction, ZoSpec, ZoUpdate

ZO = [n for n in registered() if capabilities_of(resolve(n)).family == "zo"]
K, TAU, BLOCKS = 64, 10, 3


def _ctx(algorithm: str) -> StrategyContext:
    spec = ZoSpec(
        algorithm=algorithm, target="full", num_seeds=K, pool_seed=1, lr=0.1, local_steps=TAU
    )
    return StrategyContext(
        initial={}, spec=LoraSpec(4, 8.0, ("q_proj",)), seed=0, zo=spec, zo_blocks=BLOCKS
    )


def _algorithm(name: str) -> str:
    return resolve(name).zo_algorithm


def _update(name: str, client: str, n: int, seed: int, version: int = 0) -> ZoUpdate:
    rng = np.random.default_rng(seed)
    if _algorithm(name) == "fedkseed":
        seeds, blocks = rng.integers(0, K, TAU).astype(np.uint16), np.zeros(0, np.uint16)
    else:
        pairs = rng.choice(BLOCKS * K, 12, replace=False)
        blocks, seeds = (pairs // K).astype(np.uint16), (pairs % K).astype(np.uint16)
    return ZoUpdate(
        header=Header("r", 1, "fp", "h", n, client),
        seeds=seeds,
        scalars=rng.normal(size=len(seeds)).astype(np.float32),
        blocks=blocks,
        synced_version=version,
    )


def _clients(n: int) -> list[ClientInfo]:
    return [ClientInfo(header=Header("r", 0, "fp", "", 10, str(i)), device="cpu") for i in range(n)]


@pytest.fixture(params=ZO)
def name(request):
    return request.param


def test_registered():
    assert {"fedkseed", "fedkseed-pro", "ferret"} <= set(ZO)


def test_unknown_clients_get_full_then_incremental_after_confirming(name):
    strat = build_strategy(name, {}, _ctx(_algorithm(name)))
    plans = strat.configure_train(1, _clients(2))
    # full sync of an all-zero state: no entries at all
    assert all(
        p.sync.full and p.sync.to_version == 0 and p.sync.nbytes == 0 for p in plans.values()
    )
    strat.aggregate_train(1, [_update(name, "0", 10, 0), _update(name, "1", 30, 1)])
    plans = strat.configure_train(2, _clients(3))
    assert (
        not plans["0"].sync.full
        and plans["0"].sync.from_version == 0
        and plans["0"].sync.to_version == 1
    )
    assert plans["2"].sync.full  # never seen: full


def test_weighted_accumulation_is_exact(name):
    strat = build_strategy(name, {"scalar_clip": 0.0}, _ctx(_algorithm(name)))
    ups = [_update(name, "0", 10, 0), _update(name, "1", 30, 1)]
    res = strat.aggregate_train(1, ups)
    want = np.zeros((BLOCKS if _algorithm(name) == "ferret" else 1, K))
    scale = 0.1 if _algorithm(name) == "fedkseed" else 1.0  # FedKSeed folds the local lr in
    for u, p in zip(ups, (0.25, 0.75), strict=True):
        b = u.blocks.astype(np.int64) if len(u.blocks) else np.zeros(len(u.seeds), np.int64)
        np.add.at(want, (b, u.seeds.astype(np.int64)), scale * p * u.scalars.astype(np.float64))
    assert res.zo is not None and res.zo.version == 1
    assert np.allclose(res.zo.coeffs, want.astype(np.float32), atol=1e-7)


def test_order_state_and_empty(name):
    ups = [_update(name, str(i), 10 + i, i) for i in range(3)]
    a = build_strategy(name, {}, _ctx(_algorithm(name)))
    b = build_strategy(name, {}, _ctx(_algorithm(name)))
    ra, rb = a.aggregate_train(1, ups), b.aggregate_train(1, list(reversed(ups)))
    assert np.array_equal(ra.zo.coeffs, rb.zo.coeffs)
    resumed = build_strategy(name, {}, _ctx(_algorithm(name)))
    resumed.load_state_dict(copy.deepcopy(a.state_dict()))
    nxt = [_update(name, str(i), 10, 10 + i, version=1) for i in range(2)]
    assert np.array_equal(
        a.aggregate_train(2, nxt).zo.coeffs, resumed.aggregate_train(2, nxt).zo.coeffs
    )
    with pytest.raises(AggregationError):
        a.aggregate_train(3, [])


def test_scalar_clip_bounds_each_contribution():
    strat = build_strategy("fedkseed", {"scalar_clip": 1.0}, _ctx("fedkseed"))
    up = ZoUpdate(
        header=Header("r", 1, "fp", "h", 5, "0"),
        seeds=np.array([3] * TAU, np.uint16),
        scalars=np.full(TAU, 1e6, np.float32),
    )
    res = strat.aggregate_train(1, [up])
    assert res.zo.coeffs[0, 3] == pytest.approx(0.1 * TAU * 1.0)


def test_pro_probabilities_favour_informative_seeds():
    abs_sum, counts = np.zeros(4), np.zeros(4)
    p = pro_probabilities(abs_sum, counts)
    assert np.allclose(p, 0.25)  # nothing seen: uniform
    abs_sum[:] = [0.0, 1.0, 4.0, 2.0]
    counts[:] = [0, 1, 2, 1]
    p = pro_probabilities(abs_sum, counts)
    assert p.argmax() == 2 and p.argmin() == 0
    assert p.max() / p.min() == pytest.approx(np.e)  # min-max normalised logits: at most e


def test_pro_sends_probabilities_and_plain_does_not():
    pro = build_strategy("fedkseed-pro", {}, _ctx("fedkseed"))
    plain = build_strategy("fedkseed", {}, _ctx("fedkseed"))
    pro.aggregate_train(1, [_update("fedkseed", "0", 10, 0)])
    assert pro.configure_train(2, _clients(1))["0"].probs.shape == (K,)
    assert plain.configure_train(1, _clients(1))["0"].probs is None


def test_ferret_rejects_blocks_out_of_range():
    strat = build_strategy("ferret", {}, _ctx("ferret"))
    bad = ZoUpdate(
        header=Header("r", 1, "fp", "h", 5, "0"),
        seeds=np.array([1], np.uint16),
        scalars=np.array([0.5], np.float32),
        blocks=np.array([BLOCKS], np.uint16),
    )
    with pytest.raises(AggregationError, match="block indices outside"):
        strat.aggregate_train(1, [bad])


def test_pro_probabilities_by_hand():
    """Means |g| = (0, 1, 2, 2) -> logits (0, .5, 1, 1) -> softmax; a seed seen once with
    |g| = 1 has mean 1, a seed seen twice with sum 4 has mean 2. Shifted means give the same
    probabilities (min-max normalisation)."""
    p = pro_probabilities(np.array([0.0, 1.0, 4.0, 2.0]), np.array([0, 1, 2, 1]))
    e = np.exp([0.0, 0.5, 1.0, 1.0])
    assert p == pytest.approx(e / e.sum(), rel=1e-12)
    shifted = pro_probabilities(np.array([3.0, 4.0, 10.0, 5.0]), np.array([1, 1, 2, 1]))
    assert shifted == pytest.approx(p, rel=1e-12)  # means 3, 4, 5, 5


def _ferret(**options):
    return build_strategy("ferret", options, _ctx("ferret"))


def _pairs(client, n, blocks, seeds, scalars, version=0) -> ZoUpdate:
    return ZoUpdate(
        header=Header("r", 1, "fp", "h", n, client),
        seeds=np.array(seeds, np.uint16),
        scalars=np.array(scalars, np.float32),
        blocks=np.array(blocks, np.uint16),
        synced_version=version,
    )


def test_ferret_accumulates_weighted_clipped_scalars_by_hand():
    """Client a (30 examples): (block 0, seed 1) = 2, (2, 5) = -8; client b (10): (0, 1) = 4.
    Weighted: (0, 1) = .75 * 2 + .25 * 4 = 2.5, (2, 5) = .75 * -8 = -6; clip 3 first: (0, 1)
    = .75 * 2 + .25 * 3 = 2.25, (2, 5) = .75 * -3; unweighted: halves; server_lr scales."""
    ups = [_pairs("a", 30, [0, 2], [1, 5], [2.0, -8.0]), _pairs("b", 10, [0], [1], [4.0])]
    cases = [
        ({}, 2.5, -6.0),
        ({"scalar_clip": 3.0}, 2.25, -2.25),
        ({"weighted": False}, 3.0, -4.0),
        ({"server_lr": 0.5}, 1.25, -3.0),
    ]
    for options, at_1, at_5 in cases:
        res = _ferret(**options).aggregate_train(1, ups)
        c = res.zo.coeffs
        assert c[0, 1] == pytest.approx(at_1) and c[2, 5] == pytest.approx(at_5), options
        assert (
            np.count_nonzero(c) == 2 and res.zo.version == 1 and res.zo.spec.algorithm == "ferret"
        )
        assert res.metrics == {"zo_changed_entries": 2.0}


def test_ferret_records_versions_and_forgets_them_when_it_plans():
    strat = _ferret()
    strat.aggregate_train(1, [_pairs("0", 1, [0], [1], [1.0], version=0)])
    assert strat.state.client_versions == {"0": 0}
    plans = strat.configure_train(2, _clients(1))
    assert strat.state.client_versions == {}  # confirmed again by the next reply
    sync = plans["0"].sync  # it confirmed version 0: an increment from there
    assert (sync.from_version, sync.to_version, sync.full) == (0, 1, False)
    full = build_strategy("ferret", {}, _ctx("ferret"))
    full.spec = dataclasses.replace(full.spec, sync="full")
    full.aggregate_train(1, [_pairs("0", 1, [0], [1], [1.0])])
    full.state.client_versions["0"] = 1
    assert full.configure_train(2, _clients(1))["0"].sync.full  # forced by zo.sync = full


def test_ferret_names_the_block_range_it_refuses():
    with pytest.raises(AggregationError, match=r"^client a sent block indices outside 0\.\.2$"):
        _ferret().aggregate_train(1, [_pairs("a", 1, [3], [1], [1.0])])
    with pytest.raises(AggregationError, match=r"^strategy 'ferret' got no updates to aggregate$"):
        _ferret().aggregate_train(1, [])
    no_zo = StrategyContext(initial={}, spec=LoraSpec(4, 8.0, ("q_proj",)), seed=0)
    with pytest.raises(AggregationError, match=r"needs a zeroth-order spec \(\[zo\] section\)$"):
        build_strategy("ferret", {}, no_zo)


@pytest.mark.parametrize("name", ["fedkseed", "fedkseed-pro"])
def test_fedkseed_accumulates_lr_weight_clipped_scalar_by_hand(name):
    """lr = 0.1 (the ctx's zo.lr). Client a (30 examples): seeds 3, 3, 7 with g = 1, 2, -500;
    client b (10): seed 3 with g = 4. clip 100: seed 3 = 0.1 * (.75 * 3 + .25 * 4) = 0.325,
    seed 7 = 0.1 * .75 * -100 = -7.5; Pro's statistics: |g| summed per seed and counted."""
    ups = [
        ZoUpdate(Header("r", 1, "fp", "h", 30, "a"), np.array([3, 3, 7], np.uint16),
                 np.array([1.0, 2.0, -500.0], np.float32)),
        ZoUpdate(Header("r", 1, "fp", "h", 10, "b"), np.array([3], np.uint16),
                 np.array([4.0], np.float32)),
    ]  # fmt: skip
    for options, s3, s7 in (
        ({}, 0.325, -7.5),
        ({"scalar_clip": 1.0}, 0.1 * (0.75 * 2 + 0.25 * 1), -0.075),
        ({"weighted": False}, 0.1 * (0.5 * 3 + 0.5 * 4), -5.0),
    ):
        strat = build_strategy(name, options, _ctx("fedkseed"))
        res = strat.aggregate_train(1, ups)
        assert res.zo.coeffs[0, 3] == pytest.approx(s3) and res.zo.coeffs[0, 7] == pytest.approx(s7)
        assert np.count_nonzero(res.zo.coeffs) == 2 and res.metrics == {"zo_changed_seeds": 2.0}
    state = strat.state_dict()
    assert state["counts"][3] == 3 and state["counts"][7] == 1
    assert state["abs_sum"][3] == 7.0 and state["abs_sum"][7] == 100.0
    with pytest.raises(AggregationError, match="^client a sent block indices; fedkseed has one"):
        strat.aggregate_train(2, [dataclasses.replace(ups[0], blocks=np.zeros(3, np.uint16))])
    with pytest.raises(AggregationError, match="^strategy 'fedkseed' got no updates"):
        strat.aggregate_train(2, [])


def test_fedkseed_sync_policy_spec_and_unanswered_clients():
    """sync = "full" sends a full sync even to a confirmed client; a client that was asked
    but did not answer gets a full sync next time (its state is unknown); plans and results
    carry the run's spec."""
    from fedpeft.algorithms.fedkseed import FedKSeed

    ctx = _ctx("fedkseed")
    strat = FedKSeed(FedKSeed.Config(), ctx)
    plans = strat.configure_train(1, _clients(2))
    assert all(p.spec == ctx.zo for p in plans.values())
    got = strat.aggregate_train(1, [_update("fedkseed", "0", 10, 0)])
    assert got.zo.spec == ctx.zo and got.zo.version == 1
    again = strat.configure_train(2, _clients(2))
    assert not again["0"].sync.full  # confirmed version 0: an increment
    assert again["1"].sync.full  # asked in round 1, never answered: full
    strat.aggregate_train(2, [_update("fedkseed", "0", 10, 1, version=1)])
    silent = strat.configure_train(3, _clients(1))
    assert not silent["0"].sync.full
    assert strat.configure_train(4, _clients(1))["0"].sync.full  # round 3 unanswered
    full_ctx = dataclasses.replace(ctx, zo=dataclasses.replace(ctx.zo, sync="full"))
    always = FedKSeed(FedKSeed.Config(), full_ctx)
    always.configure_train(1, _clients(1))
    always.aggregate_train(1, [_update("fedkseed", "0", 10, 0)])
    assert always.configure_train(2, _clients(1))["0"].sync.full
    with pytest.raises(
        AggregationError,
        match=r"^strategy 'fedkseed' needs a zeroth-order spec \(\[zo\] section\)$",
    ):
        FedKSeed(FedKSeed.Config(), dataclasses.replace(ctx, zo=None))


def test_ferret_clips_below_one_and_plans_carry_the_spec():
    """scalar_clip 0.5 (server_lr 1): scalars 3 and -0.25 of one client become 0.5 and -0.25."""
    from fedpeft.algorithms.ferret import Ferret

    ctx = _ctx("ferret")
    strat = Ferret(Ferret.Config(scalar_clip=0.5, server_lr=1.0), ctx)
    plans = strat.configure_train(1, _clients(1))
    assert plans["0"].spec == ctx.zo
    pairs = np.array([1, 2], np.uint16), np.array([3.0, -0.25], np.float32)
    up = ZoUpdate(Header("r", 1, "fp", "h", 10, "0"), *pairs, blocks=np.array([0, 2], np.uint16))
    got = strat.aggregate_train(1, [up])
    assert got.zo.coeffs[0, 1] == 0.5 and got.zo.coeffs[2, 2] == -0.25
    assert np.count_nonzero(got.zo.coeffs) == 2


def _folded(strat, updates: list[ZoUpdate], blocks: int) -> list[ZoUpdate]:
    """``updates`` summed as a streaming or batch round of the coordinator sums them."""
    plans = strat.configure_train(1, [ClientInfo(u.header, "cpu") for u in updates])
    instructions = {
        c: ZoInstruction(Header("r", 1, "fp", "", 0, c), p.spec, TrainConfig(), p.sync, 0)
        for c, p in plans.items()
    }
    caps = capabilities_of(type(strat), strat.config)
    fold = Fold(instructions, blocks, None, caps.example_weighted, caps.scalar_clip)
    return fold.result([fold.add(u) for u in reversed(updates)])


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("fedkseed", {}),
        ("fedkseed", {"scalar_clip": 0.5}),
        ("fedkseed", {"scalar_clip": 0.5, "weighted": False}),
        ("ferret", {}),
        ("ferret", {"scalar_clip": 0.5, "server_lr": 2.0}),
    ],
)
def test_the_summed_mean_is_the_strategys_own_with_each_clients_scalars_clipped(name, options):
    """The coordinator sums each client's clipped scalars (capability ``scalar_clip``) and the
    strategy adds that mean: the same coefficients as its own loop over the clients' pairs,
    to float rounding, with a clip that binds for most scalars (|g| ~ N(0, 1), clip 0.5).
    Clipping the mean instead (or the mean times the clients, the hand-over's pairs) would
    change them by far more."""
    ups = [_update(name, str(i), n, seed=i) for i, n in enumerate((30, 10, 7, 1))]
    blocks = 1 if name == "fedkseed" else BLOCKS
    own = build_strategy(name, options, _ctx(name)).aggregate_train(1, ups).zo.coeffs
    strat = build_strategy(name, options, _ctx(name))
    summed = strat.aggregate_train(1, _folded(strat, ups, blocks)).zo.coeffs
    assert np.count_nonzero(own) > 10
    np.testing.assert_allclose(summed, own, rtol=1e-12, atol=1e-15)
    assert sorted(strat.state.client_versions) == ["0", "1", "2", "3"]  # every client counted
