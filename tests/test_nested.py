"""Nested-rank training (``strategy.options.nested``) and the rank-energy measurement."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.algorithms.base import StrategyContext
from fedpeft.algorithms.flexlora import FlexLora
from fedpeft.algorithms.hetlora import HetLora
from fedpeft.algorithms.nested import NESTED, nested_round
from fedpeft.client.trainer import ClientData, RoundHooks
from fedpeft.config import TrainConfig
from fedpeft.data.tasks import TextPair
from fedpeft.data.tokenize import encode_pairs
from fedpeft.lora.handle import init_factors
from fedpeft.lora.rank_ops import rank_energy
from fedpeft.lora.ranks import FixedRanks
from fedpeft.wire.messages import ClientInfo, Header, LoraFactors, LoraSpec, TrainInstruction

SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
IDS = torch.tensor([[1, 5, 9, 13, 2, 7]])


def _ins(adapter, nested: bool, seed: int = 5) -> TrainInstruction:
    return TrainInstruction(
        Header("run", 1, "fp", SPEC.config_hash(), 0, "0"), SPEC,
        TrainConfig(local_steps=4, batch_size=4, lr=1e-2), adapter, seed,
        options={NESTED: True} if nested else {},
    )  # fmt: skip


def _random(h, name):
    g = torch.Generator().manual_seed(1)
    return {
        m: LoraFactors(torch.randn(4, i, generator=g) * 0.3, torch.randn(o, 4, generator=g), 8.0)
        for m, (o, i) in h.module_shapes(name).items()
    }


def test_the_mask_trains_exactly_the_truncated_prefix(tiny_handle):
    """With truncation b drawn, the model is the rank-b adapter at the same scale
    (alpha_b / b = alpha / r), and the masked components get no gradient."""
    h = tiny_handle
    name = h.ensure_adapter(SPEC)
    full = _random(h, name)
    h.set_factors(name, full)
    assert nested_round(h, name, _ins(full, nested=False), None) == RoundHooks()  # no option
    hooks = nested_round(h, name, _ins(full, nested=True), None)
    try:
        model = h.peft_model(name)
        with h.training(name):
            model.eval()  # no dropout: compare logits exactly
            params = h.trainable_parameters(name, "AB")
            logits = model(input_ids=IDS).logits
            logits.sum().backward()
            grads = [p.grad.clone() for p in params]
        drawn = hooks.finish()  # the round's mean drawn rank: the one b drawn so far
        b = int(drawn["nested_mean_rank"])
        assert b == 1  # what seed 5 draws first: the test is only as strong as b < 4
    finally:
        hooks.close()
    spec_b = LoraSpec(rank=b, alpha=8.0 * b / 4, target_modules=SPEC.target_modules)
    nb = h.ensure_adapter(spec_b)
    h.set_factors(nb, {m: LoraFactors(f.a[:b], f.b[:, :b], spec_b.alpha) for m, f in full.items()})
    with torch.no_grad():
        prefix = h.peft_model(nb)(input_ids=IDS).logits
    assert torch.allclose(logits.detach(), prefix, atol=1e-5)
    for p, g in zip(params, grads, strict=True):  # A (r, in): rows past b; B: columns past b
        tail = g[b:] if p.shape[0] == 4 else g[:, b:]
        assert torch.count_nonzero(tail) == 0
    with torch.no_grad():  # closed: the full adapter again
        h.set_factors(name, full)
        after = h.peft_model(name)(input_ids=IDS).logits
    assert not torch.allclose(after, prefix, atol=1e-5)


def test_nested_training_draws_a_rank_per_step_and_is_reproducible(tiny_handle):
    h = tiny_handle
    name = h.ensure_adapter(SPEC)
    start = init_factors(h.module_shapes(name), SPEC, 0)
    start = {m: LoraFactors(f.a, torch.randn_like(f.b) * 0.01, f.alpha) for m, f in start.items()}
    pairs = [TextPair(prompt=f"word {i}", target=f"meaning {i}") for i in range(8)]
    data = ClientData("0", encode_pairs(h.tokenizer, pairs, 32, False))
    a = HetLora.trainer.fit(h, _ins(start, nested=True), data)
    b = HetLora.trainer.fit(h, _ins(start, nested=True), data)
    plain = HetLora.trainer.fit(h, _ins(start, nested=False), data)
    assert 1 <= a.metrics["nested_mean_rank"] <= 4 and "nested_mean_rank" not in plain.metrics
    assert all(torch.equal(a.factors[m].a, b.factors[m].a) for m in start)
    assert any(not torch.equal(a.factors[m].b, plain.factors[m].b) for m in start)
    # the shared model has no hook left: training without the option equals a fresh trainer's
    again = FlexLora.trainer.fit(h, _ins(start, nested=False), data)
    assert all(torch.equal(again.factors[m].b, plain.factors[m].b) for m in start)


@pytest.mark.parametrize("cls", [HetLora, FlexLora])
def test_the_option_travels_to_every_client(cls):
    init = {"m": LoraFactors(torch.zeros(4, 3), torch.zeros(5, 4), 8.0)}
    ctx = StrategyContext(init, LoraSpec(4, 8.0, ("m",)), 0, ranks=FixedRanks(4, {"1": 2}))
    clients = [ClientInfo(Header("r", 0, "fp", "", 10, str(i)), "cpu") for i in range(2)]
    plans = cls(cls.Config(nested=True), ctx).configure_train(1, clients)
    assert all(p.options.get(NESTED) is True for p in plans.values())
    plans = cls(cls.Config(), ctx).configure_train(1, clients)
    assert all(NESTED not in p.options for p in plans.values())


def test_rank_energy_known_values():
    """B A with singular values 3 and 1 (scale 1): shares 0.9 and 0.1 of the energy."""
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # (2, 3)
    b = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # (3, 2)
    shares, effective = rank_energy({"m": LoraFactors(a, b, 2.0)})
    assert shares == pytest.approx([0.9, 0.1])
    assert effective == pytest.approx(math.exp(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1))))
    flat, eff = rank_energy({"m": LoraFactors(a, torch.eye(3)[:, :2] * 2, 2.0)})
    assert flat == pytest.approx([0.5, 0.5]) and eff == pytest.approx(2.0)
    assert rank_energy({"m": LoraFactors(a, torch.zeros(3, 2), 2.0)}) == ([0.0, 0.0], 0.0)


@pytest.mark.parametrize("name", ["hetlora", "flexlora"])
def test_the_nested_option_passes_the_conformance_checks(name):
    from fedpeft.testing import check_strategy

    assert "refusals" in check_strategy(name, {"nested": True})
