"""Server optimizers (``[server_opt]``): known answers, masking, resume, conformance, rules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedpeft.algorithms.base import StrategyContext
from fedpeft.algorithms.registry import build_strategy
from fedpeft.algorithms.wrappers.server_opt import ServerOptimizer
from fedpeft.config import ServerOptConfig
from fedpeft.config.load import load_config
from fedpeft.errors import AggregationError, ConfigError
from fedpeft.server.checkpoint import load_checkpoint, save_checkpoint
from fedpeft.testing import check_strategy
from fedpeft.wire.messages import ClientInfo, Header, LoraFactors, LoraSpec, LoraUpdate

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "simulations" / "tiny.toml")
SPEC = LoraSpec(rank=1, alpha=1.0, target_modules=("q",))


def _sent() -> dict[str, LoraFactors]:
    # one module, rank 1: A (1, 2), B (2, 1)
    return {"m.q": LoraFactors(torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0], [0.5]]), 1.0)}


def _clients(n: int) -> list[ClientInfo]:
    return [ClientInfo(Header("r", 0, "fp", "", 10, str(i)), "cpu") for i in range(n)]


def _update(cid: str, n: int, da: list[float], db: list[float], sent=None) -> LoraUpdate:
    f = (sent or _sent())["m.q"]
    a = f.a + torch.tensor([da])
    b = f.b + torch.tensor(db).reshape(2, 1)
    return LoraUpdate(Header("r", 1, "fp", "h", n, cid), {"m.q": LoraFactors(a, b, 1.0)})


def _wrapped(name: str, strategy: str = "fedavg", **opts) -> ServerOptimizer:
    inner = build_strategy(strategy, {}, StrategyContext(_sent(), SPEC, 0))
    return ServerOptimizer(inner, ServerOptConfig(name=name, **opts), example_weighted=True)


def _flat(result) -> torch.Tensor:
    f = result.adapter["m.q"]
    return torch.cat([f.a.reshape(-1), f.b.reshape(-1)]).double()


def _round(opt: ServerOptimizer, rnd: int, changes: list[tuple[int, list[float], list[float]]]):
    plans = opt.configure_train(rnd, _clients(len(changes)))
    sent = plans["0"].adapter
    ups = [_update(str(i), n, da, db, sent) for i, (n, da, db) in enumerate(changes)]
    return opt.aggregate_train(rnd, ups)


SENT_FLAT = torch.tensor([1.0, -1.0, 0.0, 0.5], dtype=torch.float64)
# two clients, 30 and 10 examples: the weighted mean change is 0.75 c0 + 0.25 c1
CHANGES = [(30, [0.02, 0.0], [0.01, -0.04]), (10, [-0.04, 0.04], [0.01, 0.0])]
MEAN = torch.tensor([0.005, 0.01, 0.01, -0.03], dtype=torch.float64)


def test_fedadam_first_step_is_the_papers_on_a_known_pseudo_gradient():
    """Reddi et al. Alg. 2, t = 0: m = (1 - b1) D, v = b2 tau^2 + (1 - b2) D^2,
    x += eta m / (sqrt(v) + tau); worked out by hand per coordinate."""
    opt = _wrapped("adam", lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    got = _flat(_round(opt, 1, CHANGES))
    want = [
        x + 0.01 * (0.1 * d) / (math.sqrt(0.99e-6 + 0.01 * d * d) + 1e-3)
        for x, d in zip(SENT_FLAT.tolist(), MEAN.tolist(), strict=True)
    ]
    # e.g. coordinate 3: d = -0.03, v = 9.99e-6, step = 0.01 * -0.003 / (3.1607e-3 + 1e-3)
    assert want[3] == pytest.approx(0.5 - 0.0072103, abs=1e-6)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-7)


def test_fedyogi_and_fedadagrad_second_moments_on_two_rounds():
    """Round 2 of each on the same pseudo-gradient, worked out coordinate by coordinate."""
    for name in ("yogi", "adagrad"):
        opt = _wrapped(name, lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
        _round(opt, 1, CHANGES)
        second = _flat(_round(opt, 2, CHANGES))
        first_x = SENT_FLAT.clone()
        x = first_x.tolist()
        m = v = None
        for _ in range(2):
            out = []
            m = [0.0] * 4 if m is None else m
            v = [1e-6] * 4 if v is None else v
            for i, d in enumerate(MEAN.tolist()):
                m[i] = 0.9 * m[i] + 0.1 * d
                if name == "adagrad":
                    v[i] = v[i] + d * d
                else:
                    v[i] = v[i] - 0.01 * d * d * math.copysign(1.0, v[i] - d * d)
                out.append(x[i] + 0.01 * m[i] / (math.sqrt(v[i]) + 1e-3))
            x = out
        assert torch.allclose(second, torch.tensor(x, dtype=torch.float64), atol=1e-7), name


def test_fedavgm_accumulates_momentum_and_with_none_is_fedavg():
    opt = _wrapped("avgm", lr=1.0, momentum=0.5)
    first = _flat(_round(opt, 1, CHANGES))
    assert torch.allclose(first, SENT_FLAT + MEAN, atol=1e-7)  # m_0 = D
    second = _flat(_round(opt, 2, CHANGES))
    assert torch.allclose(second, first + 1.5 * MEAN, atol=1e-7)  # m_1 = 0.5 D + D
    plain = build_strategy("fedavg", {}, StrategyContext(_sent(), SPEC, 0))
    no_momentum = _wrapped("avgm", lr=1.0, momentum=0.0)
    for strat in (plain, no_momentum):
        strat.configure_train(1, _clients(2))
    ups = [_update(str(i), n, da, db) for i, (n, da, db) in enumerate(CHANGES)]
    assert torch.allclose(
        _flat(no_momentum.aggregate_train(1, ups)), _flat(plain.aggregate_train(1, ups)), atol=1e-7
    )


def test_only_trained_factors_move_ffa_keeps_a():
    """FFA-LoRA trains B only: A never moves and its moments stay at their start."""
    opt = _wrapped("adam", strategy="ffa", lr=0.01)
    for rnd in (1, 2):
        plans = opt.configure_train(rnd, _clients(2))
        assert plans["0"].parts == "B"
        sent = plans["0"].adapter
        ups = [_update(str(i), n, [0.0, 0.0], db, sent) for i, (n, _, db) in enumerate(CHANGES)]
        res = opt.aggregate_train(rnd, ups)
        assert torch.equal(res.adapter["m.q"].a, sent["m.q"].a)
        assert not torch.equal(res.adapter["m.q"].b, sent["m.q"].b)
    m, v = opt.moments
    assert torch.equal(m[:2], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(v[:2], torch.full((2,), 1e-6, dtype=torch.float64))


def test_state_through_a_checkpoint_resumes_exactly(tmp_path):
    opt = _wrapped("yogi", lr=0.01)
    _round(opt, 1, CHANGES)
    save_checkpoint(tmp_path / "s.safetensors", opt.state_dict())
    back = _wrapped("yogi", lr=0.01)
    back.load_state_dict(load_checkpoint(tmp_path / "s.safetensors"))
    assert torch.equal(_flat(_round(opt, 2, CHANGES)), _flat(_round(back, 2, CHANGES)))
    with pytest.raises(AggregationError, match="server_opt.name is 'adam'"):
        _wrapped("adam").load_state_dict(opt.state_dict())


def test_refuses_updates_of_clients_sent_other_factors():
    opt = _wrapped("adam")
    opt.configure_train(1, _clients(1))
    with pytest.raises(AggregationError, match="were not planned"):
        opt.aggregate_train(1, [_update("0", 1, [0, 0], [0, 0]), _update("5", 1, [0, 0], [0, 0])])


@pytest.mark.parametrize("name", ["avgm", "adam", "yogi", "adagrad"])
@pytest.mark.parametrize("strategy", ["fedavg", "ffa", "rolora"])
def test_every_optimizer_over_every_linear_strategy_passes_the_conformance_checks(name, strategy):
    assert "state" in check_strategy(strategy, {}, ServerOptConfig(name=name))


def test_the_checks_fail_an_optimizer_that_ignores_the_updates(monkeypatch):
    from fedpeft.algorithms.wrappers import server_opt
    from fedpeft.testing import ConformanceError

    monkeypatch.setattr(server_opt, "server_step", lambda cfg, d, m, v, mask: torch.zeros_like(d))
    with pytest.raises(ConformanceError, match="depends"):
        check_strategy("fedavg", {}, ServerOptConfig(name="adam"))


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["server_opt.name=adam", "strategy.name=flora"], "server_opt.name = 'adam' steps the"),
        (["server_opt.name=yogi", "strategy.name=fedkseed"], "server_opt.name = 'yogi' steps"),
        (["server_opt.name=avgm", "strategy.name=ffa", "ranks.mode=tiers", "ranks.tiers=[2,4]"],
         "server_opt steps one set of factors every client was sent, but ranks.mode"),
        (["server_opt.name=adamw"], "server_opt.name must be one of"),
    ],
)  # fmt: skip
def test_rules_refuse_what_a_server_optimizer_cannot_step(overrides, problem):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_defaults_per_optimizer():
    assert ServerOptConfig(name="avgm").step_size == 1.0
    assert ServerOptConfig(name="adam").step_size == 1e-3
    assert ServerOptConfig(name="adam", lr=0.3).step_size == 0.3
