"""Heterogeneous ranks and compression end to end: wire, client training, tiny simulations."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fedpeft.client.trainer import ClientData, LoraTrainer
from fedpeft.config import CompressConfig, TrainConfig
from fedpeft.config.load import load_config
from fedpeft.data.tasks import TextPair
from fedpeft.data.tokenize import encode_pairs
from fedpeft.errors import ConfigError, ProtocolError
from fedpeft.lora.handle import init_factors
from fedpeft.server.validate import validate_update
from fedpeft.simulation.runner import simulate
from fedpeft.wire.messages import (
    Header,
    LoraFactors,
    LoraSpec,
    TrainInstruction,
    decode_instruction,
    decode_update,
    encode_instruction,
    encode_update,
)

SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


def _instruction(adapter, parts="AB", base=None, compress=None, spec=SPEC):
    return TrainInstruction(
        header=Header("run", 1, "fp", spec.config_hash(), 0, "0"),
        lora=spec,
        train=TrainConfig(local_steps=3, batch_size=4, lr=1e-2),
        adapter=adapter,
        seed=5,
        parts=parts,
        base=base,
        compress=compress or CompressConfig(),
    )


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_partial_update_sends_one_factor_and_takes_the_other_from_the_instruction(make_update):
    sent = make_update(rank=4)
    trained = make_update(rank=4, seed=1)
    ins = _instruction(sent.factors, parts="B")
    content = encode_update(trained, ins)
    assert not any(k.endswith("::A") for k in content["fedpeft.tensors"])
    back = decode_update(content, reference=sent.factors)
    for m, f in back.factors.items():
        assert torch.equal(f.a, sent.factors[m].a) and torch.equal(f.b, trained.factors[m].b)
    with pytest.raises(ProtocolError, match="needs the instruction"):
        decode_update(content)


def test_a_frozen_factor_that_changed_is_rejected(make_update):
    sent = make_update(rank=4)
    trained = make_update(rank=4, seed=1)  # both factors differ from the instruction's
    ins = _instruction(sent.factors, parts="B")
    content = encode_update(trained)  # a client that ignored `parts` and sent A and B
    back = decode_update(content, reference=sent.factors)
    header = replace(ins.header, num_examples=5)
    with pytest.raises(ProtocolError, match="trains only B"):
        validate_update(replace(back, header=header), ins)
    ok = decode_update(encode_update(trained, ins), reference=sent.factors)
    validate_update(replace(ok, header=header), ins)


def test_lossy_upload_is_a_delta_against_the_instruction(make_update):
    sent = make_update(rank=4)
    trained = make_update(rank=4, seed=1)
    ins = _instruction(sent.factors, compress=CompressConfig(up="int8"))
    back = decode_update(encode_update(trained, ins), reference=sent.factors)
    for m, f in back.factors.items():
        delta = trained.factors[m].b - sent.factors[m].b
        bound = delta.abs().amax(dim=0, keepdim=True) / 254 + 1e-6  # one scale per component
        assert ((f.b - trained.factors[m].b).abs() <= bound).all()


def test_instruction_round_trips_base_parts_and_codecs(make_update):
    base = make_update(rank=6, seed=2).factors
    ins = _instruction(
        make_update().factors, parts="A", base=base, compress=CompressConfig(up="topk", ratio=0.2)
    )
    back = decode_instruction(encode_instruction(ins))
    assert back.parts == "A" and back.compress == ins.compress and back.base is not None
    assert all(torch.equal(back.base[m].b, base[m].b) for m in base)


def test_merged_base_acts_like_the_adapter_and_restores_exactly(tiny_handle):
    h = tiny_handle
    name = h.ensure_adapter(SPEC)
    shapes = h.module_shapes(name)
    g = torch.Generator().manual_seed(0)
    extra = {
        m: LoraFactors(torch.randn(3, i, generator=g), torch.randn(o, 3, generator=g), 3.0)
        for m, (o, i) in shapes.items()
    }
    zero = init_factors(shapes, SPEC, 0)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    before = {k: v.clone() for k, v in h.base_model.state_dict().items() if "lora_" not in k}
    h.set_factors(name, zero)
    with torch.no_grad():
        plain = h.peft_model(name)(input_ids=ids).logits
        with h.merged(extra):
            merged = h.peft_model(name)(input_ids=ids).logits
        spec3 = LoraSpec(rank=3, alpha=3.0, target_modules=SPEC.target_modules)
        n3 = h.ensure_adapter(spec3)
        h.set_factors(n3, extra)
        as_adapter = h.peft_model(n3)(input_ids=ids).logits
    assert torch.allclose(merged, as_adapter, atol=1e-5) and not torch.allclose(merged, plain)
    after = h.base_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_trainer_freezes_the_untrained_factor(tiny_handle):
    h = tiny_handle
    shapes = h.module_shapes(h.ensure_adapter(SPEC))
    start = init_factors(shapes, SPEC, 0)
    start = {m: replace(f, b=torch.randn_like(f.b) * 0.01) for m, f in start.items()}
    pairs = [TextPair(prompt=f"word {i}", target=f"meaning {i}") for i in range(8)]
    data = ClientData("0", encode_pairs(h.tokenizer, pairs, 32, False))
    for parts in ("A", "B"):
        up = LoraTrainer().fit(h, _instruction(start, parts=parts), data)
        for m, f in up.factors.items():
            same_a, same_b = torch.equal(f.a, start[m].a), torch.equal(f.b, start[m].b)
            assert (same_a, same_b) == ((False, True) if parts == "A" else (True, False))


def test_rank_config_is_validated():
    with pytest.raises(ConfigError, match="ranks.mode = 'tiers' needs tiers"):
        load_config(None, ["ranks.mode=tiers"])
    with pytest.raises(ConfigError, match="compress.down"):
        load_config(None, ["compress.down=topk"])


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora", "flora", "ffa", "rolora"])
def test_mixed_ranks_train_end_to_end(strategy, tiny_config, tmp_path, cache):
    cfg = tiny_config(f"strategy.name={strategy}", "ranks.mode=tiers", "ranks.tiers=[2,4,8]")
    summary = simulate(cfg, tmp_path, quiet=True, cache=cache)
    rows = _rows(tmp_path)
    assert all(r["failures"] == {} and r["clients"] == 3 for r in rows[1:])
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_one_factor_strategies_upload_one_factor(tiny_config, tmp_path, cache):
    payload = {}
    for strategy in ("fedavg", "ffa", "rolora"):
        simulate(
            tiny_config(f"strategy.name={strategy}"), tmp_path / strategy, quiet=True, cache=cache
        )
        payload[strategy] = [r["payload_up"] for r in _rows(tmp_path / strategy)[1:]]
    # FFA sends B every round, RoLoRA B then A: together one FedIT upload (A and B)
    assert payload["ffa"][0] == payload["ffa"][1] == payload["rolora"][0]
    assert payload["rolora"][0] + payload["rolora"][1] == payload["fedavg"][0]
    assert payload["ffa"][0] < payload["fedavg"][0]


def test_codecs_shrink_the_upload_and_still_learn(tiny_config, tmp_path, cache):
    got = {}
    for codec in ("none", "int8", "topk"):
        cfg = tiny_config(f"compress.up={codec}", "compress.ratio=0.1")
        got[codec] = simulate(cfg, tmp_path / codec, quiet=True, cache=cache)
        rows = _rows(tmp_path / codec)
        assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    up = {c: s["payload_up_per_client_round"] for c, s in got.items()}
    assert up["int8"] < 0.3 * up["none"] and up["topk"] < 0.25 * up["none"]


def test_hetlora_self_pruning_lowers_a_clients_rank(tiny_config, tmp_path, cache):
    cfg = tiny_config(
        "strategy.name=hetlora",
        "ranks.mode=tiers",
        "ranks.tiers=[8]",
        "federation.rounds=3",
        'strategy.options={"reg_lambda"=1.0,"reg_gamma"=0.5}',
    )
    simulate(cfg, tmp_path, quiet=True, cache=cache)
    rows = _rows(tmp_path)
    assert rows[1].get("hetlora_pruned_clients", 0) >= 1


@pytest.mark.ray
def test_ray_runs_mixed_ranks_and_top_k_with_error_feedback_like_in_process(
    tiny_config, tmp_path, cache
):
    """FLoRA's merged base and a top-k upload with error feedback behave the same on Ray:
    each node's residual lives in its Context.state, which Flower carries between actors
    (it used to live in one actor's process and restarted unseen on another)."""
    cfg = tiny_config(
        "strategy.name=flora",
        "ranks.mode=tiers",
        "ranks.tiers=[2,4,8]",
        "compress.up=topk",
        "compress.ratio=0.3",
        "federation.rounds=3",
        "simulation.ray_num_cpus=1",
    )
    simulate(cfg, tmp_path / "inprocess", quiet=True, cache=cache)
    simulate(cfg, tmp_path / "ray", backend="ray", quiet=True)
    keys = ("eval_loss", "train_loss", "payload_up", "payload_down", "flora_global_rank")
    ip, ray = _rows(tmp_path / "inprocess"), _rows(tmp_path / "ray")
    assert [{k: r.get(k) for k in keys} for r in ip] == [{k: r.get(k) for k in keys} for r in ray]
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "inprocess" / adapter).read_bytes() == (
        tmp_path / "ray" / adapter
    ).read_bytes()


