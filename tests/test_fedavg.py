"""FedIT maths: A and B averaged separately, weighted by examples; its known inexactness."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedpeft.algorithms.base import AggregateResult, StrategyContext
from fedpeft.algorithms.fedavg import FedAvg
from fedpeft.errors import AggregationError
from fedpeft.wire.messages import Header, LoraFactors, LoraSpec, LoraUpdate


def _product(f: LoraFactors) -> torch.Tensor:
    """``(alpha / r) B A`` in float64, written out here (not the wire type's ``delta``)."""
    return (f.alpha / f.a.shape[0]) * (f.b.double() @ f.a.double())  # (out, r) @ (r, in)


def _strategy(initial, weighted=True):
    spec = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    return FedAvg(
        FedAvg.Config(weighted=weighted), StrategyContext(initial=initial, spec=spec, seed=0)
    )


def test_weighted_average_of_each_factor(make_update):
    ups = [make_update(client=str(i), num_examples=n, seed=i) for i, n in enumerate((10, 30, 60))]
    res = _strategy(ups[0].factors).aggregate_train(1, ups)
    p = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    for m in ups[0].factors:
        want_a = sum(p[i] * ups[i].factors[m].a.double() for i in range(3))  # (r, in)
        want_b = sum(p[i] * ups[i].factors[m].b.double() for i in range(3))  # (out, r)
        assert torch.allclose(res.adapter[m].a.double(), want_a, atol=1e-6)
        assert torch.allclose(res.adapter[m].b.double(), want_b, atol=1e-6)
        assert res.adapter[m].alpha == 8.0


def test_unweighted_is_plain_mean(make_update):
    ups = [make_update(client=str(i), num_examples=n, seed=i) for i, n in enumerate((1, 1000))]
    res = _strategy(ups[0].factors, weighted=False).aggregate_train(1, ups)
    m = "m.q_proj"
    assert torch.allclose(
        res.adapter[m].a, (ups[0].factors[m].a + ups[1].factors[m].a) / 2, atol=1e-6
    )


def test_fedit_is_not_the_average_of_products(make_update):
    """B_bar A_bar != sum p_k B_k A_k in general: the documented cross-term error."""
    ups = [make_update(client=str(i), num_examples=10, seed=i) for i in range(4)]
    res = _strategy(ups[0].factors).aggregate_train(1, ups)
    m = "m.q_proj"
    ideal = sum(0.25 * _product(u.factors[m]) for u in ups)  # (out, in)
    got = _product(res.adapter[m])
    rel = float((got - ideal).norm() / ideal.norm())
    print(f"FedIT relative error vs sum_k p_k s_k B_k A_k on random factors: {rel:.3f}")
    assert rel > 0.3


def test_fedit_is_exact_when_clients_share_a(make_update):
    ups = [make_update(client=str(i), num_examples=5 * (i + 1), seed=i) for i in range(3)]
    shared_a = ups[0].factors["m.q_proj"].a
    ups = [
        dataclasses.replace(
            u,
            factors={
                m: LoraFactors(a=shared_a, b=f.b, alpha=f.alpha) for m, f in u.factors.items()
            },
        )
        for u in ups
    ]
    res = _strategy(ups[0].factors).aggregate_train(1, ups)
    p = [5 / 30, 10 / 30, 15 / 30]
    ideal = sum(p[i] * _product(ups[i].factors["m.q_proj"]) for i in range(3))
    assert torch.allclose(_product(res.adapter["m.q_proj"]), ideal, atol=1e-5)


def test_configure_train_sends_the_global_adapter_to_everyone(make_update):
    initial = make_update().factors
    strat = _strategy(initial)
    from fedpeft.wire.messages import ClientInfo, Header

    clients = [
        ClientInfo(header=Header("r", 0, "fp", "", 5, str(i)), device="cpu") for i in range(3)
    ]
    plans = strat.configure_train(1, clients)
    assert sorted(plans) == ["0", "1", "2"]
    for plan in plans.values():
        assert plan.adapter is initial
        assert plan.spec.rank == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_result_keeps_the_clients_dtype(make_update, dtype):
    ups = [make_update(client=str(i), seed=i, dtype=dtype) for i in range(2)]
    res = _strategy(ups[0].factors).aggregate_train(1, ups)
    assert res.adapter["m.q_proj"].a.dtype == dtype


def test_weights_follow_their_clients_whatever_the_reply_order():
    """Hand-computed: A = (1 * 2 + 3 * 6) / 4 = 5 and B = (1 * -1 + 3 * 3) / 4 = 2."""
    spec = LoraSpec(rank=1, alpha=1.0, target_modules=("q_proj",))
    sent = {"m": LoraFactors(a=torch.zeros(1, 2), b=torch.zeros(2, 1), alpha=1.0)}

    def up(cid: str, n: int, a: float, b: float) -> LoraUpdate:
        f = LoraFactors(a=torch.full((1, 2), a), b=torch.full((2, 1), b), alpha=1.0)
        return LoraUpdate(Header("r", 1, "f", "h", n, cid), {"m": f})

    ups = [up("b", 3, 6.0, 3.0), up("a", 1, 2.0, -1.0)]  # replies not in id order
    for order in (ups, ups[::-1]):
        res = FedAvg(FedAvg.Config(), StrategyContext(sent, spec, 0)).aggregate_train(1, order)
        assert res.adapter["m"].a.tolist() == [[5.0, 5.0]]
        assert res.adapter["m"].b.tolist() == [[2.0], [2.0]]


def _up(cid: str, n: int, rank: int = 1, alpha: float = 1.0, modules=("m",)) -> LoraUpdate:
    f = LoraFactors(a=torch.ones(rank, 2), b=torch.ones(2, rank), alpha=alpha)
    return LoraUpdate(Header("r", 1, "f", "h", n, cid), {m: f for m in modules})


def test_fedavg_refusals_name_the_client_and_what_differs():
    from fedpeft.errors import AggregationError

    spec = LoraSpec(rank=1, alpha=1.0, target_modules=("q_proj",))
    strat = FedAvg(FedAvg.Config(), StrategyContext(_up("x", 1).factors, spec, 0))
    cases = [
        ([_up("a", 1), _up("b", 1, modules=("m", "k"))],
         "client b adapted other modules than client a (differing: ['k']); strategy 'fedavg' "
         "needs the same"),
        ([_up("a", 1), _up("b", 1, rank=2)],
         "client b sent rank 2 (alpha 1.0) for 'm', client a rank 1 (alpha 1.0); strategy "
         "'fedavg' needs equal ranks - use a heterogeneous-rank strategy"),
        ([_up("a", 1), _up("b", 1, alpha=2.0)],
         "client b sent rank 1 (alpha 2.0) for 'm', client a rank 1 (alpha 1.0); strategy "
         "'fedavg' needs equal ranks - use a heterogeneous-rank strategy"),
        ([_up("a", 0), _up("b", 0)], "updates report 0 examples in total; cannot weight them"),
        ([], "strategy 'fedavg' got no updates to aggregate"),
    ]  # fmt: skip
    for ups, message in cases:
        with pytest.raises(AggregationError) as err:
            strat.aggregate_train(1, ups)
        assert str(err.value) == message


def test_adapter_state_round_trip_is_exact_and_independent():
    from fedpeft.algorithms.base import adapter_from_state, adapter_state

    ad = {"z": LoraFactors(torch.arange(2.0).reshape(1, 2), torch.ones(2, 1), 3.0),
          "a": LoraFactors(torch.zeros(1, 2), torch.zeros(2, 1), 1.0)}  # fmt: skip
    state = adapter_state(ad)
    assert list(state) == ["a", "z"] and state["z"]["alpha"] == 3.0
    back = adapter_from_state(state)
    assert torch.equal(back["z"].a, ad["z"].a) and back["z"].alpha == 3.0
    state["z"]["a"][0, 0] = 9.0  # the state holds copies: the adapter is untouched
    assert ad["z"].a[0, 0] == 0.0 and back["z"].a[0, 0] == 0.0


def test_an_aggregate_result_is_lora_or_zeroth_order_never_both_or_neither():
    from fedpeft.algorithms.base import AggregateResult
    from fedpeft.errors import AggregationError

    spec = LoraSpec(rank=1, alpha=1.0, target_modules=("q_proj",))
    AggregateResult(adapter=_up("a", 1).factors, spec=spec)
    for bad in ({}, {"adapter": _up("a", 1).factors}, {"spec": spec}):
        with pytest.raises(AggregationError, match="needs either adapter and spec"):
            AggregateResult(**bad)


def test_sums_in_float64_one_client_of_one_example_and_structure_messages():
    """Four clients of equal weight 1/4 whose values are 4, 2^-22, 2^-22, 0: the mean is
    1 + 2^-23, exact in float32, which a float32 running sum would round back to 1."""

    def up(cid, v, n=10, a_shape=(1, 2)):
        f = LoraFactors(a=torch.full(a_shape, v), b=torch.full((2, 1), v), alpha=1.0)
        return LoraUpdate(Header("r", 1, "f", "h", n, cid), {"m": f})

    spec = LoraSpec(rank=1, alpha=1.0, target_modules=("m",))
    initial = up("x", 0.0).factors
    strat = FedAvg(FedAvg.Config(), StrategyContext(initial=initial, spec=spec, seed=0))
    got = strat.aggregate_train(1, [up("0", 4.0), up("1", 2**-22), up("2", 2**-22), up("3", 0.0)])
    g = got.adapter["m"]
    assert g.a.dtype == g.b.dtype == torch.float32
    assert g.a.tolist() == [[1 + 2**-23] * 2] and g.b.tolist() == [[1 + 2**-23]] * 2
    one = strat.aggregate_train(2, [up("0", 3.0, n=1)])  # a single client with one example
    assert one.adapter["m"].a.tolist() == [[3.0, 3.0]]
    with pytest.raises(AggregationError) as err:
        strat.aggregate_train(3, [up("0", 1.0), up("1", 1.0, a_shape=(1, 3))])
    assert str(err.value) == (
        "client 1 sent rank 1 (alpha 1.0) for 'm', client 0 rank 1 (alpha 1.0); strategy "
        "'fedavg' needs equal ranks - use a heterogeneous-rank strategy"
    )
    many = LoraUpdate(Header("r", 1, "f", "h", 10, "1"),
                      {f"n{i}": up("1", 1.0).factors["m"] for i in range(4)})  # fmt: skip
    with pytest.raises(AggregationError, match=r"differing: \['m', 'n0', 'n1'\]\)"):
        strat.aggregate_train(3, [up("0", 1.0), many])
    want = r"^an AggregateResult needs either adapter and spec \(LoRA\) or zo \(zeroth-order\)$"
    with pytest.raises(AggregationError, match=want):
        AggregateResult()
