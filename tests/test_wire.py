"""Wire types: encode to Flower records and back, bit-exact, with typed errors."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Message, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft._flwr import message_nbytes, roundtrip, set_task_identity
from fedpeft.config import TrainConfig
from fedpeft.errors import ProtocolError
from fedpeft.wire.messages import (
    HEADER,
    META,
    PROTOCOL_VERSION,
    TENSORS,
    EvalReport,
    Header,
    LoraFactors,
    LoraSpec,
    LoraUpdate,
    TrainInstruction,
    adapter_nbytes,
    decode_eval_report,
    decode_instruction,
    decode_update,
    encode_eval_report,
    encode_instruction,
    encode_update,
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _through_flower(content: RecordDict) -> RecordDict:
    """Serialize a message to Flower's wire objects and back, as a network would."""
    set_task_identity(run_id=7, node_id=1)
    return roundtrip(Message(content, 2, "train.lora")).content


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_update_round_trip_is_bit_exact(make_update, dtype):
    update = make_update(dtype=dtype, rank=3)
    back = decode_update(_through_flower(encode_update(update)))
    assert back.header == update.header
    assert back.metrics == update.metrics
    assert set(back.factors) == set(update.factors)
    for m, f in update.factors.items():
        g = back.factors[m]
        assert g.a.dtype == dtype and g.b.dtype == dtype
        assert g.alpha == f.alpha
        # compare bit patterns, so a -0.0 or a changed NaN payload would fail too
        assert torch.equal(_bits(g.a), _bits(f.a))
        assert torch.equal(_bits(g.b), _bits(f.b))


def test_instruction_round_trip(make_update):
    adapter = make_update(rank=2).factors
    ins = TrainInstruction(
        header=Header("run", 3, "fp", "hash", 120, "5"),
        lora=LoraSpec(rank=2, alpha=8.0, target_modules=("q_proj", "v_proj"), dropout=0.1),
        train=TrainConfig(lr=1e-3, local_steps=7, batch_size=4),
        adapter=adapter,
        seed=2**62 + 11,
        with_metric=True,
        options={"mu": 0.5},
        strategy="strategies/fedprox.py:FedProx",
    )
    back = decode_instruction(_through_flower(encode_instruction(ins)))
    assert back.strategy == ins.strategy and back.options == {"mu": 0.5}
    assert back.header == ins.header
    assert back.lora == ins.lora
    assert back.train == ins.train
    assert back.seed == ins.seed
    assert back.with_metric is True
    assert back.message_type == "train.lora"
    for m in adapter:
        assert torch.equal(back.adapter[m].a, adapter[m].a)


def test_bf16_survives_flower_which_rejects_it_natively():
    t = torch.randn(4, 5).to(torch.bfloat16)
    with pytest.raises(TypeError):
        Array(t)  # Flower cannot hold bf16: that is why the wire carries the bit pattern
    f = LoraFactors(a=t, b=torch.randn(6, 4).to(torch.bfloat16), alpha=4.0)
    up = LoraUpdate(header=Header("r", 1, "fp", "h", 1, "0"), factors={"x": f})
    back = decode_update(_through_flower(encode_update(up)))
    assert torch.equal(back.factors["x"].a.view(torch.int16), t.view(torch.int16))


def test_protocol_version_skew_is_a_typed_error(make_update):
    content = encode_update(make_update())
    content[HEADER]["protocol"] = PROTOCOL_VERSION + 1
    with pytest.raises(ProtocolError, match="upgrade fedpeft on this node"):
        decode_update(content)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda c: c.pop(HEADER), "no 'fedpeft.header' record"),
        (lambda c: c.pop(TENSORS), "no 'fedpeft.tensors' record"),
        (lambda c: c[HEADER].__setitem__("kind", "train_instruction"), "expected a 'lora_update'"),
        (lambda c: c[HEADER].__setitem__("server_round", "one"), "server_round must be int"),
        (lambda c: c[HEADER].__setitem__("num_examples", -5), "must be >= 0"),
        (lambda c: c[TENSORS].pop("m.q_proj::B"), "missing its LoRA factor"),
        (lambda c: c[META].__setitem__("dtype:m.q_proj::A", "int4"), "unknown dtype"),
        (lambda c: c[META].__setitem__("dtype:m.q_proj::A", "float16"), "expected float16"),
        (lambda c: c[META].__setitem__("alpha:m.q_proj", -1.0), "alpha must be finite and > 0"),
        (
            lambda c: c[TENSORS].__setitem__("badkey", c[TENSORS]["m.q_proj::A"]),
            "is not '<module>::A'",
        ),
    ],
)
def test_malformed_updates_raise_protocol_error(make_update, mutate, match):
    content = encode_update(make_update())
    mutate(content)
    with pytest.raises(ProtocolError, match=match):
        decode_update(content)


