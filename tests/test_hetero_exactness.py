"""Heterogeneous ranks: which strategies reproduce Delta W* = sum_k p_k s_k B_k A_k, and how far.

Random factors of ranks 2/4/8/16 (alpha 16, so scales 8/4/2/1) on two modules. FLoRA, FFA-LoRA
and RoLoRA must be exact to 1e-6 relative error; FlexLoRA's global is exact and its per-rank
factors carry the dense matrix's leading singular values; FedIT (zero-padded) and HetLoRA
are inexact and their errors are printed (run with -s to see them).
"""

from __future__ import annotations

import pytest
import torch

from fedpeft.algorithms.base import StrategyContext
from fedpeft.algorithms.registry import build_strategy
from fedpeft.errors import AggregationError
from fedpeft.lora.handle import init_factors
from fedpeft.lora.rank_ops import (
    dense_delta,
    product_norm,
    stack,
    svd_from_stacks,
    truncate,
    unit_scale,
)
from fedpeft.lora.ranks import TierRanks
from fedpeft.wire.messages import ClientInfo, Header, LoraFactors, LoraSpec, LoraUpdate

RANKS = (2, 4, 8, 16)
SHAPES = {"m.q_proj": (24, 20), "m.v_proj": (12, 20)}
SPEC = LoraSpec(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
IDS = tuple(str(i) for i in range(len(RANKS)))
EXAMPLES = (10, 30, 20, 40)


def _ctx():
    initial = init_factors(SHAPES, SPEC, seed=0)
    return StrategyContext(
        initial=initial, spec=SPEC, seed=0, ranks=TierRanks(tiers=RANKS, client_ids=IDS)
    )


def _clients():
    return [
        ClientInfo(Header("r", 0, "fp", "", n, c), "cpu")
        for c, n in zip(IDS, EXAMPLES, strict=True)
    ]


def _update(cid, factors, server_round=1):
    return LoraUpdate(Header("r", server_round, "fp", "h", EXAMPLES[int(cid)], cid), factors)


def _random(rank, seed, a=None, b=None):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (d_out, d_in) in sorted(SHAPES.items()):
        fa = torch.randn(rank, d_in, generator=g) if a is None else a[m].a
        fb = torch.randn(d_out, rank, generator=g) if b is None else b[m].b
        out[m] = LoraFactors(a=fa, b=fb, alpha=SPEC.alpha)
    return out


def _product(f):
    """``(alpha / r) B A`` in float64, written out here (not rank_ops' unit_scale)."""
    r = f.a.shape[0]
    return (f.alpha / r) * (f.b.double() @ f.a.double())  # (out, r) @ (r, in)


def _ideal(updates, module):
    """The naive reference ``sum_k p_k (alpha_k / r_k) B_k A_k``."""
    total = sum(u.header.num_examples for u in updates)
    return sum(u.header.num_examples / total * _product(u.factors[module]) for u in updates)


def _rel_error(result, updates, before=None):
    errs = []
    for m in SHAPES:
        ideal = _ideal(updates, m) + (0 if before is None else before[m])
        got = _product(result.adapter[m])
        errs.append(float((got - ideal).norm() / ideal.norm()))
    return max(errs)


def _run_round(name, make_factors, server_round=1, strat=None):
    strat = strat or build_strategy(name, {}, _ctx())
    plans = strat.configure_train(server_round, _clients())
    assert {c: p.spec.rank for c, p in plans.items()} == dict(zip(IDS, RANKS, strict=True))
    ups = [
        _update(c, make_factors(c, plans[c]), server_round) for c in IDS
    ]  # what each client sends back (its trained factors)
    return strat, ups, strat.aggregate_train(server_round, ups)


def test_flora_is_exact_for_mixed_ranks():
    _, ups, res = _run_round("flora", lambda c, p: _random(p.spec.rank, int(c)))
    assert _rel_error(res, ups) <= 1e-6
    assert res.spec.rank == sum(RANKS)


def test_flora_global_after_two_rounds_is_the_sum_of_both_rounds():
    """Round 2's global = round 1's product + round 2's clients' product (the stack is kept),
    and round 2's clients were sent round 1's stack as the base to merge."""
    strat, ups1, res1 = _run_round("flora", lambda c, p: _random(p.spec.rank, int(c)))
    before = {m: _product(res1.adapter[m]) for m in SHAPES}
    plans = strat.configure_train(2, _clients())
    for p in plans.values():
        assert p.base is not None
        for m in SHAPES:
            assert torch.allclose(_product(p.base[m]), before[m], rtol=1e-6, atol=1e-6)
    ups2 = [_update(c, _random(plans[c].spec.rank, 20 + int(c)), 2) for c in IDS]
    res2 = strat.aggregate_train(2, ups2)
    assert _rel_error(res2, ups2, before) <= 1e-6
    assert res2.spec.rank == 2 * sum(RANKS)


def _truncated(f, rank):
    """The first ``rank`` components of a factor pair as a product, written out here."""
    return (f.alpha / f.a.shape[0]) * (f.b.double()[:, :rank] @ f.a.double()[:rank])


def _best_rank(dense, rank):
    """Eckart-Young: the best rank-``rank`` approximation, from a dense SVD."""
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


@pytest.mark.parametrize("name", ["ffa", "hetlora", "flexlora", "rolora"])
def test_second_round_plans_carry_the_first_rounds_global(name):
    """Round 2 sends each client the round-1 global at its rank: a slice of it (FFA, HetLoRA,
    RoLoRA) or its best rank-r approximation (FlexLoRA), each product computed here."""
    one_factor = name in ("ffa", "rolora")

    def train(c, p):
        return _random(p.spec.rank, int(c), a=p.adapter if one_factor else None)

    strat, _, res = _run_round(name, train)
    plans = strat.configure_train(2, _clients())
    for c in IDS:
        r = plans[c].spec.rank
        for m in SHAPES:
            if name == "flexlora":
                want = _best_rank(_product(res.adapter[m]), r)
            else:
                want = _truncated(res.adapter[m], r)
            got = _product(plans[c].adapter[m])
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (name, c, m)


def test_unit_scale_folds_alpha_over_rank_into_b():
    f = LoraFactors(a=torch.ones(4, 3), b=torch.full((2, 4), 0.5), alpha=8.0)  # scale 2
    a, b = unit_scale(f)
    assert a.dtype == b.dtype == torch.float64
    assert torch.equal(a, torch.ones(4, 3, dtype=torch.float64))
    assert torch.equal(b, torch.ones(2, 4, dtype=torch.float64))
    g = LoraFactors(a=torch.ones(1, 3), b=torch.ones(2, 1), alpha=3.0)  # scale 3: sBA = 3
    # f: s B A = 2 * (4 * 0.5) = 4 per entry
    assert torch.equal(dense_delta([f, g], [0.5, 0.25]), torch.full((2, 3), 0.5 * 4 + 0.25 * 3))


def test_ffa_is_exact_with_the_shared_frozen_a():
    # clients train B only; A is the plan's slice of the shared A_0
    _, ups, res = _run_round("ffa", lambda c, p: _random(p.spec.rank, int(c), a=p.adapter))
    assert _rel_error(res, ups) <= 1e-6
    for m in SHAPES:  # A_0 did not move
        assert torch.equal(res.adapter[m].a[:2], ups[0].factors[m].a)


def test_one_factor_strategies_ask_for_one_factor():
    """FFA-LoRA trains B on a frozen shared A in every round; RoLoRA alternates B, A, B."""
    ffa = build_strategy("ffa", {}, _ctx())
    for rnd in (1, 2, 3):
        assert {p.parts for p in ffa.configure_train(rnd, _clients()).values()} == {"B"}
    rolora = build_strategy("rolora", {}, _ctx())
    got = []
    for rnd in (1, 2, 3):
        plans = rolora.configure_train(rnd, _clients())
        (parts,) = {p.parts for p in plans.values()}
        got.append(parts)
        ups = []
        for c in IDS:
            frozen = {("a" if parts == "B" else "b"): plans[c].adapter}
            ups.append(_update(c, _random(plans[c].spec.rank, int(c), **frozen), rnd))
        rolora.aggregate_train(rnd, ups)
    assert got == ["B", "A", "B"]


def test_rolora_is_exact_in_both_kinds_of_round():
    strat, ups, res = _run_round(
        "rolora", lambda c, p: _random(p.spec.rank, int(c), a=p.adapter)
    )  # round 1 trains B
    assert _rel_error(res, ups) <= 1e-6
    strat, ups2, res2 = _run_round(
        "rolora", lambda c, p: _random(p.spec.rank, 10 + int(c), b=p.adapter), 2, strat
    )  # round 2 trains A with the round-1 B frozen (nonzero now)
    assert _rel_error(res2, ups2) <= 1e-6


def test_flexlora_global_is_exact_and_svd_matches_dense():
    strat, ups, res = _run_round("flexlora", lambda c, p: _random(p.spec.rank, int(c)))
    assert _rel_error(res, ups) <= 1e-6
    for m in SHAPES:
        dense_sv = torch.linalg.svdvals(_ideal(ups, m))
        g = res.adapter[m]
        _, sv, _ = svd_from_stacks(g.a.double(), g.b.double() * g.scale)
        k = min(len(sv), len(dense_sv))
        assert torch.allclose(sv[:k], dense_sv[:k], rtol=1e-5, atol=1e-8)
        for r in RANKS:  # each rank gets the leading r singular values (Eckart-Young)
            f = strat.for_rank(r)[m]
            assert torch.allclose(torch.linalg.svdvals(_product(f))[:r], dense_sv[:r], rtol=1e-4)


def test_svd_from_stacks_equals_dense_svd():
    g = torch.Generator().manual_seed(3)
    a, b = (
        torch.randn(7, 40, generator=g, dtype=torch.float64),
        torch.randn(30, 7, generator=g, dtype=torch.float64),
    )
    u, s, v = svd_from_stacks(a, b)
    assert torch.allclose(s, torch.linalg.svdvals(b @ a)[:7], rtol=1e-10)
    assert torch.allclose(u @ torch.diag(s) @ v.T, b @ a, atol=1e-10)


def test_stack_and_product_norm():
    fs = [LoraFactors(torch.randn(r, 5), torch.randn(6, r), 4.0) for r in (1, 3)]
    a, b = stack(fs, [0.25, 0.75])
    want = 0.25 * _product(fs[0]) + 0.75 * _product(fs[1])
    assert torch.allclose(b.double() @ a.double(), want, atol=1e-10)
    assert product_norm(fs[1]) == pytest.approx(float(_product(fs[1]).norm()), rel=1e-5)


def test_inexact_strategies_print_their_error():
    """FedIT (zero-padded to r_max) and HetLoRA on the same factors: inexact, and by how much."""
    errors = {}
    for label, name, opts in (
        ("fedavg (zero-padded FedIT)", "hetlora", {"weighting": "examples"}),
        ("hetlora (norm-weighted)", "hetlora", {}),
    ):
        strat = build_strategy(name, opts, _ctx())
        _, ups, res = _run_round(name, lambda c, p: _random(p.spec.rank, int(c)), strat=strat)
        errors[label] = _rel_error(res, ups)
    print("\nrelative error vs Delta W* (ranks 2/4/8/16):", errors)
    assert all(e > 0.1 for e in errors.values())  # cross terms: far from exact


def test_flora_fresh_factors_are_seeded_by_run_and_round():
    """Each round's fresh LoRA is the same for the same run seed and round (resume, Ray), and
    differs between rounds and between run seeds."""

    def plans(seed, rnd):
        ctx = _ctx()
        ctx = StrategyContext(initial=ctx.initial, spec=SPEC, seed=seed, ranks=ctx.ranks)
        return build_strategy("flora", {}, ctx).configure_train(rnd, _clients())

    def a_of(p):
        return p["3"].adapter["m.q_proj"].a  # the rank-16 client's fresh A

    assert torch.equal(a_of(plans(0, 1)), a_of(plans(0, 1)))
    assert not torch.equal(a_of(plans(0, 1)), a_of(plans(0, 2)))
    assert not torch.equal(a_of(plans(0, 1)), a_of(plans(1, 1)))
    for p in plans(0, 2).values():  # fresh B = 0: each client starts from the merged base
        assert all(not bool(f.b.any()) for f in p.adapter.values())


def test_hetlora_norm_weights_padding_and_self_pruning_by_hand():
    """Client 0 (rank 1, scale 2): s B A = 2 e1 e1^T, norm 2; client 1 (rank 2, scale 1):
    s B A = 0.5 I, norm sqrt(0.5). Weights 2 / (2 + sqrt .5) and sqrt .5 / (2 + sqrt .5);
    A and the scale-folded B are zero-padded to rank 2 and averaged with them."""
    spec = LoraSpec(rank=2, alpha=2.0, target_modules=("q_proj",))
    ctx = StrategyContext(
        initial=init_factors({"m.q_proj": (2, 2)}, spec, seed=0), spec=spec, seed=0,
        ranks=TierRanks(tiers=(1, 2), client_ids=("0", "1")),
    )  # fmt: skip
    strat = build_strategy("hetlora", {}, ctx)
    clients = [ClientInfo(Header("r", 0, "fp", "", 10, c), "cpu") for c in ("0", "1")]
    assert {c: p.spec.rank for c, p in strat.configure_train(1, clients).items()} == {
        "0": 1, "1": 2}  # fmt: skip
    one = LoraFactors(a=torch.tensor([[1.0, 0.0]]), b=torch.tensor([[1.0], [0.0]]), alpha=2.0)
    two = LoraFactors(a=torch.eye(2), b=0.5 * torch.eye(2), alpha=2.0)
    ups = [
        LoraUpdate(Header("r", 1, "fp", "h", 10, "0"), {"m.q_proj": one}),
        LoraUpdate(Header("r", 1, "fp", "h", 10, "1"), {"m.q_proj": two}, {"prune_rank": 0.0}),
    ]
    res = strat.aggregate_train(1, ups)
    w0 = 2 / (2 + 0.5**0.5)
    w1 = 1 - w0
    g = res.adapter["m.q_proj"]
    assert torch.allclose(g.a.double(), torch.tensor([[1.0, 0.0], [0.0, w1]], dtype=torch.float64))
    want_b = torch.tensor([[2 * w0 + 0.5 * w1, 0.0], [0.0, 0.5 * w1]], dtype=torch.float64)
    assert torch.allclose(g.b.double() * g.scale, want_b)
    assert res.metrics == {"hetlora_clients": 2.0, "hetlora_pruned_clients": 1.0}
    # client 1 asked to prune (to rank 0: at least 1 is kept) and trains at rank 1 from now on
    assert {c: p.spec.rank for c, p in strat.configure_train(2, clients).items()} == {
        "0": 1, "1": 1}  # fmt: skip
    assert strat.state_dict()["pruned"] == {"1": 1}


def test_rank_operation_edges_by_hand():
    f = LoraFactors(torch.arange(6.0).reshape(3, 2), torch.arange(12.0).reshape(4, 3), 3.0)
    same = truncate(f, 3)  # to its own rank: the same factors, scale 1
    assert torch.equal(same.a, f.a) and torch.equal(same.b, f.b) and same.alpha == 3.0
    two = truncate(f, 2)
    assert two.a.tolist() == [[0.0, 1.0], [2.0, 3.0]] and two.alpha == 2.0
    assert two.b.tolist() == [[0.0, 1.0], [3.0, 4.0], [6.0, 7.0], [9.0, 10.0]]
    with pytest.raises(AggregationError, match="^cannot truncate rank 3 to a larger rank 4$"):
        truncate(f, 4)
    with pytest.raises(AggregationError, match="^no factors to combine$"):
        dense_delta([], [])
    with pytest.raises(ValueError, match="zip"):  # one weight per factor pair, no fewer
        stack([f, f], [0.5])
    with pytest.raises(ValueError, match="zip"):
        dense_delta([f], [0.5, 0.5])
    zero = LoraFactors(a=torch.zeros(2, 2), b=torch.zeros(4, 2), alpha=2.0)
    assert product_norm(zero) == 0.0
    a, b = stack([f, zero], [1.0, 1.0])  # ranks 3 + 2 stacked along the rank axis
    assert a.shape == (5, 2) and b.shape == (4, 5)


@pytest.mark.parametrize("name", ["flora", "flexlora", "ffa", "rolora"])
def test_unweighted_option_gives_the_plain_mean_of_products(name):
    one_factor = name in ("ffa", "rolora")
    strat = build_strategy(name, {"weighted": False}, _ctx())
    plans = strat.configure_train(1, _clients())
    ups = []
    for c in IDS:
        frozen_a = plans[c].adapter if one_factor else None
        ups.append(_update(c, _random(plans[c].spec.rank, int(c), a=frozen_a)))
    res = strat.aggregate_train(1, ups)
    for m in SHAPES:
        want = sum(_product(u.factors[m]) for u in ups) / len(ups)
        assert torch.allclose(_product(res.adapter[m]), want, rtol=1e-5, atol=1e-6)


def test_flexlora_plans_follow_the_latest_global_and_pad_beyond_its_rank():
    """Round 3's plans come from round 2's global (not a cached SVD of round 1's); a client
    whose rank exceeds the global's gets zero components beyond it."""
    strat, _, _ = _run_round("flexlora", lambda c, p: _random(p.spec.rank, int(c)))
    plans = strat.configure_train(2, _clients())
    ups = [_update(c, _random(plans[c].spec.rank, 30 + int(c)), 2) for c in IDS]
    res2 = strat.aggregate_train(2, ups)
    plans3 = strat.configure_train(3, _clients())
    for m in SHAPES:
        want = _best_rank(_product(res2.adapter[m]), 16)
        assert torch.allclose(_product(plans3["3"].adapter[m]), want, rtol=1e-4, atol=1e-5)
    solo = build_strategy("flexlora", {}, _ctx())
    solo.configure_train(1, _clients())
    solo.aggregate_train(1, [_update("0", _random(2, 0))])  # the global has rank 2
    f = solo.for_rank(4)["m.q_proj"]
    assert f.a.shape == (4, 20) and not f.a[2:].any() and not f.b[:, 2:].any()
    assert f.a[:2].any()
    state = solo.state_dict()
    fresh = build_strategy("flexlora", {}, _ctx())
    fresh.load_state_dict(state)
    assert torch.equal(fresh.for_rank(2)["m.q_proj"].a, solo.for_rank(2)["m.q_proj"].a)


def test_rolora_can_start_with_a_and_refuses_another_first_factor():
    from fedpeft.errors import StrategyError

    strat = build_strategy("rolora", {"first": "A"}, _ctx())
    assert [strat.part(r) for r in (1, 2, 3)] == ["A", "B", "A"]
    with pytest.raises(StrategyError, match="strategy.options.first must be 'A' or 'B', got 'C'"):
        build_strategy("rolora", {"first": "C"}, _ctx())


def test_plans_share_one_object_per_rank_and_caps_apply():
    from fedpeft.algorithms.hetero import initial_unit, plans_from_global, ranks_for

    ctx = _ctx()
    clients = _clients()
    assert ranks_for(ctx, 1, clients, {}) == dict(zip(IDS, RANKS, strict=True))
    assert ranks_for(ctx, 1, clients, {"3": 5, "0": 9}) == {"0": 2, "1": 4, "2": 8, "3": 5}
    glob = initial_unit(ctx, 16)
    reg = {"reg_lambda": 0.5, "reg_gamma": 0.9}
    plans = plans_from_global(ctx, glob, {"a": 4, "b": 4, "c": 2}, parts="A", options=reg)
    assert plans["a"] is plans["b"] and plans["a"] is not plans["c"]  # encoded once per rank
    p = plans["c"]
    assert (p.spec.rank, p.spec.alpha, p.parts, p.options) == (2, 16.0, "A", reg)
    # the rank-16 start's first 8 components are the run's rank-8 init (A), B = 0
    for m, f in ctx.initial.items():
        assert torch.equal(glob[m].a[:8], f.a) and not glob[m].b.any() and glob[m].alpha == 16.0
    same = initial_unit(ctx, 8)  # the run's own rank: its initial adapter, scale folded
    assert all(torch.equal(same[m].a, f.a) for m, f in ctx.initial.items())


class _RoundRanks:
    """A rank policy that depends on the round: rank 1 in odd rounds, 2 in even ones."""

    max_rank = 2

    def assign(self, server_round, clients):
        return {c.client_id: 1 + (server_round + 1) % 2 for c in clients}


TWO = [ClientInfo(Header("r", 0, "fp", "", 10, c), "cpu") for c in ("0", "1")]


def _rank2_ctx(ranks=None) -> StrategyContext:
    """One module (2 x 2) at rank 2, alpha 2 (scale 1), with an optional rank policy."""
    spec = LoraSpec(rank=2, alpha=2.0, target_modules=("q_proj",))
    return StrategyContext(initial=init_factors({"m.q_proj": (2, 2)}, spec, seed=0), spec=spec,
                           seed=0, ranks=ranks)  # fmt: skip


def _hetlora(options, ranks=None):
    return build_strategy("hetlora", options, _rank2_ctx(ranks))


def test_hetlora_example_weights_small_norms_and_the_all_zero_fallback_by_hand():
    """Client 0 has A = I, client 1 A = 3 I (rank 2, scale 1), so the averaged A is
    (w + 3 (1 - w)) I and B = w B_0 + (1 - w) B_1 for client 0's weight w.
    weighting = examples: n = 30, 10 -> w = 3/4 (the norms 1 and 3 would give 1/4). Norm
    weights whose norms sum below 1 are still norm weights: ||B_0 A_0|| = 0.1, ||B_1 A_1|| = 0.3
    -> w = 1/4 (n = 30, 10 would give 3/4). All-zero updates (B = 0) fall back to example
    weights: n = 10, 30 -> w = 1/4."""

    def up(cid, n, a, b):
        f = LoraFactors(a=a * torch.eye(2), b=torch.tensor(b), alpha=2.0)
        return LoraUpdate(Header("r", 1, "fp", "h", n, cid), {"m.q_proj": f})

    for options, b0, b1, n, w in (
        ({"weighting": "examples"}, [[1.0, 0], [0, 0]], [[0, 0], [0, 1.0]], (30, 10), 0.75),
        ({}, [[0.1, 0], [0, 0]], [[0, 0], [0, 0.1]], (30, 10), 0.25),
        ({}, [[0.0, 0], [0, 0]], [[0, 0], [0, 0.0]], (10, 30), 0.25),
    ):  # fmt: skip
        strat = _hetlora(options)
        strat.configure_train(1, TWO)
        g = strat.aggregate_train(1, [up("0", n[0], 1.0, b0), up("1", n[1], 3.0, b1)])
        got = g.adapter["m.q_proj"]
        want_a = (w + 3 * (1 - w)) * torch.eye(2, dtype=torch.float64)
        assert torch.allclose(got.a.double(), want_a), options
        want_b = w * torch.tensor(b0, dtype=torch.float64) + (1 - w) * torch.tensor(b1).double()
        assert torch.allclose((got.b * got.scale).double(), want_b, atol=1e-7), options


def test_hetlora_sends_its_self_pruning_options_and_asks_the_policy_with_the_round():
    strat = _hetlora({"reg_lambda": 0.1, "reg_gamma": 0.5}, ranks=_RoundRanks())
    plans = strat.configure_train(1, TWO)
    assert [p.options for p in plans.values()] == [{"reg_lambda": 0.1, "reg_gamma": 0.5}] * 2
    assert {p.parts for p in plans.values()} == {"AB"}
    assert {c: p.spec.rank for c, p in plans.items()} == {"0": 1, "1": 1}
    assert {c: p.spec.rank for c, p in strat.configure_train(2, TWO).items()} == {
        "0": 2, "1": 2}  # fmt: skip


def test_hetlora_self_pruned_ranks_survive_its_state_and_old_states_have_none():
    strat = _hetlora({})
    strat.configure_train(1, TWO)
    f = LoraFactors(a=torch.eye(2), b=torch.eye(2), alpha=2.0)
    strat.aggregate_train(1, [LoraUpdate(Header("r", 1, "fp", "h", 10, "1"), {"m.q_proj": f},
                                         {"prune_rank": 1.0})])  # fmt: skip
    state = strat.state_dict()
    back = _hetlora({})
    back.load_state_dict(state)
    assert {c: p.spec.rank for c, p in back.configure_train(2, TWO).items()} == {
        "0": 2, "1": 1}  # fmt: skip
    old = {k: v for k, v in state.items() if k != "pruned"}  # a state saved before pruning
    fresh = _hetlora({})
    fresh.load_state_dict(old)
    assert {p.spec.rank for p in fresh.configure_train(2, TWO).values()} == {2}


def test_rank_helpers_keep_the_product_whatever_the_scale():
    """Globals, initial adapters and previous stacks whose scale alpha / r is not 1 keep their
    product (alpha / r) B A, by hand."""
    from fedpeft.algorithms.hetero import initial_unit, padded_sum, stacked_updates
    from fedpeft.lora.rank_ops import check_modules, for_client, pad, unit_spec

    g = LoraFactors(a=torch.tensor([[1.0, 2.0], [3.0, 4.0]]), b=torch.tensor([[1.0, 0.0],
                    [0.0, 2.0]]), alpha=6.0)  # fmt: skip  # rank 2, scale 3
    got = for_client({"m": g}, LoraSpec(rank=1, alpha=4.0, target_modules=("q",)))["m"]
    # first component, B divided by the client's scale 4: 3 * [1, 0] / 4
    assert got.a.tolist() == [[1.0, 2.0]] and got.b.tolist() == [[0.75], [0.0]]
    assert got.alpha == 4.0
    with pytest.raises(
        AggregationError, match="^m: the global adapter has rank 2, the client needs 3$"
    ):
        for_client({"m": g}, LoraSpec(rank=3, alpha=3.0, target_modules=("q",)))
    with pytest.raises(AggregationError, match="^cannot pad rank 3 down to 2$"):
        pad(torch.zeros(3, 4), 2, 0)
    with pytest.raises(ValueError, match="^padded_sum of no updates$"):
        padded_sum([], "m", [], 2, "A")
    spec = LoraSpec(rank=4, alpha=8.0, target_modules=("q", "v"), dropout=0.1)
    assert unit_spec(spec, 3) == LoraSpec(rank=3, alpha=3.0, target_modules=("q", "v"),
                                          dropout=0.1)  # fmt: skip
    start = {"m": LoraFactors(a=torch.tensor([[1.0, 0.0]]), b=torch.tensor([[2.0], [0.0]]),
                              alpha=3.0)}  # fmt: skip  # rank 1, scale 3
    ctx = StrategyContext(initial=start, spec=LoraSpec(1, 3.0, ("q",)), seed=0)
    unit = initial_unit(ctx, 1)["m"]
    assert unit.b.tolist() == [[6.0], [0.0]] and unit.alpha == 1.0
    previous = {"m": LoraFactors(a=torch.tensor([[1.0, 0.0]]), b=torch.tensor([[1.0], [1.0]]),
                                 alpha=2.0)}  # fmt: skip  # a stack of rank 1 at scale 2
    new = LoraFactors(a=torch.tensor([[0.0, 1.0]]), b=torch.tensor([[2.0], [0.0]]), alpha=1.0)
    up = LoraUpdate(Header("r", 1, "fp", "h", 10, "0"), {"m": new})
    out = stacked_updates([up], ["m"], [0.5], previous)["m"]
    # 2 [1, 1]^T [1, 0] + 0.5 [2, 0]^T [0, 1] = [[2, 1], [2, 0]]
    assert (out.scale * out.b @ out.a).tolist() == [[2.0, 1.0], [2.0, 0.0]]
    f = LoraFactors(torch.zeros(1, 2), torch.zeros(2, 1), 1.0)
    wide = LoraFactors(torch.zeros(1, 3), torch.zeros(2, 1), 1.0)
    with pytest.raises(AggregationError) as err:
        check_modules({"a": {"m": f}, "b": {"m": wide}}, "x")
    assert str(err.value) == "client b sent 'm' as (2 x 3), client a as (2 x 2)"
    many = {f"n{i}": f for i in range(4)}
    with pytest.raises(AggregationError) as err:
        check_modules({"a": {"m": f}, "b": many}, "x")
    assert str(err.value) == (
        "client b adapted other modules than client a (differing: ['m', 'n0', 'n1']); "
        "strategy 'x' needs the same modules from every client"
    )


@pytest.mark.parametrize("name", ["ffa", "hetlora", "flexlora", "flora", "rolora"])
def test_rank_policies_are_asked_with_the_round_and_a_fresh_state_loads(name):
    """A policy whose ranks depend on the round gets the round; the state of a strategy that
    has not aggregated yet loads into a fresh one, which then plans like the original."""
    strat = build_strategy(name, {}, _rank2_ctx(_RoundRanks()))
    fresh = build_strategy(name, {}, strat.ctx)
    fresh.load_state_dict(strat.state_dict())
    assert {c: p.spec.rank for c, p in strat.configure_train(1, TWO).items()} == {
        "0": 1, "1": 1}  # fmt: skip
    assert {c: p.spec.rank for c, p in strat.configure_train(2, TWO).items()} == {
        "0": 2, "1": 2}  # fmt: skip
    assert {c: p.spec.rank for c, p in fresh.configure_train(2, TWO).items()} == {
        "0": 2, "1": 2}  # fmt: skip
    # FFA-LoRA trains B; RoLoRA trains B in odd rounds (A in even); the others both factors
    want = "B" if name in ("ffa", "rolora") else "AB"
    assert {p.parts for p in strat.configure_train(3, TWO).values()} == {want}
