"""SCAFFOLD and FedSA-LoRA: known answers, both client halves, node state, rules."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from fedpeft.algorithms.base import StrategyContext
from fedpeft.algorithms.fedavg import FedAvg
from fedpeft.algorithms.fedsa import FedSaLora, personal_adapter
from fedpeft.algorithms.scaffold import STATE, Scaffold, next_variate
from fedpeft.cache import ProcessCache
from fedpeft.client.node_state import NodeState
from fedpeft.client.trainer import ClientData
from fedpeft.config import TrainConfig
from fedpeft.config.load import load_config
from fedpeft.data.tasks import TextPair
from fedpeft.data.tokenize import encode_pairs
from fedpeft.errors import ConfigError, ProtocolError
from fedpeft.lora.handle import init_factors
from fedpeft.simulation.runner import simulate
from fedpeft.testing import check_strategy
from fedpeft.wire.messages import (
    ClientInfo,
    Header,
    LoraFactors,
    LoraSpec,
    LoraUpdate,
    TrainInstruction,
)

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "simulations" / "tiny.toml")
SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))

# --------------------------------------------------------------------- SCAFFOLD on a quadratic
CURV = [1.0, 2.0, 5.0, 10.0]  # client i: f_i(w) = a_i / 2 ||w - t_i||^2
LR, K = 0.05, 10


def _targets() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4, generator=g, dtype=torch.float64) * 3 for _ in CURV]


def _as_factors(w: torch.Tensor) -> dict[str, LoraFactors]:
    return {"m": LoraFactors(w[:2].reshape(1, 2).clone(), w[2:].reshape(2, 1).clone(), 1.0)}


def _as_vector(f: dict[str, LoraFactors]) -> torch.Tensor:
    return torch.cat([f["m"].a.reshape(-1), f["m"].b.reshape(-1)])


def _federate(strategy, rounds: int, corrected: bool) -> torch.Tensor:
    """Local SGD on the quadratics, with SCAFFOLD's correction after every step (what the
    client half does after each optimizer step) and ``next_variate`` at the end."""
    clients = [ClientInfo(Header("r", 0, "fp", "", 10, str(i)), "cpu") for i in range(4)]
    ci = [torch.zeros(4, dtype=torch.float64) for _ in CURV]
    for rnd in range(1, rounds + 1):
        plans = strategy.configure_train(rnd, clients)
        updates = []
        for i, (a, t) in enumerate(zip(CURV, _targets(), strict=True)):
            plan = plans[str(i)]
            x = _as_vector(plan.adapter)
            c = _as_vector(plan.aux) if corrected else torch.zeros(4, dtype=torch.float64)
            y = x.clone()
            for _ in range(K):
                y = y - LR * a * (y - t)  # the local optimizer's step
                y = y - LR * (c - ci[i])  # SCAFFOLD's correction
            if corrected:
                ci[i] = next_variate(ci[i], c, x, y, K, LR)
            updates.append(LoraUpdate(Header("r", rnd, "fp", "h", 10, str(i)), _as_factors(y)))
        result = strategy.aggregate_train(rnd, updates)
    return _as_vector(result.adapter)


def test_scaffold_removes_the_drift_fedavg_has_on_heterogeneous_quadratics():
    """The global optimum of sum_i f_i is sum a_i t_i / sum a_i. FedAvg with 10 local steps
    converges elsewhere (weights 1 - (1 - lr a_i)^K instead of a_i); SCAFFOLD gets there."""
    t = _targets()
    best = sum(a * ti for a, ti in zip(CURV, t, strict=True)) / sum(CURV)
    zero = torch.zeros(4, dtype=torch.float64)
    ctx = StrategyContext(
        _as_factors(zero), LoraSpec(1, 1.0, ("m",)), 0,
        train=lambda r: TrainConfig(lr=LR, local_steps=K), num_clients=4,
    )  # fmt: skip
    fedavg = _federate(FedAvg(FedAvg.Config(weighted=False), ctx), 200, corrected=False)
    scaffold = _federate(Scaffold(Scaffold.Config(weighted=False), ctx), 200, corrected=True)
    assert float((fedavg - best).norm()) > 0.3  # drift
    assert float((scaffold - best).norm()) < 1e-6


def test_next_variate_is_option_ii():
    ci, c = torch.tensor([1.0]), torch.tensor([0.5])
    x, y = torch.tensor([2.0]), torch.tensor([1.0])
    assert next_variate(ci, c, x, y, steps=4, lr=0.1).item() == pytest.approx(1 - 0.5 + 1 / 0.4)


def test_scaffold_server_variate_follows_the_mean_change():
    """c <- c + (|S| / N) (-c + (x - x_new) / (K lr)); half the clients sampled."""
    init = _as_factors(torch.zeros(4, dtype=torch.float64))
    ctx = StrategyContext(
        init, LoraSpec(1, 1.0, ("m",)), 0,
        train=lambda r: TrainConfig(lr=0.5, local_steps=2), num_clients=4,
    )  # fmt: skip
    s = Scaffold(Scaffold.Config(), ctx)
    clients = [ClientInfo(Header("r", 0, "fp", "", 10, str(i)), "cpu") for i in range(2)]
    plans = s.configure_train(1, clients)
    assert all(torch.equal(_as_vector(p.aux), torch.zeros(4, dtype=torch.float64))
               for p in plans.values())  # fmt: skip
    ys = [torch.tensor([1.0, 0, 0, 2]), torch.tensor([3.0, 0, 0, 0])]
    ups = [LoraUpdate(Header("r", 1, "fp", "h", n, str(i)), _as_factors(y.double()))
           for i, (n, y) in enumerate(zip([10, 30], ys, strict=True))]  # fmt: skip
    s.aggregate_train(1, ups)
    mean = 0.25 * ys[0] + 0.75 * ys[1]  # example-weighted
    want = 0.5 * (-0.0 + (0 - mean) / (2 * 0.5))
    assert torch.allclose(_as_vector(s.c), want.double())
    back = Scaffold(Scaffold.Config(), ctx)
    back.load_state_dict(s.state_dict())
    assert torch.equal(_as_vector(back.configure_train(2, clients)["0"].aux), _as_vector(s.c))


# --------------------------------------------------------------------- the client halves
def _data(h) -> ClientData:
    pairs = [TextPair(prompt=f"word {i}", target=f"meaning {i}") for i in range(8)]
    return ClientData("0", encode_pairs(h.tokenizer, pairs, 32, False))


def _ins(adapter, parts="AB", aux=None, lr=1e-2, steps=3, run="run") -> TrainInstruction:
    return TrainInstruction(
        Header(run, 1, "fp", SPEC.config_hash(), 0, "0"), SPEC,
        TrainConfig(local_steps=steps, batch_size=4, lr=lr, max_grad_norm=0.0), adapter, 5,
        parts=parts, aux=aux,
    )  # fmt: skip


def _ctx() -> Context:
    return Context(1, 1, {}, RecordDict(), {})


def _node(ctx: Context | None = None, rnd: int = 1, run: str = "run") -> NodeState:
    return NodeState(ctx if ctx is not None else _ctx(), run, rnd)


def _start(h):
    shapes = h.module_shapes(h.ensure_adapter(SPEC))
    start = init_factors(shapes, SPEC, 0)
    return {m: replace(f, b=torch.randn_like(f.b) * 0.01) for m, f in start.items()}


def test_scaffold_client_keeps_option_ii_variate_and_applies_the_correction(tiny_handle):
    h, data, ctx = tiny_handle, _data(tiny_handle), _ctx()
    start = _start(h)
    zero = {m: LoraFactors(torch.zeros_like(f.a), torch.zeros_like(f.b), f.alpha)
            for m, f in start.items()}  # fmt: skip
    trainer = Scaffold.trainer
    up = trainer.fit(h, _ins(start, aux=zero), data, node=_node(ctx, 1))
    ci = _node(ctx, 2).load(STATE)
    assert ci is not None and _node(ctx, 1).load(STATE) is None  # round 1 reads nothing older
    for m, f in up.factors.items():  # c = c_i = 0: c_i+ = (x - y) / (K lr)
        want = (start[m].a - f.a) / (3 * 1e-2)
        assert torch.allclose(ci[f"{m}.A"], want, atol=1e-5)
    # round 2 with c = c_i: no correction, the same as with c = c_i = 0 from the same start
    same = {m: LoraFactors(ci[f"{m}.A"], ci[f"{m}.B"], f.alpha) for m, f in start.items()}
    corrected = trainer.fit(h, _ins(start, aux=same), data, node=_node(ctx, 2))
    fresh = trainer.fit(h, _ins(start, aux=zero), data, node=_node())
    for m in start:
        assert torch.allclose(corrected.factors[m].a, fresh.factors[m].a, atol=1e-6)
    # round 2 again (a retried round) reads round 1's c_i, not what the first try wrote;
    # c != c_i moves every step by -lr (c - c_i): a known shift on top of the same steps
    other = {m: LoraFactors(f.a + 1.0, f.b, f.alpha) for m, f in same.items()}
    shifted = trainer.fit(h, _ins(start, aux=other), data, node=_node(ctx, 2))
    moved = [float((shifted.factors[m].a - corrected.factors[m].a).mean()) for m in start]
    assert moved == pytest.approx([-3 * 1e-2] * len(start), rel=0.2)  # AdamW steps differ a bit
    with pytest.raises(ProtocolError, match="server control variate"):
        trainer.fit(h, _ins(start), data, node=_node())
    with pytest.raises(ProtocolError, match="node's state"):
        trainer.fit(h, _ins(start, aux=zero), data)


def test_fedsa_client_trains_both_sends_a_and_keeps_b(tiny_handle):
    h, data, ctx = tiny_handle, _data(tiny_handle), _ctx()
    start = _start(h)
    trainer = FedSaLora.trainer
    first = trainer.fit(h, _ins(start, parts="A"), data, node=_node(ctx, 1))
    own = _node(ctx, 2).load("fedsa-personal-b")
    assert own is not None
    for m, f in first.factors.items():
        assert not torch.equal(f.a, start[m].a)  # A trained and sent
        assert torch.equal(f.b, start[m].b)  # the reply's B is the one sent
        assert not torch.equal(own[m], start[m].b)  # B trained, kept on the node
    mine = personal_adapter(start, _node(ctx, 2))
    assert all(torch.equal(mine[m].b, own[m]) and torch.equal(mine[m].a, start[m].a)
               for m in start)  # fmt: skip
    assert personal_adapter(start, _node()) is start  # no state yet: the global adapter
    # round 2 starts from the kept B: training differs from a node without it
    again = trainer.fit(h, _ins(start, parts="A"), data, node=_node(ctx, 2))
    fresh = trainer.fit(h, _ins(start, parts="A"), data, node=_node())
    assert any(not torch.equal(again.factors[m].a, fresh.factors[m].a) for m in start)
    with pytest.raises(ProtocolError, match="sends back A only"):
        trainer.fit(h, _ins(start, parts="AB"), data, node=_node())


def test_node_state_is_per_run_and_a_round_reads_what_earlier_rounds_wrote():
    ctx = _ctx()

    def put(rnd: int, value: float, run: str = "a") -> None:
        NodeState(ctx, run, rnd).save("x", {"t": torch.full((2,), value)})

    def get(rnd: int, run: str = "a") -> float | None:
        got = NodeState(ctx, run, rnd).load("x")
        return None if got is None else float(got["t"][0])

    put(1, 1.0)
    assert get(1) is None and get(2) == 1.0 and get(2, run="b") is None
    put(2, 2.0)
    put(2, 2.5)  # round 2 again: replaces its own version, reads round 1's
    assert get(2) == 1.0 and get(3) == 2.5 and get(9) == 2.5
    put(5, 5.0)  # keeps 5 and the newest older one (2); round 1's version is dropped
    assert get(2) is None and get(5) == 2.5 and get(6) == 5.0
    put(6, 6.0, run="b")  # another run's save drops this run's versions
    assert get(7) is None and get(7, run="b") == 6.0


@pytest.mark.parametrize("name", ["scaffold", "fedsa"])
def test_both_pass_the_conformance_checks(name):
    assert "linear" in check_strategy(name)


# --------------------------------------------------------------------- runs and rules
SMALL = ["federation.rounds=2", "train.local_steps=2", "eval.examples=8",
         "data.max_examples_per_client=32", "eval.max_new_tokens=2"]  # fmt: skip


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_fedsa_personalized_eval_beats_its_unchanged_global_and_is_in_the_summary(tmp_path):
    cfg = load_config(TINY, [*SMALL, "strategy.name=fedsa", "eval.personalized=true"])
    summary = simulate(cfg, tmp_path, quiet=True, cache=ProcessCache())
    rows = _rows(tmp_path)
    assert rows[-1]["eval_loss"] == pytest.approx(rows[0]["eval_loss"])  # B = 0 globally
    assert rows[-1]["personal_eval_loss_mean"] < rows[0]["personal_eval_loss_mean"] - 0.05
    assert rows[-1]["personal_eval_loss_worst10"] >= rows[-1]["personal_eval_loss_mean"]
    assert rows[-1]["personal_eval_clients"] == 4
    assert summary["after"]["personal_eval_loss_mean"] == rows[-1]["personal_eval_loss_mean"]
    assert summary["before"]["personal_eval_loss_worst10"] == rows[0]["personal_eval_loss_worst10"]
    _rows_up_fedavg(tmp_path, "payload_up")
    # A only: FedAvg's tensor bytes times A's share of the adapter's elements (the whole
    # message also carries the header and the client's metrics)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "avg" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    numel = {k: math.prod(v) for k, v in sizes.items()}
    a_share = sum(n for k, n in numel.items() if "lora_A" in k) / sum(numel.values())
    assert (
        rows[1]["payload_up"]
        == a_share * _rows_up_fedavg(tmp_path, "payload_up")
        < 0.6 * (_rows_up_fedavg(tmp_path, "payload_up"))
    )
    assert rows[1]["bytes_up"] < _rows_up_fedavg(tmp_path, "bytes_up")


def _rows_up_fedavg(tmp_path: Path, key: str) -> int:
    out = tmp_path / "avg"
    if not (out / "metrics.jsonl").exists():
        simulate(load_config(TINY, SMALL), out, quiet=True, cache=ProcessCache())
    return int(_rows(out)[1][key])


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["strategy.name=scaffold", "train.epochs=1"],
         "train.epochs = 1.0 gives clients different numbers of local steps, but 'scaffold'"),
        (["strategy.name=fedkseed", "zo.num_seeds=64", "eval.personalized=true"],
         "eval.personalized is for LoRA strategies"),
        (["strategy.name=fedsa"], "'fedsa' keeps part of each client's model on the client"),
        (["strategy.name=scaffold", "ranks.mode=tiers", "ranks.tiers=[2,4]"],
         "ranks.mode = 'tiers' assigns clients different ranks, but 'scaffold' is a one-rank"),
    ],
)  # fmt: skip
def test_rules(overrides, problem):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems
