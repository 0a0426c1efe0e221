"""FedSpine: the pruning layout and its masks, cutting LoRA factors to a pruned structure,
prune-then-tune on the client, validation of pruned updates, masked aggregation inside the
strategy, the reward, state round trips and a tiny simulation end to end."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedpeft.algorithms.base import StrategyContext
from fedpeft.algorithms.fedspine import FedSpine, fedspine_reward
from fedpeft.bandit import Arm
from fedpeft.cache import ProcessCache
from fedpeft.client.prune_trainer import PruneTrainer
from fedpeft.client.trainer import ClientData
from fedpeft.config import TrainConfig, ValidationConfig
from fedpeft.data.tasks import TextPair
from fedpeft.data.tokenize import encode_pairs
from fedpeft.errors import ConfigError, ProtocolError
from fedpeft.lora.handle import ModelHandle, init_factors
from fedpeft.prune.deployed import plain_copy, pruned_handle
from fedpeft.prune.layout import LayerLayout, PruneLayout, cut_adapter
from fedpeft.prune.schedule import default_protect, needs_pruning, target_counts
from fedpeft.prune.structure import Keep, prune_layers
from fedpeft.server.validate import Limits, validate_update
from fedpeft.simulation.runner import simulate
from fedpeft.wire.messages import (
    Header,
    LoraFactors,
    LoraSpec,
    LoraUpdate,
    TrainInstruction,
    decode_instruction,
    decode_update,
    encode_instruction,
    encode_update,
)
from fedpeft.wire.prune import PrunePlan

TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}


KEEPS = {
    "llama": {1: Keep(attn=(0, 2), ffn=tuple(range(0, 96, 3))), 2: Keep(attn=(1,), ffn=(5, 7))},
    "gpt2": {1: Keep(attn=(1, 3), ffn=tuple(range(0, 192, 2))), 2: Keep(attn=(2,), ffn=(4,))},
}


def _random_adapter(handle, spec, seed=0):
    name = handle.ensure_adapter(spec)
    g = torch.Generator().manual_seed(seed)
    return {
        m: LoraFactors(a=torch.randn(spec.rank, i, generator=g) * 0.1,
                       b=torch.randn(o, spec.rank, generator=g) * 0.1, alpha=spec.alpha)
        for m, (o, i) in handle.module_shapes(name).items()
    }  # fmt: skip


# ---------------------------------------------------------------------------- layout, masks


def test_mask_round_trips_and_bad_masks_are_refused(small_model):
    layout = PruneLayout.of(small_model("llama", 4))
    keeps = layout.full()
    keeps[1] = KEEPS["llama"][1]
    blob = layout.encode(keeps)
    assert len(blob) == (4 * (3 + 96) + 7) // 8
    assert layout.decode(blob) == keeps
    with pytest.raises(ProtocolError, match="bytes"):
        layout.decode(blob[:-1])
    emptied = layout.full()
    emptied[2] = Keep(attn=(0,), ffn=())
    bits = bytearray(layout.encode(layout.full()))
    with pytest.raises(ProtocolError, match="bits set past"):
        layout.decode(bytes(bits[:-1]) + b"\xff")
    zero = bytes(len(blob))
    with pytest.raises(ProtocolError, match="empties layer 0"):
        layout.decode(zero)
    assert PruneLayout.from_json(json.loads(json.dumps(layout.to_json()))) == layout
    with pytest.raises(ProtocolError):
        PruneLayout.from_json({"arch": "llama", "layers": [[0, 1, 1, 1]]})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cut_adapter_on_the_pruned_model_equals_the_zeroed_full_model(arch, small_model, zeroed):
    """The structural check with LoRA on every prunable module: the pruned model with the
    cut adapter computes exactly what the full model computes when the pruned groups (and the
    LoRA inputs that read them) are zeroed."""
    spec = LoraSpec(rank=4, alpha=8.0, target_modules=TARGETS[arch])
    full = ModelHandle(small_model(arch, 4), None, "fp", "m", torch.device("cpu"))
    layout = PruneLayout.of(full.base_model)
    adapter = _random_adapter(full, spec)
    keeps = layout.full()
    for i, k in KEEPS[arch].items():
        keeps[i] = k
    # reference: zero the pruned groups' output weights and the LoRA A columns reading them
    ref = ModelHandle(
        zeroed(small_model(arch, 4), KEEPS[arch]), None, "fp", "m", torch.device("cpu")
    )
    ref_adapter = {}
    for m, f in adapter.items():
        _, cols = layout.factor_index(m, keeps)
        a = f.a.clone()
        if cols is not None:
            mask = torch.zeros(a.shape[1], dtype=torch.bool)
            mask[list(cols)] = True
            a[:, ~mask] = 0
        ref_adapter[m] = LoraFactors(a=a, b=f.b, alpha=f.alpha)
    ref.set_factors(ref.ensure_adapter(spec), ref_adapter)
    pruned = ModelHandle(
        prune_layers(small_model(arch, 4), KEEPS[arch]), None, "fp", "m", full.device
    )
    name = pruned.ensure_adapter(spec)
    pruned.set_factors(name, cut_adapter(adapter, layout, layout.full(), keeps))
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.peft_model(ref.ensure_adapter(spec))(input_ids=ids).logits
        got = pruned.peft_model(name)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert PruneLayout.of(prune_layers(small_model(arch, 4), KEEPS[arch])) == layout.pruned(keeps)


def test_plain_copy_shares_weights_and_leaves_the_base_alone(tiny_handle):
    spec = LoraSpec(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"))
    tiny_handle.ensure_adapter(spec)
    copy_ = plain_copy(tiny_handle)
    from peft.tuners.lora import LoraLayer

    assert not any(isinstance(m, LoraLayer) for m in copy_.modules())
    base = dict(tiny_handle.base_model.named_parameters())
    shared = [n for n, p in copy_.named_parameters() if any(p is q for q in base.values())]
    assert len(shared) == len(list(copy_.parameters()))  # nothing duplicated
    layout = PruneLayout.of(copy_)
    keeps = layout.full()
    keeps[0] = Keep(attn=(0,), ffn=(0, 1))
    sub = pruned_handle(tiny_handle, layout, keeps)
    assert sum(p.numel() for p in sub.base_model.parameters()) < sum(
        p.numel() for n, p in tiny_handle.base_model.named_parameters() if "lora_" not in n
    )
    assert PruneLayout.of(tiny_handle.base_model) == layout  # the shared base is untouched


def test_target_counts_protect_the_ends_and_keep_one():
    layout = PruneLayout("llama", (LayerLayout(3, 3, 64, 1536),) * 4)
    protect = default_protect(layout)
    assert protect == (0, 3)
    counts = target_counts(layout, 0.5, protect)
    assert counts == [(3, 1536), (2, 768), (2, 768), (3, 1536)]
    assert target_counts(layout, 0.9, ())[1] == (1, 154)
    assert needs_pruning(layout.full(), counts)
    assert not needs_pruning(layout.full(), target_counts(layout, 0.0, protect))


# ---------------------------------------------------------------------------- client


def _data(handle, n=24):
    pairs = [TextPair(f"word {i}", f"meaning number {i} of the word") for i in range(n)]
    return ClientData("0", encode_pairs(handle.tokenizer, pairs, 48, False))


def _tiny4(cache):
    from fedpeft.config import ModelConfig
    from fedpeft.models import get_model

    return get_model(ModelConfig(name="tiny", tiny_layers=4), cache)


def _prune_instruction(handle, ratio, keep=b"", stages=2, rank=4, steps=5, measure=True,
                       targets=("q_proj", "v_proj", "up_proj")):  # fmt: skip
    spec = LoraSpec(rank=rank, alpha=8.0, target_modules=targets)
    layout = PruneLayout.of(handle.base_model)
    shapes = handle.module_shapes(handle.ensure_adapter(spec))
    start = layout.decode(keep) if keep else layout.full()
    adapter = cut_adapter(init_factors(shapes, spec, 3), layout, layout.full(), start)
    plan = PrunePlan(layout, ratio, keep, stages, 2, default_protect(layout), measure)
    return TrainInstruction(
        header=Header("run", 1, handle.fingerprint, spec.config_hash(), 0, "0"),
        lora=spec,
        train=TrainConfig(local_steps=steps, batch_size=4, lr=1e-2),
        adapter=adapter,
        seed=5,
        prune=plan,
    )


def test_prune_then_tune_reaches_the_ratio_and_passes_validation(cache):
    handle = _tiny4(cache)
    ins = _prune_instruction(handle, 0.5)
    before = {n: p.clone() for n, p in handle.base_model.named_parameters() if "lora_" not in n}
    up = PruneTrainer().fit(handle, ins, _data(handle))
    layout = ins.prune.layout
    keeps = layout.decode(up.keep)
    counts = target_counts(layout, 0.5, default_protect(layout))
    assert [(len(k.attn), len(k.ffn)) for k in keeps] == counts
    assert keeps[0] == layout.full()[0] and keeps[-1] == layout.full()[-1]
    assert up.metrics["prune_cuts"] == 2 and up.metrics["prune_params"] < 1
    assert up.metrics["probe_loss_end"] < up.metrics["probe_loss_start"]
    back = decode_update(
        encode_update(replace(up, header=replace(up.header, num_examples=24)), ins)
    )
    validate_update(back, ins)
    assert back.keep == up.keep
    for n, p in handle.base_model.named_parameters():  # the shared base is left as it was
        if "lora_" not in n:
            assert torch.equal(p, before[n])
    again = PruneTrainer().fit(handle, ins, _data(handle))
    assert again.keep == up.keep and all(
        torch.equal(again.factors[m].b, up.factors[m].b) for m in up.factors
    )


def test_a_pruned_start_continues_and_a_met_target_trains_without_cutting(cache):
    handle = _tiny4(cache)
    first = PruneTrainer().fit(handle, _prune_instruction(handle, 0.25), _data(handle))
    ins = _prune_instruction(handle, 0.5, keep=first.keep)
    second = PruneTrainer().fit(handle, ins, _data(handle))
    layout = ins.prune.layout
    for k0, k in zip(layout.decode(first.keep), layout.decode(second.keep), strict=True):
        assert set(k.ffn) <= set(k0.ffn)
    same = PruneTrainer().fit(
        handle, _prune_instruction(handle, 0.5, keep=second.keep), _data(handle)
    )
    assert same.keep == second.keep and same.metrics["prune_cuts"] == 0


def test_validation_refuses_bad_pruned_updates(cache):
    handle = _tiny4(cache)
    ins = _prune_instruction(handle, 0.5, steps=3, measure=False)
    up = PruneTrainer().fit(handle, ins, _data(handle))
    up = replace(up, header=replace(up.header, num_examples=24))
    layout = ins.prune.layout
    validate_update(up, ins)

    def refusal(update, instruction) -> tuple[str, str]:
        with pytest.raises(ProtocolError) as err:
            validate_update(update, instruction)
        return err.value.code, str(err.value)

    assert refusal(replace(up, keep=None), ins) == (
        "structure",
        "update carries no kept structure, but the instruction prunes",
    )
    full = layout.encode(layout.full())
    code, message = refusal(replace(up, keep=full), ins)  # shapes no longer fit the structure
    assert code == "structure" and re.search(r"A\(|B\(", message)
    later = _prune_instruction(handle, 0.5, keep=up.keep, steps=3, measure=False)
    code, message = refusal(replace(up, keep=full), later)
    assert code == "structure"
    assert re.fullmatch(r"kept structure of layer \d+ restores groups pruned before", message)
    plain = replace(ins, prune=None)
    assert refusal(up, plain) == (
        "structure", "update carries a pruned structure, but none was asked for")  # fmt: skip
    assert "probe_loss_start" not in up.metrics


def _positions(kept, begun, size):
    """Where the final structure's rows sit inside the instruction's (already cut) factors."""
    if kept is None:
        return list(range(size))
    return [int(v) for v in kept] if begun is None else [list(begun).index(v) for v in kept]


def test_validation_of_a_pruned_start_measures_the_change_at_the_right_positions(cache):
    """A client sent factors already cut to structure S0 prunes further to S1 (B rows and, for
    o_proj/down_proj, A columns). Its change is measured against the sent factors at S1's
    positions inside S0, computed here from the layout's index lists: a norm bound just
    above that change passes, just below refuses. Restoring only FFN groups is refused."""
    handle = _tiny4(cache)
    targets = ("q_proj", "o_proj", "up_proj", "down_proj")
    first = PruneTrainer().fit(handle, _prune_instruction(handle, 0.25, targets=targets),
                               _data(handle))  # fmt: skip
    ins = _prune_instruction(handle, 0.5, keep=first.keep, targets=targets, measure=False)
    up = PruneTrainer().fit(handle, ins, _data(handle))
    up = replace(up, header=replace(up.header, num_examples=24))
    layout = ins.prune.layout
    start, final = layout.decode(first.keep), layout.decode(up.keep)
    assert start != final  # it pruned further
    sq, cut_cols = 0.0, 0
    for m, sent in ins.adapter.items():
        rows0, cols0 = layout.factor_index(m, start)
        rows, cols = layout.factor_index(m, final)
        r = _positions(rows, rows0, sent.b.shape[0])
        c = _positions(cols, cols0, sent.a.shape[1])
        cut_cols += cols is not None
        f = up.factors[m]
        sq += float((f.b.double() - sent.b.double()[r]).pow(2).sum())
        sq += float((f.a.double() - sent.a.double()[:, c]).pow(2).sum())
    assert cut_cols > 0  # o_proj / down_proj: A columns were cut too
    norm = sq**0.5
    validate_update(up, ins, Limits(ValidationConfig(max_update_norm=norm * (1 + 1e-9))))
    with pytest.raises(ProtocolError, match="L2 norm") as err:
        validate_update(up, ins, Limits(ValidationConfig(max_update_norm=norm * (1 - 1e-9))))
    assert err.value.code == "norm"
    regrown = layout.encode([Keep(attn=k1.attn, ffn=k.ffn) for k, k1 in
                             zip(layout.full(), final, strict=True)])  # fmt: skip
    with pytest.raises(ProtocolError, match=r"^kept structure of layer \d+ restores groups"):
        validate_update(replace(up, keep=regrown), ins)


def test_pruning_instruction_round_trips_on_the_wire(cache):
    handle = _tiny4(cache)
    ins = _prune_instruction(handle, 0.5, keep=b"")
    back = decode_instruction(encode_instruction(ins))
    assert back.prune == ins.prune
    with pytest.raises(ProtocolError, match="compress.up"):
        replace(ins, compress=replace(ins.compress, up="int8"))


# ---------------------------------------------------------------------------- strategy

REPO = Path(__file__).resolve().parents[1]
LAYOUT = PruneLayout("llama", (LayerLayout(groups=2, per_group=1, head_dim=2, ffn=4),) * 3)
MODULES = {"model.layers.1.self_attn.q_proj": (4, 6), "model.layers.1.mlp.down_proj": (6, 4)}
SPEC = LoraSpec(rank=2, alpha=4.0, target_modules=("q_proj", "down_proj"))


def _strategy(arms, **opts):
    initial = init_factors(MODULES, SPEC, 0)
    ctx = StrategyContext(initial=initial, spec=SPEC, seed=0, layout=LAYOUT)
    return FedSpine(FedSpine.Config(arms=arms, **opts), ctx)


def _pruned_update(cid, keeps, rank, n, seed):
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for m, (out, inp) in MODULES.items():
        rows, cols = LAYOUT.factor_index(m, keeps)
        o = len(rows) if rows is not None else out
        i = len(cols) if cols is not None else inp
        factors[m] = LoraFactors(a=torch.randn(rank, i, generator=g),
                                 b=torch.randn(o, rank, generator=g), alpha=4.0)  # fmt: skip
    header = Header("run", 1, "fp", "h", n, cid)
    return LoraUpdate(header, factors, {"train_loss": 1.0}, LAYOUT.encode(keeps))


def _clients(ids):
    from fedpeft.wire.messages import ClientInfo

    return [ClientInfo(Header("r", 0, "fp", "", 10, c), "cpu") for c in ids]


def test_masked_aggregation_averages_each_coordinate_over_its_keepers():
    strat = _strategy([[0.0, 2.0], [0.5, 1.0]])
    strat.configure_train(1, _clients(["a", "b", "c"]))
    full = LAYOUT.full()
    k_b = [full[0], Keep(attn=(1,), ffn=(0, 3)), full[2]]
    ups = [
        _pruned_update("a", full, 2, 10, 1),
        _pruned_update("b", k_b, 1, 30, 2),
        _pruned_update("c", full, 1, 20, 3),
    ]
    prev = copy.deepcopy(strat._global.adapter)
    res = strat.aggregate_train(1, ups)
    q, down = "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    unit = {
        u.header.client_id: {m: (f.a, f.b * f.scale) for m, f in u.factors.items()} for u in ups
    }
    b = res.adapter[q].b
    # q rows 0..1 are head 0: b pruned it; rank component 0 is everyone's, 1 only a's
    torch.testing.assert_close(
        b[0, 0], (10 * unit["a"][q][1][0, 0] + 20 * unit["c"][q][1][0, 0]) / 30
    )
    want = (
        10 * unit["a"][q][1][2, 0] + 30 * unit["b"][q][1][0, 0] + 20 * unit["c"][q][1][2, 0]
    ) / 60
    torch.testing.assert_close(b[2, 0], want)
    torch.testing.assert_close(b[2, 1], unit["a"][q][1][2, 1])
    # down_proj A columns 1, 2 (channels b pruned) average over a and c only
    a = res.adapter[down].a
    torch.testing.assert_close(
        a[0, 1], (10 * unit["a"][down][0][0, 1] + 20 * unit["c"][down][0][0, 1]) / 30
    )
    torch.testing.assert_close(
        a[0, 3],
        (
            10 * unit["a"][down][0][0, 3]
            + 30 * unit["b"][down][0][0, 1]
            + 20 * unit["c"][down][0][0, 3]
        )
        / 60,
    )
    assert res.metrics["arm_rank/b"] in (1.0, 2.0)
    # a coordinate nobody kept keeps its previous value
    strat.configure_train(2, _clients(["b"]))
    after = strat.aggregate_train(2, [ups[1]]).adapter
    assert (
        torch.equal(after[q].b[:2], res.adapter[q].b[:2]) and res.metrics["fedspine_covered"] == 1
    )
    assert not torch.equal(after[q].b[2:, :1], res.adapter[q].b[2:, :1])
    assert torch.equal(prev[q].b, torch.zeros_like(prev[q].b))


def test_a_single_unpruned_arm_is_fedavg(make_update):
    strat = _strategy([[0.0, 2.0]])
    strat.configure_train(1, _clients(["0", "1", "2"]))
    ups = []
    for i in range(3):
        u = _pruned_update(str(i), LAYOUT.full(), 2, 10 + 7 * i, i)
        ups.append(replace(u, keep=None))
    got = strat.aggregate_train(1, ups)
    n = [10, 17, 24]  # FedAvg written out: A and B each averaged with weights n_k / 51,
    for m in MODULES:  # B at unit scale (alpha / r = 4 / 2 folded in; the global's alpha = rank)
        f = [u.factors[m] for u in ups]
        assert got.adapter[m].alpha == got.adapter[m].a.shape[0] == 2
        want_a = sum(n[i] * f[i].a.double() for i in range(3)) / 51
        want_b = sum(n[i] * 2.0 * f[i].b.double() for i in range(3)) / 51
        torch.testing.assert_close(got.adapter[m].a.double(), want_a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.adapter[m].b.double(), want_b, rtol=1e-5, atol=1e-6)


def test_plans_start_from_the_last_structure_only_when_it_fits_the_arm():
    strat = _strategy([[0.0, 2.0], [0.5, 2.0]])
    keeps = [LAYOUT.full()[0], Keep(attn=(1,), ffn=(0, 3)), LAYOUT.full()[2]]
    strat._keeps["a"] = (0.5, LAYOUT.encode(keeps))
    plan = strat._plan("a", Arm(0.5, 2))
    assert plan.prune.keep == LAYOUT.encode(keeps)
    assert plan.adapter["model.layers.1.self_attn.q_proj"].b.shape == (2, 2)
    assert plan.adapter["model.layers.1.mlp.down_proj"].a.shape == (2, 2)
    assert strat._plan("a", Arm(0.0, 2)).prune.keep == b""  # less pruning: the whole model


def test_state_round_trips_and_continues_identically():
    a = _strategy([[0.0, 2.0], [0.5, 1.0]])
    for rnd in (1, 2):
        a.configure_train(rnd, _clients(["x", "y"]))
        ups = [_pruned_update(c, LAYOUT.full(), 1, 10, rnd) for c in ("x", "y")]
        ups = [
            replace(u, metrics={"probe_loss_start": 2.0, "probe_loss_end": 1.5, "client_s": 3.0})
            for u in ups
        ]
        a.aggregate_train(rnd, ups)
    b = _strategy([[0.0, 2.0], [0.5, 1.0]])
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    pa, pb = a.configure_train(3, _clients(["x", "y"])), b.configure_train(3, _clients(["x", "y"]))
    assert {c: p.prune for c, p in pa.items()} == {c: p.prune for c, p in pb.items()}
    assert (
        a.bandit.state_dict() == b.bandit.state_dict()
        and len(a.bandit.state_dict()["history"]["x"]) == 2
    )


def test_reward_is_the_loss_drop_less_a_charge_for_delaying_the_round():
    times = {"fast": 1.0, "slow": 4.0, "mid": 2.0}  # the median device takes 2 s
    r = fedspine_reward({"fast": 0.2, "slow": 0.2, "mid": 0.2}, times, 0.5)
    assert r["fast"] == r["mid"] == pytest.approx(1.0)  # not slower than typical: no charge
    assert r["slow"] == pytest.approx(1.0 - 0.5 * 3 * (4.0 / 2.0 - 1))  # 3 devices wait
    drops = fedspine_reward({"a": 0.1, "b": 0.3, "c": 0.2}, {"a": 1.0, "b": 1.0, "c": 1.0}, 0.5)
    assert drops == pytest.approx({"a": 0.5, "b": 1.5, "c": 1.0})  # scale-free: / median drop


def test_config_is_validated():
    for bad, match in (
        ({"arms": []}, "at least one"),
        ({"arms": [[1.0, 4.0]]}, "ratio"),
        ({"arms": [[0.5, 2.5]]}, "integer rank"),
        ({"arms": [[0.5, 2.0], [0.5, 2.0]]}, "repeat"),
        ({"bandit": "nope"}, "unknown bandit"),
        ({"bandit_options": {"nope": 1.0}}, "nope"),
    ):
        with pytest.raises(ConfigError, match=match):
            FedSpine.Config(**bad)


# ---------------------------------------------------------------------------- end to end


def test_tiny_fedspine_simulation_learns_with_mixed_arms(tiny_config, tmp_path, cache):
    cfg = tiny_config(
        "strategy.name=fedspine",
        "model.tiny_layers=4",
        'lora.target_modules=["q_proj","v_proj","up_proj"]',
        'devices.tiers=["tx2","xavier-nx","agx"]',
        "federation.rounds=3",
    )
    summary = simulate(cfg, tmp_path, quiet=True, cache=cache)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["failures"] == {} and r["clients"] == 3 for r in rows[1:])
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert rows[-1]["sim_wall_s"] > rows[1]["sim_wall_s"] > 0
    ratios = {r[f"arm_ratio/{c}"] for r in rows[1:] for c in r["client_ids"]}
    assert len(ratios) > 1 and "fedspine_reward_mean" in rows[1]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    # the deployment view: every device's own model (its structure, its rank's slice)
    from fedpeft.models import get_model
    from fedpeft.prune.deployed import base_params

    full = base_params(get_model(cfg.model, cache).base_model)
    tiers = {"0": "tx2", "1": "xavier-nx", "2": "agx"}
    pruned = 0
    for r in rows[1:]:
        assert sorted(r["device_eval_loss"]) == ["0", "1", "2"]  # all three trained in round 1
        for c, loss in r["device_eval_loss"].items():
            last = max(x["round"] for x in rows[1 : r["round"] + 1] if c in x["client_ids"])
            arm = (rows[last][f"arm_ratio/{c}"], rows[last][f"arm_rank/{c}"])
            params = r["device_params"][c]
            if arm == (0.0, 8.0):  # unpruned at the global's rank: the global model itself
                assert params == full and loss == r["eval_loss"], (r["round"], c)
            else:
                assert params < full or arm[1] < 8.0, (r["round"], c, arm, params)
                pruned += params < full
            assert r["device_eval_loss_tier"][tiers[c]] == loss
            assert r["device_forward_s"][c] > 0
        assert r["device_eval_loss_mean"] == pytest.approx(
            sum(r["device_eval_loss"].values()) / 3, abs=1e-12
        )
    assert pruned > 0, rows
    # the task metric of each device model where the global one was computed (the last round)
    metric = f"eval_{cfg.data.metric}"
    assert all(f"device_{metric}" not in r for r in rows[1:-1])
    last = rows[-1]
    scores = last[f"device_{metric}"]
    assert sorted(scores) == ["0", "1", "2"] and all(0 <= v <= 1 for v in scores.values())
    assert last[f"device_{metric}_mean"] == pytest.approx(sum(scores.values()) / 3, abs=1e-12)
    assert last[f"device_{metric}_tier"] == {tiers[c]: v for c, v in scores.items()}
    for c, loss in last["device_eval_loss"].items():
        if loss == last["eval_loss"] and last["device_params"][c] == full:
            assert scores[c] == last[metric]  # the global model itself: the same generations


def test_the_noop_trainer_echoes_fedspine_plans_at_the_structure_it_was_sent(
    tiny_config, tmp_path, cache
):
    """``train.trainer = "noop"`` (the overhead benchmarks) applies to FedSpine too: every
    client echoes the factors at the structure it was sent, so the global stays as it was."""
    cfg = tiny_config("strategy.name=fedspine", "train.trainer=noop", "federation.rounds=2")
    summary = simulate(cfg, tmp_path, quiet=True, cache=cache)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["failures"] == {} and r["clients"] > 0 for r in rows[1:]), rows[1]
    assert summary["after"]["eval_loss"] == summary["before"]["eval_loss"]


def test_validation_reward_scores_each_update_on_the_whole_model():
    """With validation records the reward is how much each device's update alone lowers the
    coordinator's validation loss; devices then skip the probe forward."""
    target = {m: torch.full((out, 2), 0.5) for m, (out, _) in MODULES.items()}

    def val_loss(spec, adapter):  # a stand-in for the loss on validation records
        return float(
            sum(((adapter[m].b * adapter[m].scale - target[m]) ** 2).sum() for m in target)
        )

    initial = init_factors(MODULES, SPEC, 0)
    ctx = StrategyContext(
        initial=initial, spec=SPEC, seed=0, layout=LAYOUT, validation_loss=val_loss
    )
    strat = FedSpine(FedSpine.Config(arms=[[0.0, 2.0], [0.5, 2.0]]), ctx)
    plans = strat.configure_train(1, _clients(["good", "bad"]))
    assert not any(p.prune.measure for p in plans.values())
    ups = []
    for cid, value in (("good", 0.5), ("bad", -3.0)):
        u = _pruned_update(cid, LAYOUT.full(), 2, 10, 0)
        factors = {m: LoraFactors(a=f.a, b=torch.full_like(f.b, value) / f.scale, alpha=f.alpha)
                   for m, f in u.factors.items()}  # fmt: skip
        ups.append(replace(u, factors=factors, keep=None, metrics={"client_s": 1.0}))
    res = strat.aggregate_train(1, ups)
    history = strat.bandit.state_dict()["history"]
    assert history["good"][0][1] > 0 > history["bad"][0][1]
    assert res.metrics["fedspine_gain_mean"] != 0
    with pytest.raises(ConfigError, match="validation records"):
        FedSpine(
            FedSpine.Config(reward="validation"), replace(ctx, validation_loss=None)
        ).configure_train(1, _clients(["x"]))