def _tensor_bytes(content) -> int:
    return sum(a.numpy().nbytes for a in content["fedpeft.tensors"].values())


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_compressed_download_decodes_within_its_bound_and_shrinks_the_tensors(codec, make_update):
    """compress.down: the client loads the instruction's adapter within the codec's error
    (fp16: relative 2^-11; int8: half a step of max|row| / 127 per rank component)."""
    sent = make_update(rank=4, seed=3)
    plain = encode_instruction(_instruction(sent.factors))
    content = encode_instruction(_instruction(sent.factors, compress=CompressConfig(down=codec)))
    back = decode_instruction(content).adapter
    numel = sum(f.a.numel() + f.b.numel() for f in sent.factors.values())
    assert _tensor_bytes(plain) == 4 * numel
    for m, f in sent.factors.items():
        for got, want in ((back[m].a, f.a), (back[m].b.T, f.b.T)):  # rows = rank components
            if codec == "fp16":
                assert torch.all((got - want).abs() <= want.abs() * 2**-11 + 2**-25)
            else:
                bound = want.abs().amax(dim=1, keepdim=True) / 254 + 1e-7
                assert torch.all((got - want).abs() <= bound)
                assert not torch.equal(got, want)  # it really was quantized
    if codec == "fp16":
        assert _tensor_bytes(content) == 2 * numel
    else:  # one int8 per value, one float32 scale per rank component of each factor
        assert _tensor_bytes(content) == numel + 4 * 4 * 2 * len(sent.factors)


