"""Client-level DP: accounting against a known value, the mechanism, the budget stop."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from fedpeft.algorithms.base import StrategyContext
from fedpeft.algorithms.fedavg import FedAvg
from fedpeft.algorithms.ffa import FfaLora
from fedpeft.algorithms.wrappers.dp import DpAggregation
from fedpeft.config import DpConfig
from fedpeft.errors import AggregationError
from fedpeft.privacy import PrivacyAccountant, PrivacyBudgetExhausted, clip_and_noise, gaussian
from fedpeft.simulation.runner import simulate
from fedpeft.wire.messages import ClientInfo, Header, LoraFactors, LoraSpec, LoraUpdate
from fedpeft.wire.zo import ZoUpdate


def _gdp_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of mu-GDP at delta (Dong, Roth and Su 2019, Corollary 2.13)."""

    def gap(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(gap, 0.0, 200.0)


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 4), (2.0, 10), (0.8, 1)])
def test_pld_accountant_matches_the_exact_gaussian_value(z, rounds):
    """T unsampled Gaussian rounds of multiplier z are exactly sqrt(T)/z-GDP."""
    acc = PrivacyAccountant(DpConfig(noise_multiplier=z, delta=1e-5))
    exact = _gdp_epsilon(math.sqrt(rounds) / z, 1e-5)
    assert acc.epsilon(rounds) == pytest.approx(exact, rel=1e-4)
    rdp = PrivacyAccountant(DpConfig(noise_multiplier=z, delta=1e-5, accountant="rdp"))
    assert exact <= rdp.epsilon(rounds) <= 1.5 * exact  # RDP is an upper bound