def test_a_device_never_plays_an_arm_its_memory_budget_excludes():
    """Footprints measured by any device (the big one explores every arm) rule arms out for a
    device whose budget they exceed, and also an arm pruning no more with no lower rank than
    one that does; the memory table survives a state round trip."""
    from fedpeft.wire.messages import ClientInfo

    arms = [[0.0, 2.0], [0.5, 2.0], [0.5, 1.0]]
    foot = {0: 150.0, 1: 120.0, 2: 90.0}  # MiB at each arm's own structure
    small = ClientInfo(Header("r", 0, "fp", "", 10, "small"), "cpu", {"memory_mb": 100.0})
    big = ClientInfo(Header("r", 0, "fp", "", 10, "big"), "cpu", {"memory_mb": 1000.0})
    strat = _strategy(arms)
    measured: set[int] = set()
    played: list[int] = []
    for rnd in range(1, 9):
        over = [j for j in measured if foot[j] > 100]
        excluded = {
            i for i, (r, k) in enumerate(arms) for j in over if r <= arms[j][0] and k >= arms[j][1]
        }
        assert strat.fitting("small", 100.0) == sorted(set(range(3)) - excluded)
        strat.configure_train(rnd, [big, small])
        pending = dict(strat._pending)
        assert pending["small"] not in excluded, (rnd, pending, excluded)
        played.append(pending["small"])
        ups = []
        for cid, i in sorted(pending.items()):
            u = _pruned_update(cid, LAYOUT.full(), int(arms[i][1]), 10, rnd)
            metrics = {"probe_loss_start": 2.0, "probe_loss_end": 1.5, "client_s": 1.0,
                       "peak_mem_mb": foot[i], "prune_cuts": 0.0}  # fmt: skip
            ups.append(replace(u, keep=None, metrics=metrics))
            measured.add(i)
        strat.aggregate_train(rnd, ups)
    assert excluded == {0, 1} and played[-3:] == [2, 2, 2]
    copy_ = _strategy(arms)
    copy_.load_state_dict(copy.deepcopy(strat.state_dict()))
    assert copy_.fitting("small", 100.0) == [2] and copy_.fitting("big", None) == [0, 1, 2]
    assert copy_.footprint("small", 0) == 150.0  # measured by the big device only


