"""Robust aggregation with known answers, and simulated attacks against it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedpeft.algorithms.base import StrategyContext
from fedpeft.algorithms.fedavg import FedAvg
from fedpeft.algorithms.wrappers.robust import RobustAggregation, krum_scores, median, trimmed_mean
from fedpeft.changes import flat_change, with_change
from fedpeft.config import RobustConfig
from fedpeft.errors import AggregationError
from fedpeft.simulation.attacks import alie_z, attackers, flip_labels
from fedpeft.simulation.runner import simulate
from fedpeft.wire.messages import ClientInfo, Header, LoraFactors, LoraSpec, LoraUpdate
from fedpeft.wire.zo import ZoUpdate

SPEC = LoraSpec(rank=1, alpha=1.0, target_modules=("m",))
SENT = {"m": LoraFactors(a=torch.zeros(1, 2), b=torch.zeros(2, 1), alpha=1.0)}


def _update(cid: str, values: list[float], n: int = 10) -> LoraUpdate:
    """A rank-1 update of module ``m`` whose change from SENT is ``values`` (a0 a1 b0 b1)."""
    a = torch.tensor([values[:2]], dtype=torch.float32)  # (1, 2)
    b = torch.tensor([[values[2]], [values[3]]], dtype=torch.float32)  # (2, 1)
    return LoraUpdate(Header("r", 1, "f", "h", n, cid), {"m": LoraFactors(a, b, 1.0)})


def _robust(**options) -> RobustAggregation:
    inner = FedAvg(FedAvg.Config(), StrategyContext(initial=SENT, spec=SPEC, seed=0))
    agg = RobustAggregation(inner, RobustConfig(**options))
    clients = [ClientInfo(Header("r", 0, "f", "", 10, str(i)), "cpu") for i in range(5)]
    agg.configure_train(1, clients)
    return agg


def _flat(result) -> list[float]:
    f = result.adapter["m"]
    return [*f.a.reshape(-1).tolist(), *f.b.reshape(-1).tolist()]


HONEST = [[1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6], [4, 5, 6, 7]]


def test_statistics_known_values():
    x = torch.tensor([[1.0, 10.0], [2.0, -5.0], [100.0, 0.0], [3.0, 1.0]])
    assert median(x).tolist() == [2.5, 0.5]
    assert median(x[:3]).tolist() == [2.0, 0.0]
    assert trimmed_mean(x, 0.25).tolist() == [2.5, 0.5]  # drops 1 from each end
    assert trimmed_mean(x, 0.0).tolist() == x.mean(0).tolist()
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0]])
    scores = krum_scores(pts, byzantine=1)  # n - f - 2 = 1 nearest neighbour
    assert scores.tolist() == [1.0, 1.0, 1.0, 181.0]


def test_median_and_trimmed_mean_ignore_an_attacker_and_its_weight():
    ups = [_update(str(i), v) for i, v in enumerate(HONEST)]
    ups.append(_update("4", [1e3, -1e3, 1e3, -1e3], n=10**6))
    assert _flat(_robust(rule="median").aggregate_train(1, ups)) == [3.0, 3.0, 5.0, 5.0]
    tm = _robust(rule="trimmed_mean", trim_fraction=0.2).aggregate_train(1, ups)
    assert _flat(tm) == pytest.approx([3.0, 3.0, 5.0, 5.0])  # [1,2,3,4,1e3] -> mean(2,3,4)
    plain = _robust(rule="mean").aggregate_train(1, ups)
    assert _flat(plain)[0] > 900  # undefended FedAvg is captured by the weighted attacker


def test_krum_and_multikrum_select_from_the_honest_cluster():
    ups = [_update(str(i), v) for i, v in enumerate(HONEST)]
    ups.append(_update("4", [-50.0, 50.0, -50.0, 50.0]))
    krum = _robust(rule="krum", byzantine=1).aggregate_train(1, ups)
    assert _flat(krum) in ([2.0, 3.0, 4.0, 5.0], [3.0, 4.0, 5.0, 6.0])
    assert krum.metrics["robust_kept"] == 1
    multi = _robust(rule="multikrum", byzantine=1).aggregate_train(1, ups)
    assert multi.metrics["robust_kept"] == 4
    assert _flat(multi) == pytest.approx([2.5, 3.5, 4.5, 5.5])  # the mean of the four honest


def test_clipping_bounds_each_change_to_the_norm():
    ups = [_update("0", [3.0, 4.0, 0.0, 0.0]), _update("1", [0.0, 0.0, 0.3, 0.4])]
    agg = _robust(clip_norm=1.0)
    out = agg.aggregate_train(1, ups)
    assert _flat(out) == pytest.approx([0.3, 0.4, 0.15, 0.2])  # (0.6, 0.8) and (0.3, 0.4) averaged
    assert out.metrics["robust_clipped"] == 1 and out.metrics["robust_norm_max"] == 5.0


def test_a_folded_clipped_mean_is_the_wrappers_own():
    """``rule = "mean"`` with ``clip_norm``: the coordinator clips each change as it folds it
    (example weights kept) and the wrapper passes the mean on; the global and the row's counts
    are the wrapper's own, to float32 rounding."""
    from fedpeft.config import TrainConfig
    from fedpeft.server.fold import Fold
    from fedpeft.wire.messages import TrainInstruction

    ups = [_update("0", [3.0, 4.0, 0.0, 0.0], n=30), _update("1", [0.0, 0.0, 0.3, 0.4], n=10),
           _update("2", [0.0, 0.1, 0.0, 2.0], n=20)]  # fmt: skip
    own = _robust(clip_norm=1.0).aggregate_train(1, ups)
    ins = {
        u.header.client_id: TrainInstruction(
            Header("r", 1, "f", "", 0, u.header.client_id), SPEC, TrainConfig(), SENT, 0
        )
        for u in ups
    }
    fold = Fold(ins, 1, None, True, 0.0, norm_clip=1.0)
    summed = fold.result([fold.add(u) for u in reversed(ups)])
    wrapper = _robust(clip_norm=1.0)
    got = wrapper.aggregate_train(1, summed)
    assert _flat(got) == pytest.approx(_flat(own), abs=1e-7)
    # (0.6, 0.8, 0, 0) * 30, (0, 0, 0.3, 0.4) * 10 and (0, 0.1, 0, 2) * s * 20, over 60
    s = 1 / math.sqrt(4.01)
    want = [18 / 60, (24 + 2 * s) / 60, 3 / 60, (4 + 40 * s) / 60]
    assert _flat(got) == pytest.approx(want, abs=1e-7)
    assert "robust_clipped" not in got.metrics  # counted by the fold, for the round's row
    assert (fold.norm_clipped, fold.norm_max) == (2, 5.0)
    assert own.metrics["robust_clipped"] == 2 and own.metrics["robust_norm_max"] == 5.0


