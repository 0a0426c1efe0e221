"""Heterogeneous ranks: which strategies reproduce Delta W* = sum_k p_k s_k B_k A_k, and how far.

Random factors of ranks 2/4/8/16 (alpha 16, so scales 8/4/2/1) on two modules. FLoRA, FFA-LoRA
and RoLoRA must be exact to 1e-6 relative error; FlexLoRA's global is exact and its per-rank
factors carry the dense matrix's leading singular values; FedIT (zero-padded) and HetLoRA
are inexact and their errors are printed (run with -s to see them).
"""

from __future__ import annotations

import pytest
import torch

from fedpeft.lora import init_factors
from fedpeft.rank_ops import dense_delta, product_norm, stack, svd_from_stacks
from fedpeft.ranks import TierRanks
from fedpeft.strategies.base import StrategyContext
from fedpeft.strategies.registry import build_strategy
from fedpeft.wire import ClientInfo, Header, LoraFactors, LoraSpec, LoraUpdate

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


def _ideal(updates, module):
    weights = [u.header.num_examples / sum(EXAMPLES) for u in updates]
    return dense_delta([u.factors[module] for u in updates], weights)


def _rel_error(result, updates):
    errs = []
    for m in SHAPES:
        ideal = _ideal(updates, m)
        got = result.adapter[m].delta().double()
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


def test_ffa_is_exact_with_the_shared_frozen_a():
    # clients train B only; A is the plan's slice of the shared A_0
    _, ups, res = _run_round("ffa", lambda c, p: _random(p.spec.rank, int(c), a=p.adapter))
    assert _rel_error(res, ups) <= 1e-6
    for m in SHAPES:  # A_0 did not move
        assert torch.equal(res.adapter[m].a[:2], ups[0].factors[m].a)


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
            assert torch.allclose(
                torch.linalg.svdvals(f.delta().double())[:r], dense_sv[:r], rtol=1e-4
            )


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
    assert torch.allclose(b @ a, dense_delta(fs, [0.25, 0.75]), atol=1e-10)
    assert product_norm(fs[1]) == pytest.approx(float(fs[1].delta().double().norm()), rel=1e-5)


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