def test_an_exported_device_model_loads_with_transformers_and_peft_alone(tiny_config, tmp_path):
    """``fedpeft export-device``: a pruned device's model, loaded by ``transformers`` and
    ``peft`` only, gives the loss fedpeft reported for that device (its structurally pruned
    model) to 1e-5, and ``device.json`` counts the parameters the device holds."""
    cfg = tiny_config(
        "strategy.name=fedspine",
        "model.tiny_layers=4",
        'lora.target_modules=["q_proj","v_proj","up_proj","down_proj","o_proj"]',
        "strategy.options.arms=[[0.5, 4.0]]",
        "federation.rounds=2",
        "federation.num_clients=2",
    )
    simulate(cfg, tmp_path / "run", quiet=True, cache=ProcessCache())
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    cmd = [sys.executable, "-m", "fedpeft.cli", "export-device", str(tmp_path / "run"),
           "--client", "1", "--out", str(tmp_path / "dev")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dev" / "model")
    model = PeftModel.from_pretrained(model, tmp_path / "dev" / "adapter").eval()
    from fedpeft.data.clients import get_task
    from fedpeft.evaluation import EvalSet, eval_loss
    from fedpeft.models import get_model

    handle = get_model(cfg.model, ProcessCache())
    evalset = EvalSet.build(cfg, get_task(cfg.data, 0, ProcessCache()).eval, handle.tokenizer)
    with torch.no_grad():
        loss, _ = eval_loss(model, evalset.examples, cfg.eval.batch_size,
                            handle.tokenizer.pad_token_id, torch.device("cpu"))  # fmt: skip
    assert abs(loss - last["device_eval_loss"]["1"]) <= 1e-5, (loss, last["device_eval_loss"])
    assert abs(loss - last["eval_loss"]) > 1e-4  # the pruned model, not the global (3e-4 off)
    info = json.loads((tmp_path / "dev" / "device.json").read_text())
    assert info["params_deployed"] == last["device_params"]["1"] < info["params_base"]
    missing = subprocess.run(cmd[:-4] + ["--client", "7", "--out", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=600, cwd=REPO)  # fmt: skip
    assert missing.returncode != 0 and "devices that have one: ['0', '1']" in missing.stderr


def test_a_device_whose_update_does_not_come_back_is_a_failed_pull():
    """No gain, charged as a straggler that doubled the round: -delay_penalty x n."""
    strat = _strategy([[0.0, 2.0], [0.5, 1.0]], delay_penalty=0.5)
    strat.configure_train(1, _clients(["x", "y", "z"]))
    arms = dict(strat._pending)
    ups = []
    for cid in ("x", "y"):  # z missed the deadline
        u = _pruned_update(cid, LAYOUT.full(), int(strat.arms[arms[cid]].rank), 10, 1)
        metrics = {"probe_loss_start": 2.0, "probe_loss_end": 1.5, "client_s": 1.0}
        ups.append(replace(u, keep=None, metrics=metrics))
    got = strat.aggregate_train(1, ups)
    assert got.metrics["fedspine_failed_pulls"] == 1.0
    assert strat.bandit.state_dict()["history"]["z"] == [[arms["z"], -0.5 * 3]]


def test_a_device_that_cannot_hold_the_whole_model_starts_from_the_coordinators_structure(
    tiny_config, tmp_path
):
    """A model whose weights dominate its training memory (short sequences): device 0's
    15 MiB hold a 0.75-pruned start (12 MiB measured) but not a round begun on the whole model
    (about 20 MiB). It fails round 1 (nothing is measured yet), then never plays the unpruned
    arm, begins the pruned arm from the coordinator's magnitude structure and trains every
    round; the others, with room, keep pruning on the device."""
    devices = tmp_path / "devices.json"
    link = {"speed": 1.0, "up_mbps": 100.0, "down_mbps": 100.0}
    devices.write_text(json.dumps({"0": {**link, "memory_mb": 15.0},
                                   "1": {**link, "memory_mb": 4096.0},
                                   "2": {**link, "memory_mb": 4096.0}}))  # fmt: skip
    cfg = tiny_config(
        "strategy.name=fedspine",
        "model.tiny_layers=6",
        "model.tiny_hidden_size=256",
        "train.batch_size=2",
        "train.max_seq_len=32",
        'lora.target_modules=["q_proj","v_proj","up_proj"]',
        "strategy.options.arms=[[0.0, 8.0], [0.75, 4.0]]",
        "federation.rounds=4",
        "federation.min_clients=1",
        f"devices.file={str(devices)!r}",
    )
    simulate(cfg, tmp_path / "run", quiet=True, cache=ProcessCache())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[1]["failures"]) <= {"0"}
    assert all(f.startswith("memory:") for f in rows[1]["failures"].values())
    for r in rows[2:]:
        assert r["failures"] == {} and "0" in r["client_ids"], r
        assert r["arm_ratio/0"] == 0.75 and r["client_peak_mem_mb"]["0"] <= 15.0, r
    whole = [r["client_peak_mem_mb"][c] for r in rows[1:2] for c in r["client_ids"]]
    assert min(whole) > 15.0  # what a round begun on the whole model needs here


def test_magnitude_structure_keeps_the_groups_of_largest_weights(small_model):
    """Layer 1 of a 3-layer model (the ends are protected): attention groups 0 and 2 and FFN
    channels 0..47 are made the largest; ratio 0.5 keeps 2 of 3 groups and 48 of 96 channels,
    exactly those. LoRA layers on the model (as on the coordinator's shared model) change
    nothing."""
    from peft import LoraConfig, get_peft_model

    from fedpeft.prune.magnitude import magnitude_structure

    model = small_model("llama", 3)
    layer = model.model.layers[1]
    with torch.no_grad():
        layer.self_attn.o_proj.weight[:, 0:16] *= 100  # group 0: query heads 0, 1 (dim 8)
        layer.self_attn.o_proj.weight[:, 32:48] *= 50  # group 2: heads 4, 5
        layer.mlp.down_proj.weight[:, :48] *= 100
    layout = PruneLayout.of(model)
    got = magnitude_structure(model, layout, 0.5, (0, 2))
    assert got[1] == Keep(attn=(0, 2), ffn=tuple(range(48)))
    assert got[0] == layout.full()[0] and got[2] == layout.full()[2]
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    assert magnitude_structure(wrapped, layout, 0.5, (0, 2)) == got


def test_regrow_keeps_the_devices_groups_and_adds_back_those_of_largest_weight(small_model):
    """Layer 1 keeps attention group 1 and FFN channels 60..83 (not the largest); grown to
    ratio 0.5 it keeps all of them and gets back group 0 (the largest of the removed) and 24
    channels from the largest removed ones (0..47); grown to 0 it is whole; a layer already
    small enough at the target is unchanged."""
    from fedpeft.prune.magnitude import magnitude_scores, regrow

    model = small_model("llama", 3)
    layer = model.model.layers[1]
    with torch.no_grad():
        layer.self_attn.o_proj.weight[:, 0:16] *= 100  # group 0
        layer.mlp.down_proj.weight[:, :48] *= 100  # channels 0..47
    layout = PruneLayout.of(model)
    scores = magnitude_scores(model, layout)
    full = layout.full()
    mine = [full[0], Keep(attn=(1,), ffn=tuple(range(60, 84))), full[2]]
    got = regrow(layout, mine, scores, 0.5, (0, 2))
    assert got[1].attn == (0, 1) and set(mine[1].ffn) <= set(got[1].ffn)
    assert len(got[1].ffn) == 48 and set(got[1].ffn) - set(mine[1].ffn) <= set(range(48))
    assert got[0] == full[0] and got[2] == full[2]
    assert regrow(layout, mine, scores, 0.0, (0, 2)) == full
    assert regrow(layout, mine, scores, 0.75, (0, 2)) == mine


def test_a_device_moving_to_a_less_pruned_arm_grows_its_structure_back():
    """From 0.5 to 0.25 the device continues from its structure grown back by the coordinator
    (not the whole model); without regrow, or to the unpruned arm, it starts whole."""
    keeps = [LAYOUT.full()[0], Keep(attn=(1,), ffn=(0, 3)), LAYOUT.full()[2]]
    asked = []

    def start(ratio, keep=b""):
        asked.append((ratio, keep))
        return LAYOUT.encode([LAYOUT.full()[0], Keep(attn=(1,), ffn=(0, 2, 3)), LAYOUT.full()[2]])

    for regrow, want in ((True, True), (False, False)):
        asked.clear()
        initial = init_factors(MODULES, SPEC, 0)
        ctx = StrategyContext(initial=initial, spec=SPEC, seed=0, layout=LAYOUT,
                              magnitude_start=start)  # fmt: skip
        strat = FedSpine(FedSpine.Config(arms=[[0.0, 2.0], [0.25, 2.0], [0.5, 2.0]],
                                         regrow=regrow), ctx)  # fmt: skip
        strat._keeps["a"] = (0.5, LAYOUT.encode(keeps))
        plan = strat._plan("a", Arm(0.25, 2))
        assert (plan.prune.keep != b"") == want and bool(asked) == want
        if want:
            assert asked == [(0.25, LAYOUT.encode(keeps))]
            assert plan.adapter["model.layers.1.mlp.down_proj"].a.shape == (2, 3)
        assert strat._plan("a", Arm(0.0, 2)).prune.keep == b""


def test_start_magnitude_prunes_once_on_the_coordinator():
    """``start = "magnitude"``: a pruned arm begins from the coordinator's structure at its
    ratio, so the device has nothing left to cut; without the base weights it is refused."""
    target = LAYOUT.encode([LAYOUT.full()[0], Keep(attn=(0,), ffn=(1, 2)), LAYOUT.full()[2]])
    initial = init_factors(MODULES, SPEC, 0)
    ctx = StrategyContext(initial=initial, spec=SPEC, seed=0, layout=LAYOUT,
                          magnitude_start=lambda ratio, keep=b"": target)  # fmt: skip
    strat = FedSpine(FedSpine.Config(arms=[[0.5, 2.0]], start="magnitude"), ctx)
    assert strat._plan("a", Arm(0.5, 2)).prune.keep == target
    with pytest.raises(ConfigError, match="magnitude"):
        _strategy([[0.5, 2.0]], start="magnitude")
    with pytest.raises(ConfigError, match="start"):
        FedSpine.Config(start="lottery")


def test_a_device_that_cannot_hold_the_whole_model_starts_from_a_scored_structure():
    """Once a device that held the whole model has pruned to a ratio with its own scores, a
    device that cannot hold the whole model begins that arm from that structure (the one
    whose update gained most), not from the magnitude structure; with ``start = "magnitude"``
    from the magnitude structure; the choice survives a state round trip."""
    from fedpeft.wire.messages import ClientInfo

    magnitude = LAYOUT.encode([LAYOUT.full()[0], Keep(attn=(0,), ffn=(0, 1)), LAYOUT.full()[2]])
    scored = {
        "a": [LAYOUT.full()[0], Keep(attn=(1,), ffn=(2, 3)), LAYOUT.full()[2]],
        "b": [LAYOUT.full()[0], Keep(attn=(1,), ffn=(0, 3)), LAYOUT.full()[2]],
    }
    weak = ClientInfo(Header("r", 0, "fp", "", 10, "weak"), "cpu", {"memory_mb": 50.0})
    for start, want in (("own", LAYOUT.encode(scored["b"])), ("magnitude", magnitude)):
        initial = init_factors(MODULES, SPEC, 0)
        ctx = StrategyContext(initial=initial, spec=SPEC, seed=0, layout=LAYOUT,
                              magnitude_start=lambda ratio, keep=b"": magnitude)  # fmt: skip
        pins = {"a": 1.0, "b": 1.0, "weak": 1.0}
        strat = FedSpine(FedSpine.Config(arms=[[0.0, 2.0], [0.5, 2.0]], start=start,
                                         bandit="pinned", bandit_options=pins), ctx)  # fmt: skip
        plans = strat.configure_train(1, _clients(["a", "b"]))
        assert all(p.prune.keep == (b"" if start == "own" else magnitude) for p in plans.values())
        ups = []
        for cid, drop in (("a", 0.1), ("b", 0.3)):  # b's update gained more
            keeps = scored[cid] if start == "own" else LAYOUT.decode(magnitude)
            u = _pruned_update(cid, keeps, 2, 10, 1)
            metrics = {"probe_loss_start": 2.0, "probe_loss_end": 2.0 - drop, "client_s": 1.0,
                       "peak_mem_mb": 100.0, "prune_cuts": 1.0}  # fmt: skip
            ups.append(replace(u, metrics=metrics))
        strat.aggregate_train(1, ups)
        assert strat._whole_peak == (100.0 if start == "own" else None)
        strat._whole_peak = 100.0  # (what a round begun whole measured: above weak's 50 MiB)
        again = FedSpine(FedSpine.Config(arms=[[0.0, 2.0], [0.5, 2.0]], start=start,
                                         bandit="pinned", bandit_options=pins), ctx)  # fmt: skip
        again.load_state_dict(copy.deepcopy(strat.state_dict()))
        for s in (strat, again):
            assert s.configure_train(2, [weak])["weak"].prune.keep == want, start