def test_a_folded_scalar_clip_is_the_wrappers_own():
    """Seed/scalar ``scalar_clip``: clipped as folded, with the strategy's own clip the tighter
    of the two wins; the coefficients and the counts are the wrapper's."""
    from fedpeft.algorithms.fedkseed import FedKSeed
    from fedpeft.config import TrainConfig
    from fedpeft.server.fold import Fold
    from fedpeft.wire.zo import ZoInstruction, ZoSpec

    def wrapped() -> RobustAggregation:
        spec = ZoSpec(algorithm="fedkseed", target="full", num_seeds=16, pool_seed=1, lr=0.1,
                      local_steps=1)  # fmt: skip
        ctx = StrategyContext(initial={}, spec=SPEC, seed=0, zo=spec, zo_blocks=1)
        inner = FedKSeed(FedKSeed.Config(scalar_clip=3.0), ctx)
        return RobustAggregation(inner, RobustConfig(scalar_clip=2.0), zo=True)

    ups = [_zo("0", [1, 2, 2], [5.0, -0.5, 1.5]), _zo("1", [2, 7], [-9.0, 1.0]),
           _zo("2", [7], [2.5])]  # fmt: skip
    clients = [ClientInfo(Header("r", 0, "f", "", 10, c), "cpu") for c in "012"]
    agg = wrapped()
    agg.configure_train(1, clients)
    own = agg.aggregate_train(1, ups)
    agg = wrapped()
    plans = agg.configure_train(1, clients)
    ins = {
        c: ZoInstruction(Header("r", 1, "f", "", 0, c), p.spec, TrainConfig(), p.sync, 0)
        for c, p in plans.items()
    }
    fold = Fold(ins, 1, None, True, scalar_clip=2.0, watch_scalars=2.0)
    got = agg.aggregate_train(1, fold.result([fold.add(u) for u in ups]))
    assert np.allclose(got.zo.coeffs, own.zo.coeffs, rtol=0, atol=1e-8)
    # means of the clipped scalars: seed 1: 2 / 3; seed 2: (-0.5 + 1.5 - 2) / 3; seed 7:
    # (1 + 2) / 3; the coefficients are those times one factor (the learning rate's)
    c = np.asarray(got.zo.coeffs).reshape(-1)
    assert c[[1, 2, 7]] / c[7] == pytest.approx([2 / 3, -1 / 3, 1.0])
    assert np.count_nonzero(c) == 3
    assert (fold.scalars_above, fold.scalar_max) == (3, 9.0)
    assert own.metrics["robust_clipped"] == 3 and own.metrics["robust_scalar_max"] == 9.0