def test_hetlora_client_half_refuses_bad_self_pruning_options_and_skips_when_off(tiny_handle):
    """The self-pruning values travel as the instruction's options; the client half checks
    them (gamma in (0, 1], lambda >= 0) and adds no term when lambda is 0 or g = r."""
    from fedpeft.algorithms.hetlora import tail_penalty, tail_report
    from fedpeft.config import TrainConfig
    from fedpeft.errors import ProtocolError
    from fedpeft.wire.messages import Header, LoraSpec, TrainInstruction

    spec = LoraSpec(4, 8.0, ("q_proj", "v_proj"))
    name = tiny_handle.ensure_adapter(spec)

    def ins(**options):
        return TrainInstruction(Header("r", 1, "fp", "h", 1, "0"), spec, TrainConfig(), {}, 0,
                                options=options)  # fmt: skip

    for bad in ({"reg_lambda": 1.0, "reg_gamma": 1.5}, {"reg_lambda": -1.0}):
        with pytest.raises(ProtocolError, match="reg_gamma must be in"):
            tail_penalty(tiny_handle, name, ins(**bad))
    assert tail_penalty(tiny_handle, name, ins()) is None  # lambda 0: HetLoRA without pruning
    assert tail_penalty(tiny_handle, name, ins(reg_lambda=1.0, reg_gamma=1.0)) is None  # g = r
    term = tail_penalty(tiny_handle, name, ins(reg_lambda=2.0, reg_gamma=0.5))  # g = 2
    want = sum(float(layer.lora_A[name].weight[2:].norm() + layer.lora_B[name].weight[:, 2:].norm())
               for _, layer in tiny_handle.lora_layers(name))  # fmt: skip
    assert term is not None and want > 0 and float(term()) == pytest.approx(2.0 * want)
    assert tail_report(tiny_handle, name, ins())() == {}