def _rdp_reference(z: float, rounds: int, q: float = 1.0) -> float:
    """RDP epsilon straight from dp_accounting, composed here."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    event = dp_accounting.GaussianDpEvent(z)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    acc = RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(acc.get_epsilon(1e-5))


@pytest.mark.parametrize("z", [0.2, 0.01])
def test_tiny_noise_reports_the_rdp_bound_without_building_a_huge_pld(z):
    """Where RDP already says epsilon > 64, PLD is not built (at z = 0.01 it would need more
    than 23 GiB); the RDP bound is the answer."""
    acc = PrivacyAccountant(DpConfig(noise_multiplier=z, delta=1e-5))
    assert _rdp_reference(z, 3) > 64
    assert acc.epsilon(3) == _rdp_reference(z, 3)


def test_rdp_accountant_and_poisson_amplification_match_the_library():
    rdp = PrivacyAccountant(DpConfig(noise_multiplier=1.0, delta=1e-5, accountant="rdp"))
    assert rdp.epsilon(4) == _rdp_reference(1.0, 4)
    sampled = PrivacyAccountant(
        DpConfig(noise_multiplier=1.0, delta=1e-5, accountant="rdp", amplification="poisson"),
        sample_rate=0.1,
    )
    assert sampled.epsilon(4) == _rdp_reference(1.0, 4, q=0.1)
    full = PrivacyAccountant(
        DpConfig(noise_multiplier=1.0, delta=1e-5, amplification="poisson"), sample_rate=1.0
    )  # everyone sampled: no amplification
    assert full.epsilon(4) == PrivacyAccountant(DpConfig(noise_multiplier=1.0)).epsilon(4)
    none = PrivacyAccountant(DpConfig(noise_multiplier=1.0, delta=1e-5), sample_rate=0.1)
    assert none.epsilon(4) == full.epsilon(4)  # amplification "none": q is ignored
    assert PrivacyAccountant(DpConfig(noise_multiplier=1.0)).epsilon(0) == 0.0


def test_known_value_and_amplification():
    acc = PrivacyAccountant(DpConfig(noise_multiplier=1.0, delta=1e-5))
    assert acc.epsilon(4) == pytest.approx(9.9973, abs=1e-3)  # mu = 2
    sampled = PrivacyAccountant(
        DpConfig(noise_multiplier=1.0, delta=1e-5, amplification="poisson"), sample_rate=0.1
    )
    assert sampled.epsilon(4) < acc.epsilon(4) / 2


def test_budget_stops_before_the_round_that_would_exceed_it():
    cfg = DpConfig(noise_multiplier=1.0, delta=1e-5, max_epsilon=7.0)
    acc = PrivacyAccountant(cfg)
    acc.check_next()
    assert acc.step() == pytest.approx(4.377, abs=1e-3)
    acc.check_next()
    assert acc.step() < 7.0
    with pytest.raises(PrivacyBudgetExhausted, match=r"round 3 would reach epsilon 8.38"):
        acc.check_next()
    state = acc.state_dict()
    fresh = PrivacyAccountant(cfg)
    fresh.load_state_dict(state)
    assert fresh.epsilon() == acc.epsilon()


SPEC = LoraSpec(rank=1, alpha=1.0, target_modules=("m",))
SENT = {"m": LoraFactors(a=torch.zeros(1, 2), b=torch.zeros(2, 1), alpha=1.0)}


def _update(cid: str, values: list[float]) -> LoraUpdate:
    a = torch.tensor([values[:2]], dtype=torch.float32)  # (1, 2)
    b = torch.tensor([[values[2]], [values[3]]], dtype=torch.float32)  # (2, 1)
    return LoraUpdate(Header("r", 1, "f", "h", 10, cid), {"m": LoraFactors(a, b, 1.0)})


def _clients(n: int) -> list[ClientInfo]:
    return [ClientInfo(Header("r", 0, "f", "", 10, str(i)), "cpu") for i in range(n)]


def _dp(strategy: str, z: float, seed: int = 3) -> DpAggregation:
    ctx = StrategyContext(initial=SENT, spec=SPEC, seed=seed)
    inner = FedAvg(FedAvg.Config(), ctx) if strategy == "fedavg" else FfaLora(FfaLora.Config(), ctx)
    cfg = DpConfig(noise_multiplier=z, clip_norm=1.0)
    return DpAggregation(inner, cfg, clients_per_round=4, num_clients=8, seed=seed)


def _lora_round(dp: DpAggregation, strategy: str, rnd: int = 1) -> list[float]:
    dp.configure_train(rnd, _clients(3))  # 3 of the expected 4 answered: divide by 4 anyway
    ups = [_update("0", [3, 4, 0, 0]), _update("1", [0, 0, 0.3, 0.4]), _update("2", [0, 0, 0, 1])]
    if strategy == "ffa":  # FFA trains B only: A came back as it was sent
        ups = [_update(u.header.client_id, [0, 0, *_flat(u)[2:]]) for u in ups]
    return _flat(dp.aggregate_train(rnd, ups).adapter)


@pytest.mark.parametrize("strategy", ["fedavg", "ffa"])
def test_lora_release_is_the_clipped_mean_over_the_expected_clients(strategy):
    """Without noise (z = 0) the release is exactly sum_k clip(d_k) / k, by hand."""
    got = _lora_round(_dp(strategy, 0.0), strategy)
    if strategy == "fedavg":  # [3, 4] has norm 5 -> [0.6, 0.8]; the others have norm <= 1
        want = [0.6 / 4, 0.8 / 4, 0.3 / 4, (0.4 + 1) / 4]
    else:
        want = [0, 0, 0.3 / 4, (0.4 + 1) / 4]
    assert got == pytest.approx(want, abs=1e-7)


@pytest.mark.parametrize("strategy", ["fedavg", "ffa"])
def test_lora_release_noise_lands_on_the_trained_coordinates_only_and_is_seeded(strategy):
    clean = _lora_round(_dp(strategy, 0.0), strategy)
    noisy = _lora_round(_dp(strategy, 2.0), strategy)
    noise = [n - c for n, c in zip(noisy, clean, strict=True)]
    trained = range(4) if strategy == "fedavg" else range(2, 4)  # FFA: A gets no noise
    assert all((abs(x) > 1e-9) == (i in trained) for i, x in enumerate(noise))
    assert _lora_round(_dp(strategy, 2.0), strategy) == noisy  # same seed and round
    assert _lora_round(_dp(strategy, 2.0, seed=4), strategy) != noisy
    dp = _dp(strategy, 2.0)
    dp.configure_train(1, _clients(1))
    got = dp.aggregate_train(1, [_update("0", [0, 0, 0, 0])])
    assert got.metrics["dp_epsilon"] == pytest.approx(_gdp_epsilon(1 / 2.0, 1e-5), rel=1e-4)
    assert got.metrics["dp_noise_std"] == 0.5  # z C / k = 2 * 1 / 4


def _flat(x) -> list[float]:
    f = x.factors["m"] if isinstance(x, LoraUpdate) else x["m"]
    return [*f.a.reshape(-1).tolist(), *f.b.reshape(-1).tolist()]


def test_zeroth_order_release_clips_each_client_and_adds_noise_on_every_direction():
    ctx = StrategyContext(initial=SENT, spec=SPEC, seed=0)
    inner = FedAvg(FedAvg.Config(), ctx)  # only the transform is checked here
    dp = DpAggregation(
        inner, DpConfig(noise_multiplier=1.0, clip_norm=1.0), 2, 4, seed=0, zo=True, zo_shape=(1, 8)
    )
    ups = [
        ZoUpdate(Header("r", 1, "f", "h", 50, "0"), np.array([1, 1], np.uint16),
                 np.array([3.0, 1.0], np.float32)),
        ZoUpdate(Header("r", 1, "f", "h", 5, "1"), np.array([2], np.uint16),
                 np.array([0.5], np.float32)),
    ]  # fmt: skip
    out = dp._zo(1, ups)
    assert [u.header.num_examples for u in out] == [1, 1]  # equal weights
    assert out[0].scalars[:2].tolist() == pytest.approx([0.75, 0.25])  # (3+1) -> norm 1
    assert out[1].scalars.tolist() == [0.5]
    assert out[0].seeds[2:].tolist() == list(range(8))  # noise on every direction
    noise = out[0].scalars[2:].astype(np.float64) / 2  # the strategy weights each update 1/m
    assert np.count_nonzero(noise) == 8  # noise on every direction of the pool
    again = dp._zo(1, ups)[0].scalars[2:]
    assert np.array_equal(again, out[0].scalars[2:])  # seeded by (run seed, round)
    assert not np.array_equal(dp._zo(2, ups)[0].scalars[2:], again)


def test_a_clients_secure_contribution_is_clipped_masked_and_noised():
    v = np.array([3.0, 4.0, 12.0])
    assert clip_and_noise(v, 26.0, 0.0).tolist() == [3.0, 4.0, 12.0]  # norm 13 <= 26: kept
    assert clip_and_noise(v, 6.5, 0.0) == pytest.approx([1.5, 2.0, 6.0])  # halved to norm 6.5
    mask = np.array([1.0, 1.0, 0.0])  # the frozen coordinate is dropped before clipping
    assert clip_and_noise(v, 1.0, 0.0, mask) == pytest.approx([0.6, 0.8, 0.0])
    big = np.zeros(100_000)
    half = (np.arange(100_000) % 2).astype(np.float64)
    noisy = clip_and_noise(big, 1.0, 0.3, half)
    assert not noisy[half == 0].any()  # no noise off the mask
    assert float(noisy[half == 1].std()) == pytest.approx(0.3, rel=0.02)
    assert abs(float(noisy[half == 1].mean())) < 0.01


def test_secure_noise_has_the_right_spread():
    x = gaussian(200_000, 2.0, 0, 1, secure=True)
    assert abs(x.mean()) < 0.03 and x.std() == pytest.approx(2.0, rel=0.02)
    assert not np.array_equal(x[:10], gaussian(10, 2.0, 0, 1, secure=True))


@pytest.mark.parametrize("secure", [False, True])
def test_noise_has_the_requested_spread(secure):
    """Empirical mean and std of 200k draws against the requested N(0, 1.7^2)."""
    x = gaussian(200_000, 1.7, 5, 2, secure=secure)
    assert x.dtype == np.float64 and x.shape == (200_000,)
    assert abs(float(x.mean())) < 0.02 and float(x.std()) == pytest.approx(1.7, rel=0.01)


WIDE = 4000  # coordinates per factor, so the release's empirical std is tight


@pytest.mark.parametrize("secure", [False, True])
def test_lora_release_noise_std_is_z_times_clip_over_k(secure):
    """Clients that changed nothing: the release is the noise alone, std z C / k = 0.375."""
    sent = {"m": LoraFactors(a=torch.zeros(1, WIDE), b=torch.zeros(WIDE, 1), alpha=1.0)}
    ctx = StrategyContext(initial=sent, spec=SPEC, seed=1)
    cfg = DpConfig(noise_multiplier=1.5, clip_norm=2.0, secure_noise=secure)
    dp = DpAggregation(FedAvg(FedAvg.Config(), ctx), cfg, clients_per_round=8, num_clients=8,
                       seed=1)  # fmt: skip
    dp.configure_train(1, _clients(2))
    ups = [LoraUpdate(Header("r", 1, "f", "h", 10, str(i)), sent) for i in range(2)]
    got = np.array(_flat(dp.aggregate_train(1, ups).adapter))
    assert float(got.std()) == pytest.approx(1.5 * 2.0 / 8, rel=0.03)
    assert abs(float(got.mean())) < 0.02


def test_zeroth_order_noise_std_is_z_times_clip_over_k():
    ctx = StrategyContext(initial=SENT, spec=SPEC, seed=0)
    dp = DpAggregation(
        FedAvg(FedAvg.Config(), ctx), DpConfig(noise_multiplier=0.5, clip_norm=4.0), 4, 4,
        seed=7, zo=True, zo_shape=(2, WIDE),
    )  # fmt: skip
    ups = [
        ZoUpdate(Header("r", 1, "f", "h", 5, str(i)), np.array([i], np.uint16),
                 np.array([0.0], np.float32))
        for i in range(3)
    ]  # fmt: skip
    out = dp._zo(1, ups)
    noise = out[0].scalars[1:].astype(np.float64) / 3  # the strategy weights each update 1/m
    assert len(noise) == 2 * WIDE
    assert float(noise.std()) == pytest.approx(0.5 * 4.0 / 4, rel=0.03)


def test_accountant_is_restored_with_the_strategy_state():
    """After 2 rounds, save, load into a fresh wrapper: round 3 reports epsilon of 3 rounds
    (sqrt(3)/z-GDP), and a budget that allows only 2 rounds stops round 3."""
    z = 2.0

    def wrapper(max_epsilon: float = 0.0) -> DpAggregation:
        ctx = StrategyContext(initial=SENT, spec=SPEC, seed=3)
        cfg = DpConfig(noise_multiplier=z, clip_norm=1.0, max_epsilon=max_epsilon)
        return DpAggregation(FedAvg(FedAvg.Config(), ctx), cfg, 2, 2, seed=3)

    dp = wrapper()
    for rnd in (1, 2):
        dp.configure_train(rnd, _clients(2))
        dp.aggregate_train(rnd, [_update("0", [1, 0, 0, 0]), _update("1", [0, 1, 0, 0])])
    state = dp.state_dict()
    fresh = wrapper()
    fresh.load_state_dict(state)
    fresh.configure_train(3, _clients(2))
    got = fresh.aggregate_train(3, [_update("0", [1, 0, 0, 0]), _update("1", [0, 1, 0, 0])])
    two, three = (_gdp_epsilon(math.sqrt(t) / z, 1e-5) for t in (2, 3))
    assert got.metrics["dp_epsilon"] == pytest.approx(three, rel=1e-4)
    budget = wrapper(max_epsilon=(two + three) / 2)
    budget.load_state_dict(state)
    with pytest.raises(PrivacyBudgetExhausted, match="round 3 would reach"):
        budget.configure_train(3, _clients(2))


def test_dp_run_reports_epsilon_every_round_and_stops_at_the_budget(tiny_config, tmp_path, cache):
    eps2 = PrivacyAccountant(DpConfig(noise_multiplier=1.0)).epsilon(2)
    cfg = tiny_config(
        "federation.rounds=4",
        "strategy.name=ffa",
        "dp.noise_multiplier=1.0",
        "dp.clip_norm=0.5",
        f"dp.max_epsilon={eps2 + 0.01}",
    )
    summary = simulate(cfg, tmp_path, quiet=True, cache=cache)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["dp_epsilon"] == pytest.approx(eps2)
    assert summary["rounds"] == 2 and "round 3 would reach epsilon" in summary["stopped"]
    assert summary["dp_epsilon"] == pytest.approx(eps2)


@pytest.mark.sim
def test_seed_scalar_dp_accounts_every_round_across_a_retry_and_a_resume(
    repo, tmp_path, monkeypatch
):
    """FedKSeed under DP (z = 2): round t reports the exact epsilon of sqrt(t)/z-GDP. Round 2
    fails once and is retried (not counted twice); round 3 fails for good, the run is resumed
    from its checkpoint and round 3 still reports sqrt(3)/z: the accountant came back."""
    from fedpeft.cache import ProcessCache
    from fedpeft.config.load import load_config
    from fedpeft.errors import RoundError
    from fedpeft.server import coordinator

    cfg = load_config(
        repo / "simulations" / "tiny_fedkseed.toml",
        ["federation.rounds=3", "federation.num_clients=3", "data.max_examples_per_client=40",
         "eval.examples=16", "zo.local_steps=10", "dp.noise_multiplier=2", "dp.clip_norm=1",
         "validation.round_retries=1"],
    )  # fmt: skip
    real, calls = coordinator.exchange, []

    def flaky(grid, instructions, nodes, server_round, *args, **kwargs):
        got = real(grid, instructions, nodes, server_round, *args, **kwargs)
        calls.append(server_round)
        if (server_round == 2 and calls.count(2) == 1) or server_round == 3:
            got.updates = []
        return got

    monkeypatch.setattr(coordinator, "exchange", flaky)
    with pytest.raises(RoundError, match="round 3 failed"):
        simulate(cfg, tmp_path, quiet=True, cache=ProcessCache())
    assert calls == [1, 2, 2, 3, 3]
    monkeypatch.setattr(coordinator, "exchange", real)
    simulate(cfg, tmp_path, quiet=True, cache=ProcessCache(), resume=True)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for t in (1, 2, 3):
        assert rows[t]["dp_epsilon"] == pytest.approx(
            _gdp_epsilon(math.sqrt(t) / 2, 1e-5), rel=1e-4
        )
        assert rows[t]["dp_noise_std"] == pytest.approx(2 * 1 / 3)  # z C / k
    assert rows[2]["attempts"] == 2


def test_dp_refuses_combinations_that_break_it(tiny_config):
    from fedpeft.errors import ConfigError

    with pytest.raises(ConfigError, match="itself: set robust.rule = 'mean', robust.clip_norm"):
        tiny_config("dp.noise_multiplier=1", "robust.rule=median")
    with pytest.raises(ConfigError, match="dp.clip_norm must be > 0"):
        tiny_config("dp.noise_multiplier=1", "dp.clip_norm=0")


def test_dp_wrapper_edges_by_hand():
    """Empty input, a strategy that sends clients different factors, the metrics it adds,
    and the distributed mode (clients noised their own contributions: only accounting)."""
    dp = _dp("fedavg", 1.0)
    with pytest.raises(AggregationError, match="^dp aggregation got no updates$"):
        dp.aggregate_train(1, [])
    dp.configure_train(1, _clients(2))
    dp._sent["1"] = ({k: v for k, v in SENT.items()}, "AB")  # another object: other factors
    with pytest.raises(AggregationError, match=r"use fedavg or ffa\) \(client 1 was sent other"):
        dp.aggregate_train(1, [_update("0", [0, 0, 0, 0]), _update("1", [0, 0, 0, 0])])
    quiet = _dp("fedavg", 0.0)
    quiet.configure_train(1, _clients(1))
    got = quiet.aggregate_train(1, [_update("0", [0, 0, 0, 0])])
    assert set(got.metrics) == {"fedavg_clients", "dp_epsilon", "dp_delta", "dp_noise_std"}
    assert got.metrics["dp_delta"] == 1e-5 and got.metrics["dp_noise_std"] == 0.0
    ctx = StrategyContext(initial=SENT, spec=SPEC, seed=3)
    dist = DpAggregation(FedAvg(FedAvg.Config(), ctx), DpConfig(noise_multiplier=2.0), 2, 4, 3,
                         distributed=True)  # fmt: skip
    dist.configure_train(1, _clients(2))
    summed = [_update("0", [1, 2, 3, 4])]  # what the secure sum handed over: used as it is
    res = dist.aggregate_train(1, summed)
    assert _flat(res.adapter) == [1.0, 2.0, 3.0, 4.0]
    assert res.metrics["dp_epsilon"] == pytest.approx(_gdp_epsilon(1 / 2.0, 1e-5), rel=1e-4)
    assert res.metrics["dp_noise_std"] == 2.0 * 1.0 / 2  # z C / k


def test_zeroth_order_release_scales_by_m_over_k_and_sorts_clients():
    """Three of k = 4 clients answered: each upload is clipped, then scaled by m / k = 3 / 4
    (the strategy's 1 / m weight becomes 1 / k), in client-id order, with weight 1 each."""
    ctx = StrategyContext(initial=SENT, spec=SPEC, seed=0)
    dp = DpAggregation(FedAvg(FedAvg.Config(), ctx), DpConfig(noise_multiplier=0.0, clip_norm=10),
                       4, 4, seed=0, zo=True, zo_shape=(1, 4))  # fmt: skip
    ups = [
        ZoUpdate(Header("r", 1, "f", "h", 9, c), np.array([i], np.uint16),
                 np.array([float(i + 1)], np.float32))
        for i, c in ((2, "c"), (0, "a"), (1, "b"))
    ]  # fmt: skip
    out = dp._zo(1, sorted(ups, key=lambda u: u.header.client_id))
    assert [u.header.client_id for u in out] == ["a", "b", "c"]
    assert [u.header.num_examples for u in out] == [1, 1, 1]
    assert out[1].scalars.tolist() == [2.0 * 3 / 4] and out[2].scalars.tolist() == [3.0 * 3 / 4]
    assert out[0].scalars[:1].tolist() == [1.0 * 3 / 4]
    assert out[0].scalars[1:].tolist() == [0.0] * 4  # z = 0: the noise pairs carry zeros


def test_budget_below_one_counts_and_reaching_it_exactly_is_allowed():
    """A budget under 1 is a budget like any other; a round whose epsilon equals the budget
    may run (only passing it stops); the message ends with the rounds run so far."""
    one = PrivacyAccountant(DpConfig(noise_multiplier=10.0, delta=1e-5)).epsilon(1)
    assert one == pytest.approx(_gdp_epsilon(0.1, 1e-5), rel=1e-4)  # about 0.46
    tight = PrivacyAccountant(DpConfig(noise_multiplier=10.0, delta=1e-5, max_epsilon=0.3))
    with pytest.raises(PrivacyBudgetExhausted, match=r"stopping after 0 rounds$"):
        tight.check_next()
    exact = PrivacyAccountant(DpConfig(noise_multiplier=10.0, delta=1e-5, max_epsilon=one))
    exact.check_next()  # epsilon(1) == budget: allowed


def test_secure_contribution_clips_small_vectors_adds_fresh_noise_everywhere_in_float64():
    assert clip_and_noise(np.array([0.3, 0.4]), 0.1, 0.0) == pytest.approx([0.06, 0.08])  # 0.1/0.5
    assert clip_and_noise(np.full(3, 0.5, np.float32), 10.0, 0.0).dtype == np.float64
    base = np.full(200_000, 0.5)  # norm 223.6, below the clip: kept as it is
    first, second = clip_and_noise(base, 1e6, 0.2), clip_and_noise(base, 1e6, 0.2)
    noise = first - 0.5
    assert abs(float(noise.mean())) < 0.005  # added to the value, not replacing it
    assert float(noise.std()) == pytest.approx(0.2, rel=0.02)
    assert len(np.unique(noise[:1000])) == 1000  # every coordinate its own draw
    assert not np.array_equal(first, second)  # the client's secret: fresh on every call


@pytest.mark.parametrize("strategy", ["fedavg", "ffa"])
def test_lora_release_clips_each_change_large_or_small_to_the_norm(strategy):
    """C = 0.1, k = 4, changes to B only: (3, 4) -> x 0.1/5; (0.03, 0.04) has norm 0.05 < C
    and is kept; (0.3, 0.4) -> x 0.1/0.5. Release B = sum / 4, by hand."""
    ctx = StrategyContext(initial=SENT, spec=SPEC, seed=3)
    inner = FedAvg(FedAvg.Config(), ctx) if strategy == "fedavg" else FfaLora(FfaLora.Config(), ctx)
    dp = DpAggregation(inner, DpConfig(noise_multiplier=0.0, clip_norm=0.1), 4, 8, seed=3)
    dp.configure_train(1, _clients(3))
    ups = [_update("0", [0, 0, 3, 4]), _update("1", [0, 0, 0.03, 0.04]),
           _update("2", [0, 0, 0.3, 0.4])]  # fmt: skip
    got = _flat(dp.aggregate_train(1, ups).adapter)
    assert got == pytest.approx([0, 0, (0.06 + 0.03 + 0.06) / 4, (0.08 + 0.04 + 0.08) / 4])


def test_dp_message_for_strategies_that_send_different_factors():
    dp = _dp("fedavg", 1.0)
    dp.configure_train(1, _clients(2))
    dp._sent["1"] = ({k: v for k, v in SENT.items()}, "AB")
    want = (r"^dp averages updates of clients that were all sent the same factors; this "
            r"strategy sends different ones \(use fedavg or ffa\)")  # fmt: skip
    with pytest.raises(AggregationError, match=want):
        dp.aggregate_train(1, [_update("0", [0, 0, 0, 0]), _update("1", [0, 0, 0, 0])])


def test_wrapper_accounts_poisson_sampling_at_clients_per_round_over_all_clients():
    cfg = DpConfig(noise_multiplier=1.0, delta=1e-5, accountant="rdp", amplification="poisson")
    ctx = StrategyContext(initial=SENT, spec=SPEC, seed=3)
    dp = DpAggregation(FedAvg(FedAvg.Config(), ctx), cfg, clients_per_round=2, num_clients=20,
                       seed=3)  # fmt: skip
    dp.configure_train(1, _clients(2))
    got = dp.aggregate_train(1, [_update("0", [1, 0, 0, 0]), _update("1", [0, 1, 0, 0])])
    assert got.metrics["dp_epsilon"] == _rdp_reference(1.0, 1, q=0.1)


def test_noise_is_seeded_by_run_and_round_or_fresh_when_secure():
    def lora(seed: int, rnd: int, secure: bool = False) -> list[float]:
        ctx = StrategyContext(initial=SENT, spec=SPEC, seed=seed)
        cfg = DpConfig(noise_multiplier=1.0, clip_norm=1.0, secure_noise=secure)
        dp = DpAggregation(FedAvg(FedAvg.Config(), ctx), cfg, 2, 2, seed=seed)
        dp.configure_train(rnd, _clients(1))
        return _flat(dp.aggregate_train(rnd, [_update("0", [0, 0, 0, 0])]).adapter)

    assert lora(3, 1) == lora(3, 1) and lora(3, 1) != lora(3, 2) and lora(3, 1) != lora(4, 1)
    assert lora(3, 1, secure=True) != lora(3, 1, secure=True)

    def zo(seed: int, secure: bool = False) -> np.ndarray:
        ctx = StrategyContext(initial=SENT, spec=SPEC, seed=seed)
        cfg = DpConfig(noise_multiplier=1.0, clip_norm=1.0, secure_noise=secure)
        dp = DpAggregation(FedAvg(FedAvg.Config(), ctx), cfg, 2, 2, seed=seed, zo=True,
                           zo_shape=(1, 16))  # fmt: skip
        up = ZoUpdate(Header("r", 1, "f", "h", 5, "0"), np.array([0], np.uint16),
                      np.array([0.0], np.float32))  # fmt: skip
        return dp._zo(1, [up])[0].scalars[1:]

    assert np.array_equal(zo(3), zo(3)) and not np.array_equal(zo(3), zo(4))
    assert not np.array_equal(zo(3, secure=True), zo(3, secure=True))


def _fedkseed_dp(noise_multiplier: float, k: int) -> DpAggregation:
    """FedKSeed (K = 4 seeds, lr 0.1) under DP with clip 1 and k clients per round."""
    from fedpeft.algorithms.fedkseed import FedKSeed
    from fedpeft.wire.zo import ZoSpec

    spec = ZoSpec(algorithm="fedkseed", target="full", num_seeds=4, pool_seed=1, lr=0.1,
                  local_steps=2)  # fmt: skip
    ctx = StrategyContext(initial={}, spec=SPEC, seed=0, zo=spec, zo_blocks=1)
    cfg = DpConfig(noise_multiplier=noise_multiplier, clip_norm=1.0)
    return DpAggregation(FedKSeed(FedKSeed.Config(), ctx), cfg, k, k, seed=0, zo=True,
                         zo_shape=(1, 4))  # fmt: skip


def test_seed_scalar_dp_through_fedkseed_by_hand():
    """k = 4, C = 1, lr = 0.1, no noise: client a's direction sums (seed 0: 3 + 1 = 4) have
    norm 4 -> x 1/4; b's (seed 2: 0.5) are kept. FedKSeed's coefficients are lr times the
    clipped mean over k: seed 0: 0.1 * 1 / 4, seed 2: 0.1 * 0.5 / 4; the version is the round."""
    dp = _fedkseed_dp(0.0, 4)
    dp.configure_train(1, [ClientInfo(Header("r", 0, "f", "", 10, c), "cpu") for c in "ab"])
    ups = [
        ZoUpdate(Header("r", 1, "f", "h", 50, "b"), np.array([2], np.uint16),
                 np.array([0.5], np.float32)),
        ZoUpdate(Header("r", 1, "f", "h", 5, "a"), np.array([0, 0], np.uint16),
                 np.array([3.0, 1.0], np.float32)),
    ]  # fmt: skip
    got = dp.aggregate_train(1, ups)
    assert got.zo.version == 1
    assert got.zo.coeffs.shape == (1, 4)
    assert got.zo.coeffs[0].tolist() == pytest.approx([0.1 * 1 / 4, 0.0, 0.1 * 0.5 / 4, 0.0])
    assert got.metrics["dp_noise_std"] == 0.0


def _words(u1: list[int], u2: list[int]) -> bytes:
    """What os.urandom returns for the secure sampler: n little-endian words for u1, then n."""
    return np.array([*u1, *u2], dtype="<u8").tobytes()


def test_secure_sampler_known_values_from_fixed_bytes(monkeypatch):
    """Box-Muller on 53-bit uniforms: u1 = (w1 >> 11) 2^-53 + 2^-54 (never 0), u2 = (w2 >> 11)
    2^-53, x = std sqrt(-2 ln u1) cos(2 pi u2). By hand: zero bytes give u1 = 2^-54, u2 = 0,
    x = std sqrt(108 ln 2) (the largest draw, 8.65 std); w1 = w2 = 2^63 give u1 = 1/2 + 2^-54,
    u2 = 1/2, x = -std sqrt(2 ln 2) (to 1e-15); w2 = 2^62 gives u2 = 1/4, x = 0 (to 1e-15)."""
    monkeypatch.setattr(os, "urandom", lambda k: _words([0, 2**63, 2**63], [0, 2**63, 2**62]))
    got = gaussian(3, 2.0, 0, 0, secure=True)
    assert got[0] == pytest.approx(2.0 * math.sqrt(108 * math.log(2)), rel=1e-12)
    assert got[1] == pytest.approx(-2.0 * math.sqrt(2 * math.log(2)), rel=1e-12)
    assert abs(got[2]) < 1e-15
    monkeypatch.setattr(os, "urandom", lambda k: _words([2**63], [2**63]))
    noisy = clip_and_noise(np.array([1.0]), 10.0, 1.0)  # the noise is added, not subtracted
    assert noisy[0] == pytest.approx(1.0 - math.sqrt(2 * math.log(2)), rel=1e-12)


def test_lora_release_sums_in_float64_and_adds_the_secure_noise(monkeypatch):
    """k = 4, clip 10, changes of B (4, 0), (2^-22, 0), (2^-22, 0), (0, 0): the mean 1 + 2^-23
    is exact in float32 (a float32 running sum would give 1). With secure noise from fixed
    bytes (-sqrt(2 ln 2) z C / k on every trained coordinate) the release is that plus it."""
    ctx = StrategyContext(initial=SENT, spec=SPEC, seed=3)
    ups = [_update("0", [0, 0, 4.0, 0]), _update("1", [0, 0, 2**-22, 0]),
           _update("2", [0, 0, 2**-22, 0]), _update("3", [0, 0, 0, 0])]  # fmt: skip
    quiet = DpAggregation(FedAvg(FedAvg.Config(), ctx), DpConfig(0.0, clip_norm=10.0), 4, 4, 3)
    quiet.configure_train(1, _clients(4))
    assert _flat(quiet.aggregate_train(1, ups).adapter) == [0.0, 0.0, 1 + 2**-23, 0.0]
    monkeypatch.setattr(os, "urandom", lambda k: _words([2**63] * 4, [2**63] * 4))
    cfg = DpConfig(noise_multiplier=0.4, clip_norm=10.0, secure_noise=True)
    noisy = DpAggregation(FedAvg(FedAvg.Config(), ctx), cfg, 4, 4, 3)
    noisy.configure_train(1, _clients(4))
    noise = -math.sqrt(2 * math.log(2)) * 0.4 * 10.0 / 4
    got = _flat(noisy.aggregate_train(1, ups).adapter)
    assert got == pytest.approx([noise, noise, 1 + 2**-23 + noise, noise], rel=1e-6)


def test_seed_scalar_release_clips_small_sums_keeps_float32_and_seeds_noise_by_round():
    ctx = StrategyContext(initial=SENT, spec=SPEC, seed=0)
    dp = DpAggregation(FedAvg(FedAvg.Config(), ctx), DpConfig(0.0, clip_norm=0.1), 1, 1,
                       seed=0, zo=True, zo_shape=(1, 4))  # fmt: skip
    up = ZoUpdate(Header("r", 1, "f", "h", 5, "a"), np.array([0, 1], np.uint16),
                  np.array([0.3, 0.4], np.float32))  # fmt: skip
    other = ZoUpdate(Header("r", 1, "f", "h", 5, "b"), np.array([2], np.uint16),
                     np.array([0.05], np.float32))  # fmt: skip
    out, second = dp._zo(1, [up, other])  # norm 0.5 > 0.1: scaled by 0.2; m / k = 2
    assert out.scalars.dtype == second.scalars.dtype == np.float32
    assert out.scalars[:2].tolist() == pytest.approx([0.12, 0.16])
    assert second.scalars.tolist() == pytest.approx([0.1])  # norm 0.05 <= 0.1: kept

    def coeffs(server_round: int) -> np.ndarray:
        w = _fedkseed_dp(1.0, 1)
        w.configure_train(server_round, [ClientInfo(Header("r", 0, "f", "", 10, "a"), "cpu")])
        return w.aggregate_train(server_round, [up]).zo.coeffs

    assert np.array_equal(coeffs(1), coeffs(1)) and not np.array_equal(coeffs(1), coeffs(2))


def test_the_inner_strategy_is_told_the_round(round_recorder):
    rec = round_recorder(FedAvg(FedAvg.Config(), StrategyContext(SENT, SPEC, 3)))
    dp = DpAggregation(rec, DpConfig(1.0, clip_norm=10.0), 2, 2, 3)
    dp.configure_train(5, _clients(1))
    dp.aggregate_train(5, [_update("0", [0, 0, 0, 0])])
    assert rec.rounds == [("configure", 5), ("aggregate", 5)]


def _summed(dp: DpAggregation, updates: list, instructions: dict) -> list:
    """``updates`` clipped and summed as the coordinator folds a DP round (clip 1, k = 4)."""
    from fedpeft.server.fold import Fold

    fold = Fold(instructions, 1, None, False, 0.0, norm_clip=dp.config.clip_norm, divisor=dp.k)
    return fold.result([fold.add(u) for u in reversed(updates)])


@pytest.mark.parametrize("strategy", ["fedavg", "ffa"])
def test_a_folded_lora_release_is_the_unfolded_one(strategy):
    """The coordinator folds a DP round (each change clipped as it is summed, divided by k)
    and the wrapper adds only the noise: the same release as the wrapper clipping and
    summing the clients' own updates, to float32 rounding, noise included (same seed)."""
    from fedpeft.config import TrainConfig
    from fedpeft.wire.messages import TrainInstruction

    parts = "B" if strategy == "ffa" else "AB"
    ups = [_update("0", [3, 4, 0, 0]), _update("1", [0, 0, 0.3, 0.4]), _update("2", [0, 0, 0, 1])]
    if strategy == "ffa":
        ups = [_update(u.header.client_id, [0, 0, *_flat(u)[2:]]) for u in ups]
    ins = {
        c: TrainInstruction(
            Header("r", 1, "f", "", 0, c), SPEC, TrainConfig(), SENT, 0, parts=parts
        )  # fmt: skip
        for c in "012"
    }
    for z in (0.0, 2.0):
        dp = _dp(strategy, z)
        dp.configure_train(1, _clients(3))
        own = _flat(dp.aggregate_train(1, ups).adapter)
        dp = _dp(strategy, z)
        dp.configure_train(1, _clients(3))
        folded = dp.aggregate_train(1, _summed(dp, ups, ins))
        assert _flat(folded.adapter) == pytest.approx(own, abs=1e-7)
        assert folded.metrics["dp_noise_std"] == z / 4
    assert _flat(folded.adapter) != pytest.approx(_lora_round(_dp(strategy, 0.0), strategy))


def test_a_folded_seed_scalar_release_is_the_unfolded_one():
    """FedKSeed under DP (k = 4, clip 1), noise on: the coordinator's folded clipped mean plus
    the wrapper's noise gives the coefficients the wrapper gives from the clients' pairs."""
    from fedpeft.config import TrainConfig
    from fedpeft.wire.zo import ZoInstruction

    ups = [
        ZoUpdate(Header("r", 1, "f", "h", 50, "b"), np.array([2, 3], np.uint16),
                 np.array([0.5, -0.25], np.float32)),
        ZoUpdate(Header("r", 1, "f", "h", 5, "a"), np.array([0, 0], np.uint16),
                 np.array([3.0, 1.0], np.float32)),
    ]  # fmt: skip
    clients = [ClientInfo(Header("r", 0, "f", "", 10, c), "cpu") for c in "ab"]
    dp = _fedkseed_dp(1.5, 4)
    dp.configure_train(1, clients)
    own = dp.aggregate_train(1, ups)
    dp = _fedkseed_dp(1.5, 4)
    plans = dp.configure_train(1, clients)
    ins = {
        c: ZoInstruction(Header("r", 1, "f", "", 0, c), p.spec, TrainConfig(), p.sync, 0)
        for c, p in plans.items()
    }
    got = dp.aggregate_train(1, _summed(dp, ups, ins))
    assert got.zo.version == own.zo.version == 1
    assert np.allclose(got.zo.coeffs, own.zo.coeffs, rtol=0, atol=1e-8)
    clean = _fedkseed_dp(0.0, 4)
    clean.configure_train(1, clients)
    assert not np.allclose(got.zo.coeffs, clean.aggregate_train(1, ups).zo.coeffs, atol=1e-6)