def test_change_helpers_round_trip():
    u = _update("0", [1.0, 2.0, 3.0, 4.0])
    d = flat_change(u.factors, SENT)
    assert d.tolist() == [1.0, 2.0, 3.0, 4.0]
    back = with_change(u, SENT, d * 2)
    assert flat_change(back.factors, SENT).tolist() == [2.0, 4.0, 6.0, 8.0]


def test_robust_rules_refuse_what_they_cannot_combine():
    """At aggregation; the family rules are load-time rules (test_combinations.py)."""
    agg = _robust(rule="median")
    bad = LoraUpdate(
        Header("r", 1, "f", "h", 10, "1"),
        {"m": LoraFactors(torch.zeros(2, 2), torch.zeros(2, 2), 1.0)},
    )
    with pytest.raises(AggregationError, match="needs updates of the shapes that were sent"):
        agg.aggregate_train(1, [_update("0", HONEST[0]), bad])
    bad_shape = str(err_of(agg, [_update("0", HONEST[0]), bad]))
    assert bad_shape == (
        "robust aggregation needs updates of the shapes that were sent; client 1 returned m at "
        "A(2, 2) B(2, 2), sent A(1, 2) B(2, 1) (pruning or rank changes: use robust.rule = "
        "'mean' with clip_norm = 0)"
    )
    stranger = LoraUpdate(Header("r", 1, "f", "h", 10, "9"), dict(bad.factors))
    assert str(err_of(agg, [_update("0", HONEST[0]), stranger])) == (
        "robust aggregation: client 9 sent other modules than the others, or was not planned "
        "this round"
    )


def err_of(agg, updates) -> AggregationError:
    with pytest.raises(AggregationError) as err:
        agg.aggregate_train(1, updates)
    return err.value


def _zo(cid: str, seeds: list[int], scalars: list[float]) -> ZoUpdate:
    return ZoUpdate(
        Header("r", 1, "f", "h", 10, cid),
        np.array(seeds, np.uint16),
        np.array(scalars, np.float32),
    )


def test_zeroth_order_scalar_clip_and_per_seed_trimmed_mean():
    inner = FedAvg(FedAvg.Config(), StrategyContext(initial=SENT, spec=SPEC, seed=0))
    agg = RobustAggregation(inner, RobustConfig(rule="trimmed_mean", trim_fraction=0.2), zo=True)
    # seed 7: five clients, values 1 2 3 4 and an attacker's 1000; seed 9: only two clients
    ups = [_zo(str(i), [7, 9], [float(i + 1), 5.0]) for i in range(4)][:2]
    ups += [_zo(str(i), [7], [float(i + 1)]) for i in range(2, 4)]
    ups += [_zo("4", [7], [1000.0])]
    out, metrics = agg._zo(ups)
    seven = sorted(float(u.scalars[0]) for u in out)
    # 1 and 1000 trimmed (0), 2 3 4 scaled by 5/3: sum = 5 * mean(2, 3, 4) = 15
    assert seven == pytest.approx([0.0, 0.0, 10 / 3, 5.0, 20 / 3])
    assert float(out[0].scalars[1]) == 5.0 and float(out[1].scalars[1]) == 5.0  # too few: kept
    assert metrics["robust_trimmed"] == 2
    assert metrics == {"robust_trimmed": 2.0}
    clip = RobustAggregation(inner, RobustConfig(scalar_clip=2.0), zo=True)
    clipped, m = clip._zo(ups)
    # above 2: the 5.0 of seed 9 (twice), 3.0, 4.0 and 1000.0; the largest seen is 1000
    assert [c.scalars.tolist() for c in clipped] == [[1.0, 2.0], [2.0, 2.0], [2.0], [2.0], [2.0]]
    assert m == {"robust_clipped": 5.0, "robust_scalar_max": 1000.0}
    negative = clip._zo([_zo("0", [1, 2], [-7.0, 0.5])])[0][0]
    assert negative.scalars.tolist() == [-2.0, 0.5] and negative.scalars.dtype == np.float32