def test_rank_mismatch_between_factors_is_rejected(make_update):
    content = encode_update(make_update(rank=4))
    other = encode_update(make_update(rank=3))
    content[TENSORS]["m.q_proj::B"] = other[TENSORS]["m.q_proj::B"]
    with pytest.raises(ProtocolError, match="rank mismatch"):
        decode_update(content)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=300), cut=st.integers(min_value=0, max_value=400))
def test_corrupted_tensor_bytes_never_crash_the_decoder(make_update, data, cut):
    content = encode_update(make_update(rank=1, shape=(3, 2)))
    arr = content[TENSORS]["m.q_proj::A"]
    raw = arr.data[:cut] + data if cut % 2 else data
    content[TENSORS]["m.q_proj::A"] = Array(
        dtype=arr.dtype, shape=arr.shape, stype=arr.stype, data=raw
    )
    with contextlib.suppress(ProtocolError):  # a typed error is the only acceptable failure
        decode_update(content)


def test_byte_count_covers_payload_and_grows_with_it(make_update):
    set_task_identity(run_id=7, node_id=1)
    small, big = make_update(rank=2), make_update(rank=16)
    n_small = message_nbytes(Message(encode_update(small), 2, "train.lora"))
    n_big = message_nbytes(Message(encode_update(big), 2, "train.lora"))
    assert n_small > adapter_nbytes(small.factors)
    assert n_big - n_small >= adapter_nbytes(big.factors) - adapter_nbytes(small.factors)


def test_adapter_hash_ignores_dropout_but_not_rank():
    a = LoraSpec(rank=4, alpha=8.0, target_modules=("q", "v"), dropout=0.0)
    assert a.config_hash() == dataclasses.replace(a, dropout=0.3).config_hash()
    assert a.config_hash() == dataclasses.replace(a, target_modules=("v", "q")).config_hash()
    assert a.config_hash() != dataclasses.replace(a, rank=8).config_hash()


def test_unknown_train_field_asks_for_upgrade(make_update):
    ins = TrainInstruction(
        header=Header("run", 1, "fp", "h", 0, "0"),
        lora=LoraSpec(rank=4, alpha=8.0, target_modules=("q",)),
        train=TrainConfig(),
        adapter=make_update().factors,
        seed=1,
    )
    content = encode_instruction(ins)
    content["fedpeft.train"] = ConfigRecord({**dict(content["fedpeft.train"]), "future_knob": 1})
    with pytest.raises(ProtocolError, match="future_knob"):
        decode_instruction(content)


def test_eval_report_round_trip_and_non_finite_rejected():
    report = EvalReport(
        header=Header("r", 2, "fp", "h", 12, "3"), metrics={"eval_loss": 2.5, "eval_tokens": 90.0}
    )
    back = decode_eval_report(_through_flower(encode_eval_report(report)))
    assert back == report
    bad = encode_eval_report(EvalReport(header=report.header, metrics={"eval_loss": float("nan")}))
    with pytest.raises(ProtocolError, match="finite"):
        decode_eval_report(bad)


def _wire_bytes(make_update, zo: bool) -> bytes:
    from fedpeft._flwr import records_to_bytes
    from fedpeft.wire.zo import ZoUpdate, encode_zo_update

    if zo:
        u = ZoUpdate(
            Header("r", 1, "f", "h", 5, "0"),
            np.arange(6, dtype=np.uint16),
            np.linspace(-1, 1, 6).astype(np.float32),
        )
        return records_to_bytes(encode_zo_update(u))
    return records_to_bytes(encode_update(make_update(rank=1, shape=(3, 2))))


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    zo=st.booleans(),
    cut=st.integers(min_value=0, max_value=2000),
    flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4),
    noise=st.binary(max_size=200),
    mode=st.sampled_from(["truncate", "flip", "random", "append"]),
)
def test_random_and_truncated_message_bytes_give_a_typed_error_never_a_crash(
    make_update, monkeypatch, zo, cut, flips, noise, mode
):
    """Whole messages as they arrive off the network: parse, then decode; nothing unpickled."""
    import pickle

    from fedpeft._flwr import records_from_bytes
    from fedpeft.wire.zo import decode_zo_update

    def no_pickle(*args, **kwargs):
        raise AssertionError("network input must never be unpickled")

    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    good = _wire_bytes(make_update, zo)
    if mode == "truncate":
        data = good[: cut % (len(good) + 1)]
    elif mode == "flip":
        buf = bytearray(good)
        for pos, val in flips:
            buf[pos % len(buf)] = val
        data = bytes(buf)
    elif mode == "append":
        data = good + noise
    else:
        data = noise
    with contextlib.suppress(ProtocolError):  # the only acceptable failure, at either step
        (decode_zo_update if zo else decode_update)(records_from_bytes(data))