def test_attack_helpers():
    assert alie_z(10, 2) == pytest.approx(0.2533, abs=1e-4)  # Phi^-1(0.6)
    recs = [{"prompt": p, "response": r} for p, r in [("a", "1"), ("b", "2"), ("c", "3")]]
    assert [r["response"] for r in flip_labels(recs, {"response"})] == ["2", "3", "1"]
    assert [r["prompt"] for r in flip_labels(recs, {"response"})] == ["a", "b", "c"]


def test_attackers_are_a_seeded_fraction(tiny_config):
    cfg = tiny_config("federation.num_clients=10", "attack.kind=sign_flip", "attack.fraction=0.2")
    bad = attackers(cfg)
    assert len(bad) == 2 and bad == attackers(cfg) and bad <= {str(i) for i in range(10)}
    assert attackers(tiny_config("federation.num_clients=10")) == set()


def _loss(path) -> float:
    return json.loads((path / "summary.json").read_text())["after"]["eval_loss"]


def test_a_noise_attack_hurts_and_the_median_defends(tiny_config, tmp_path, cache):
    base = ("federation.num_clients=5", "federation.rounds=2", "attack.fraction=0.2")
    runs = {
        "clean": (),
        "attacked": ("attack.kind=noise", "attack.noise_std=1"),
        "median": ("attack.kind=noise", "attack.noise_std=1", "robust.rule=median"),
        "nonfinite": ("attack.kind=nonfinite",),
    }
    loss = {}
    for name, extra in runs.items():
        simulate(tiny_config(*base, *extra), tmp_path / name, quiet=True, cache=cache)
        loss[name] = _loss(tmp_path / name)
    assert loss["attacked"] > loss["clean"] + 0.1
    assert abs(loss["median"] - loss["clean"]) < 0.05
    rows = [
        json.loads(x) for x in (tmp_path / "nonfinite" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[1]["rejected"] == {"nonfinite": 1} and rows[1]["clients"] == 4


def test_inflated_examples_are_capped(tiny_config, tmp_path, cache):
    cfg = tiny_config(
        "federation.num_clients=5", "federation.rounds=1", "attack.kind=inflate_examples"
    )
    simulate(cfg, tmp_path, quiet=True, cache=cache)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])
    assert row["weights_capped"] == 1 and row["rejected"] == {}


def _adapter(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_sign_flip_and_scale_attacks_change_every_update_by_their_factor(
    tiny_config, tmp_path, cache
):
    """Every client attacks for one FedIT round: scale 0 sends back what it was sent (the
    global stays the initial adapter), and a sign flip mirrors the clean global about it:
    clean + flipped = 2 x initial, for A and for B (which starts at 0)."""
    base = ("federation.rounds=1", "attack.fraction=0.9")  # round(0.9 * 3) = all 3
    runs = {
        "clean": (),
        "zero": ("attack.kind=scale", "attack.scale=0"),
        "flip": ("attack.kind=sign_flip", "attack.scale=1"),
    }
    for name, extra in runs.items():
        cfg = tiny_config(*base, *extra)
        assert name == "clean" or attackers(cfg) == {"0", "1", "2"}
        simulate(cfg, tmp_path / name, quiet=True, cache=cache)
    clean, zero, flip = (_adapter(tmp_path / n) for n in runs)
    assert clean.keys() == zero.keys() == flip.keys()
    for k in clean:
        if "lora_B" in k:
            assert not bool(zero[k].any())  # B_0 = 0 and nobody moved it
        assert torch.allclose(clean[k] + flip[k], 2 * zero[k], atol=1e-6), k
        assert not torch.allclose(clean[k], zero[k]), k  # the clean round did move it


def test_alie_attacker_sends_the_honest_mean_minus_z_standard_deviations(
    tiny_config, tmp_path, cache
):
    """A little is enough (Baruch et al. 2019) end to end: the attacker's change is
    mean - z std of the honest clients' changes, coordinate by coordinate, with
    z = Phi^-1((n - s) / n), s = floor(n / 2 + 1) - f (here n = 5, f = 1: z = Phi^-1(0.6))."""
    from statistics import NormalDist

    from fedpeft._flwr import GridWrapper
    from fedpeft.client.app import make_client_app
    from fedpeft.server.app import run_server
    from fedpeft.server.results import RunReporter
    from fedpeft.simulation.attacks import AttackGrid
    from fedpeft.simulation.inprocess import InProcessGrid
    from fedpeft.wire.messages import decode_instruction, decode_update

    sent, honest, replies = {}, {}, []

    class Recorder(GridWrapper):
        """Keeps each training reply as it left the client (before the attack rewrites it)."""

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            out = list(self.grid.send_and_receive(messages, timeout=timeout))
            for m in messages:
                if m.metadata.message_type == "train.lora":
                    sent[m.metadata.dst_node_id] = decode_instruction(m.content).adapter
            for r in out:
                if not r.has_error() and r.metadata.message_type == "train.lora":
                    honest[r.metadata.src_node_id] = decode_update(r.content).factors
                    replies.append(r)
            return out

    cfg = tiny_config("federation.num_clients=5", "federation.rounds=1", "attack.kind=alie",
                      "attack.fraction=0.2")  # fmt: skip
    app = make_client_app(cfg, cache)
    grid = AttackGrid(Recorder(InProcessGrid(app, [{"partition-id": i} for i in range(5)])), cfg)
    run_server(grid, cfg, tmp_path, RunReporter(tmp_path, 1, quiet=True), cache)

    def change(factors: dict, node: int) -> torch.Tensor:
        ref = sent[node]
        return torch.cat([torch.cat([(factors[m].a - ref[m].a).reshape(-1),
                                     (factors[m].b - ref[m].b).reshape(-1)])
                          for m in sorted(factors)]).double()  # fmt: skip

    final = {r.metadata.src_node_id: decode_update(r.content).factors for r in replies}
    poisoned = [n for n in final if not all(
        torch.equal(final[n][m].a, honest[n][m].a) for m in final[n])]  # fmt: skip
    assert len(poisoned) == 1
    bad = poisoned[0]
    others = torch.stack([change(honest[n], n) for n in honest if n != bad])  # (4, d)
    z = NormalDist().inv_cdf((5 - (math.floor(5 / 2 + 1) - 1)) / 5)
    assert z == pytest.approx(0.2533, abs=1e-4)
    want = others.mean(0) - z * others.std(0)  # std with Bessel's correction, as ALIE's paper
    assert torch.allclose(change(final[bad], bad), want, atol=1e-6)
    assert not torch.allclose(change(honest[bad], bad), want, atol=1e-3)


def test_label_flip_attackers_train_on_their_own_prompts_with_rotated_responses(tiny_config, cache):
    """An attacker's records are its honest records, each with the next record's response
    (the last with the first's); honest clients' records are untouched."""
    from fedpeft.data.clients import client_records

    clean = tiny_config("federation.num_clients=5")
    attacked = tiny_config("federation.num_clients=5", "attack.kind=label_flip",
                           "attack.fraction=0.4")  # fmt: skip
    bad = attackers(attacked)
    assert len(bad) == 2
    for pid in range(5):
        honest = client_records(clean, pid, cache)
        got = client_records(attacked, pid, cache)
        assert [r["prompt"] for r in got] == [r["prompt"] for r in honest]
        responses = [r["response"] for r in honest]
        if str(pid) in bad:
            assert [r["response"] for r in got] == [*responses[1:], responses[0]]
            assert len(set(responses)) > 1
        else:
            assert [r["response"] for r in got] == responses


def _zo_blocks(cid: str, pairs: list[tuple[int, int, float]]) -> ZoUpdate:
    """A seed/scalar update of (block, seed, scalar) triples."""
    return ZoUpdate(
        Header("r", 1, "f", "h", 10, cid),
        np.array([s for _, s, _ in pairs], np.uint32),
        np.array([v for _, _, v in pairs], np.float32),
        np.array([b for b, _, _ in pairs], np.uint16),
    )


def test_per_direction_trimmed_mean_by_value_block_and_repeated_seeds():
    """Worked by hand, fraction 0.4. A direction is (block, seed); a client's repeated pairs
    count as their sum; ties rank by client id. Values are not in client-id order."""
    inner = FedAvg(FedAvg.Config(), StrategyContext(initial=SENT, spec=SPEC, seed=0))
    agg = RobustAggregation(inner, RobustConfig(rule="trimmed_mean", trim_fraction=0.4), zo=True)
    big = 2**22  # block 1 / 2**32 added to it is lost in float64: ids must stay integers
    ups = [
        _zo_blocks("0", [(0, 9, 1.0), (0, 70, 1000.0), (1, 6, 5.0), (0, 11, 1.0), (1, 70, 8.0),
                         (1, big, 1.0)]),
        _zo_blocks("1", [(0, 9, 2.0), (0, 70, 3.0), (1, 6, 6.0), (0, 11, 1.0), (1, 70, 9.0),
                         (1, big, 2.0)]),
        _zo_blocks("2", [(0, 70, -50.0), (1, 6, 7.0), (0, 11, 2.0), (1, 70, 10.0),
                         (1, big, 3.0), (0, big, 100.0)]),
        _zo_blocks("3", [(0, 70, 3.0), (0, 70, 0.2), (0, big, -100.0)]),
        _zo_blocks("4", [(0, 70, 4.0), (0, big, 50.0)]),
    ]  # fmt: skip
    out, metrics = agg._zo(ups)
    # (0, 9): 2 clients, nothing trimmed.
    # (0, 70): sums 1000, 3, -50, 3.2, 4; cut floor(0.4 * 5) = 2 from each end: client 3 is
    #   kept, both its pairs scaled by 5 / 1.
    # (1, 6) 5 6 7, (1, 70) 8 9 10, (1, big) 1 2 3: cut 1 from each end, client 1 kept, x 3.
    # (0, 11): 1 1 2: the tie ranks client 0 first, so client 0 is cut and client 1 kept, x 3.
    # (0, big): 100 -100 50: client 4 kept, x 3.
    assert [u.scalars.tolist() for u in out] == [
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [2.0, 0.0, 18.0, 3.0, 27.0, 6.0],
        [0.0] * 6,
        [15.0, 1.0, 0.0],
        [0.0, 150.0],
    ]
    assert metrics == {"robust_trimmed": 14.0}  # 2 x 2 + 5 directions x 2 x 1


def test_median_and_trimmed_mean_differ_and_each_rule_gives_its_own():
    """Per coordinate 0, 1, 2, 10, 1000: the median is 2; the 20 % trimmed mean drops 0 and
    1000 and averages 1, 2, 10 = 13/3."""
    ups = [_update(str(i), [v, v, v, v]) for i, v in enumerate([10.0, 0.0, 1000.0, 2.0, 1.0])]
    assert _flat(_robust(rule="median").aggregate_train(1, ups)) == [2.0] * 4
    alone = _robust(rule="median").aggregate_train(1, [_update("3", [1.0, -2.0, 0.5, 0.0], n=7)])
    assert _flat(alone) == [1.0, -2.0, 0.5, 0.0]  # one client: the median is its change
    tm = _robust(rule="trimmed_mean", trim_fraction=0.2).aggregate_train(1, ups)
    assert _flat(tm) == pytest.approx([13 / 3] * 4)


def test_clipping_small_changes_multikrum_with_many_attackers_and_ties():
    """clip 0.1: a change of norm 0.5 is scaled by 0.2 (not by 0.1). Multi-Krum with f = n - 1
    keeps max(1, n - f) = 1 update. Identical updates tie: the first by client id is kept."""
    out = _robust(clip_norm=0.1).aggregate_train(1, [_update("0", [0.3, 0.4, 0.0, 0.0])])
    assert _flat(out) == pytest.approx([0.06, 0.08, 0.0, 0.0])
    ups = [_update(str(i), v) for i, v in enumerate(HONEST[:3])]
    multi = _robust(rule="multikrum", byzantine=2).aggregate_train(1, ups)
    assert multi.metrics["robust_kept"] == 1
    agg = RobustAggregation(FedAvg(FedAvg.Config(), StrategyContext(SENT, SPEC, 0)),
                            RobustConfig(rule="krum", byzantine=0))  # fmt: skip
    ids = [f"{i:02d}" for i in range(40)]
    agg.configure_train(1, [ClientInfo(Header("r", 0, "f", "", 10, c), "cpu") for c in ids])
    same = [_update(c, [1.0, 1.0, 1.0, 1.0], n=i + 1) for i, c in enumerate(ids)]
    kept = agg.aggregate_train(1, same)
    assert kept.metrics["fedavg_clients"] == 1 and kept.metrics["robust_kept"] == 1


def test_robust_refusals_name_the_reason_exactly():
    agg = _robust(rule="median")
    agg._sent["1"] = {k: v for k, v in SENT.items()}  # another object: other factors
    assert str(err_of(agg, [_update("0", HONEST[0]), _update("1", HONEST[1])])).startswith(
        "robust.rule = 'median' combines updates of clients that were all sent the same "
        "factors; this strategy sends different ones (use krum/multikrum or clip_norm)"
    )
    wider = LoraUpdate(Header("r", 1, "f", "h", 10, "1"),
                       {"m": LoraFactors(torch.zeros(1, 3), torch.zeros(2, 1), 1.0)})  # fmt: skip
    assert "returned m at A(1, 3) B(2, 1), sent A(1, 2) B(2, 1)" in str(
        err_of(_robust(rule="median"), [_update("0", HONEST[0]), wider])
    )


def test_wrapper_passes_rounds_and_state_through_for_lora_and_seed_scalar(round_recorder):
    from fedpeft.algorithms.fedkseed import FedKSeed
    from fedpeft.wire.zo import ZoSpec

    rec = round_recorder(FedAvg(FedAvg.Config(), StrategyContext(SENT, SPEC, 0)))
    agg = RobustAggregation(rec, RobustConfig(clip_norm=10.0))
    agg.configure_train(3, [ClientInfo(Header("r", 0, "f", "", 10, "0"), "cpu")])
    agg.aggregate_train(3, [_update("0", [1.0, 2.0, 3.0, 4.0])])
    assert rec.rounds == [("configure", 3), ("aggregate", 3)]
    back = RobustAggregation(FedAvg(FedAvg.Config(), StrategyContext(SENT, SPEC, 0)),
                             RobustConfig(clip_norm=10.0))  # fmt: skip
    back.load_state_dict(agg.state_dict())
    plan = back.configure_train(4, [ClientInfo(Header("r", 0, "f", "", 10, "0"), "cpu")])["0"]
    f = plan.adapter["m"]  # the restored global: SENT plus client 0's change
    assert [*f.a.reshape(-1).tolist(), *f.b.reshape(-1).tolist()] == [1.0, 2.0, 3.0, 4.0]
    spec = ZoSpec(algorithm="fedkseed", target="full", num_seeds=4, pool_seed=1, lr=1.0,
                  local_steps=2)  # fmt: skip
    ctx = StrategyContext(initial={}, spec=SPEC, seed=0, zo=spec, zo_blocks=1)
    zo = RobustAggregation(FedKSeed(FedKSeed.Config(), ctx), RobustConfig(scalar_clip=0.5),
                           zo=True)  # fmt: skip
    zo.configure_train(2, [ClientInfo(Header("r", 0, "f", "", 10, c), "cpu") for c in "ab"])
    got = zo.aggregate_train(2, [_zo("a", [1], [3.0]), _zo("b", [1, 2], [-0.25, 0.125])])
    assert got.zo.version == 2  # FedKSeed was told the round
    # clipped to [-0.5, 0.5], then FedKSeed's equal-example mean: seed 1 (0.5 - 0.25) / 2
    assert got.zo.coeffs[0].tolist() == pytest.approx([0.0, 0.125, 0.0625, 0.0])
    assert got.metrics["robust_clipped"] == 1 and got.metrics["robust_scalar_max"] == 3.0
    empty = zo.aggregate_train(3, [_zo("a", [], [])])
    assert empty.metrics["robust_scalar_max"] == 0.0 and empty.metrics["robust_clipped"] == 0
