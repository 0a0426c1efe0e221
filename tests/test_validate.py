"""Update validation, one check at a time, on hand-built instructions and updates.

Every case builds a valid update first and asserts it passes, then breaks exactly one thing,
so a test fails if a check is missing *or* if it fires on valid input.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedpeft.config import TrainConfig, ValidationConfig
from fedpeft.errors import ProtocolError
from fedpeft.families import reply_limit
from fedpeft.server.validate import (
    Limits,
    cap_weights,
    validate_secure_reply,
    validate_update,
    validate_zo_update,
)
from fedpeft.wire.messages import Header, LoraFactors, LoraSpec, LoraUpdate, TrainInstruction
from fedpeft.wire.zo import ZoInstruction, ZoSpec, ZoSync, ZoUpdate

SPEC = LoraSpec(rank=2, alpha=4.0, target_modules=("q_proj",))
SENT = {"m.q_proj": LoraFactors(a=torch.zeros(2, 3), b=torch.zeros(4, 2), alpha=4.0)}


def _header(adapter_hash: str, n: int = 5, client: str = "c1") -> Header:
    return Header("run", 3, "fp", adapter_hash, n, client)


def _instruction(parts: str = "AB") -> TrainInstruction:
    return TrainInstruction(
        header=_header("", 20),
        lora=SPEC,
        train=TrainConfig(),
        adapter=SENT,
        seed=0,
        parts=parts,
    )


def _update(a: torch.Tensor, b: torch.Tensor) -> LoraUpdate:
    return LoraUpdate(_header(SPEC.config_hash()), {"m.q_proj": LoraFactors(a, b, 4.0)})


def _ones() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((2, 3), 0.5), torch.full((4, 2), 0.25)


def _code(fn, *args) -> str:
    with pytest.raises(ProtocolError) as err:
        fn(*args)
    return err.value.code


@pytest.mark.parametrize("part", ["A", "B"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_values_are_rejected_in_either_factor(part, value):
    a, b = _ones()
    validate_update(_update(a, b), _instruction())  # valid as built
    (a if part == "A" else b)[1, 1] = value
    assert _code(validate_update, _update(a, b), _instruction()) == "nonfinite"


def test_update_norm_is_the_l2_distance_from_what_was_sent():
    a, b = _ones()  # sent zeros: ||change||^2 = 6 * 0.25 + 8 * 0.0625 = 2.0
    rules = ValidationConfig(max_update_norm=1.4143)  # sqrt(2) = 1.41421...
    validate_update(_update(a, b), _instruction(), Limits(rules))
    tight = Limits(ValidationConfig(max_update_norm=1.4141))
    assert _code(validate_update, _update(a, b), _instruction(), tight) == "norm"


@pytest.mark.parametrize(("parts", "moved"), [("B", "A"), ("A", "B")])
def test_a_frozen_factor_must_come_back_unchanged(parts, moved):
    a, b = torch.zeros(2, 3), torch.zeros(4, 2)
    (b if parts == "B" else a).fill_(0.1)  # the trained factor moved: fine
    validate_update(_update(a, b), _instruction(parts))
    (a if moved == "A" else b)[0, 0] = 1e-6
    assert _code(validate_update, _update(a, b), _instruction(parts)) == "frozen"


ZO_SPEC = ZoSpec(algorithm="fedkseed", target="full", num_seeds=8, pool_seed=1, local_steps=3)


def _zo_instruction(version: int) -> ZoInstruction:
    return ZoInstruction(
        header=_header("", 20),
        spec=ZO_SPEC,
        train=TrainConfig(),
        sync=ZoSync(from_version=version - 1, to_version=version),
        seed=0,
    )


def _zo_update(synced: int, scalars=(0.125, -0.25, 0.5)) -> ZoUpdate:
    return ZoUpdate(
        header=_header(ZO_SPEC.config_hash()),
        seeds=np.array([0, 7, 3], np.uint16),
        scalars=np.array(scalars, np.float32),
        synced_version=synced,
    )


@pytest.mark.parametrize("synced", [4, 6, 0])
def test_seed_scalar_update_synced_to_another_version_is_a_replay(synced):
    validate_zo_update(_zo_update(5), _zo_instruction(5))
    assert _code(validate_zo_update, _zo_update(synced), _zo_instruction(5)) == "replay"


def test_seed_scalar_bounds():
    ins = _zo_instruction(2)
    assert _code(validate_zo_update, _zo_update(2, (0.1, np.nan, 0.0)), ins) == "nonfinite"
    limits = Limits(ValidationConfig(max_scalar=0.5))
    validate_zo_update(_zo_update(2), ins, limits)  # |0.5| is allowed
    assert _code(validate_zo_update, _zo_update(2, (0.1, -0.51, 0)), ins, limits) == "norm"
    wide = dataclasses.replace(_zo_update(2), seeds=np.array([0, 8, 3], np.uint16))
    assert _code(validate_zo_update, wide, ins) == "seed_range"


def test_weights_are_capped_at_a_multiple_of_the_median():
    ups = [_update(*_ones()) for _ in range(4)]
    ups = [
        dataclasses.replace(u, header=dataclasses.replace(u.header, num_examples=n))
        for u, n in zip(ups, (10, 20, 30, 1000), strict=True)
    ]
    out, capped = cap_weights(ups, 2.0)  # median 25 -> cap 50
    assert [u.header.num_examples for u in out] == [10, 20, 30, 50] and capped == 1


def _with_header(update, **fields):
    return dataclasses.replace(update, header=dataclasses.replace(update.header, **fields))


LORA_HASH = SPEC.config_hash()
HEADER_CASES = [
    ({"run_id": "other"}, "replay", "update is for run 'other' round 3, this is run 'run' round 3"),
    ({"server_round": 2}, "replay", "update is for run 'run' round 2, this is run 'run' round 3"),
    ({"model_fingerprint": "zz"}, "header", "header model_fingerprint is 'zz', expected 'fp'"),
    ({"client_id": "c9"}, "header", "header client_id is 'c9', expected 'c1'"),
    (
        {"adapter_hash": "zz"},
        "header",
        f"header adapter_hash is 'zz', expected '{LORA_HASH}' (rank 2, alpha 4.0)",
    ),
    (
        {"num_examples": 0},
        "num_examples",
        "num_examples is 0, expected 1..20 (what the client reported at discovery)",
    ),  # fmt: skip
    ({"num_examples": 21}, "num_examples", "num_examples is 21, expected 1..20"),
]


@pytest.mark.parametrize(("fields", "code", "message"), HEADER_CASES)
def test_each_header_field_is_checked_with_its_code_and_message(fields, code, message):
    limits = Limits(max_examples=20)
    up = _update(*_ones())
    for n in (1, 20):  # the bounds themselves are allowed
        validate_update(_with_header(up, num_examples=n), _instruction(), limits)
    with pytest.raises(ProtocolError) as err:
        validate_update(_with_header(up, **fields), _instruction(), limits)
    assert err.value.code == code and str(err.value).startswith(message)


def test_num_examples_is_capped_at_a_billion_whatever_discovery_said():
    limits = Limits(max_examples=10**12)
    up = _update(*_ones())
    validate_update(_with_header(up, num_examples=10**9), _instruction(), limits)
    with pytest.raises(
        ProtocolError, match=r"num_examples is 1000000001, expected 1\.\.1000000000"
    ):
        validate_update(_with_header(up, num_examples=10**9 + 1), _instruction(), limits)


def _one(update, factors) -> LoraUpdate:
    return dataclasses.replace(update, factors=factors)


STRUCTURE_CASES = [
    (
        {"m.k_proj": LoraFactors(torch.zeros(2, 3), torch.zeros(4, 2), 4.0)},
        "adapter modules differ from the instruction: missing ['m.q_proj'], extra ['m.k_proj']",
    ),
    (
        {"m.q_proj": LoraFactors(torch.zeros(3, 3), torch.zeros(4, 3), 4.0)},
        "m.q_proj: got A(3, 3) B(4, 3), expected A(2, 3) B(4, 2) (rank 2)",
    ),
    (
        {"m.q_proj": LoraFactors(torch.zeros(2, 5), torch.zeros(4, 2), 4.0)},
        "m.q_proj: got A(2, 5) B(4, 2), expected A(2, 3) B(4, 2) (rank 2)",
    ),
    (
        {"m.q_proj": LoraFactors(torch.zeros(2, 3), torch.zeros(6, 2), 4.0)},
        "m.q_proj: got A(2, 3) B(6, 2), expected A(2, 3) B(4, 2) (rank 2)",
    ),
    (
        {"m.q_proj": LoraFactors(torch.zeros(2, 3), torch.zeros(4, 2), 2.0)},
        "m.q_proj: alpha 2.0, expected 4.0",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("factors", "message"), STRUCTURE_CASES)
def test_structure_is_checked_module_by_module(factors, message):
    with pytest.raises(ProtocolError) as err:
        validate_update(_one(_update(*_ones()), factors), _instruction())
    assert err.value.code == "structure" and str(err.value) == message


@pytest.mark.parametrize("part", ["A", "B"])
def test_integer_factors_are_a_dtype_error_naming_the_factor(part):
    a, b = _ones()
    if part == "A":
        a = a.to(torch.int32)
    else:
        b = b.to(torch.int32)
    with pytest.raises(ProtocolError) as err:
        validate_update(_update(a, b), _instruction())
    assert err.value.code == "dtype"
    assert str(err.value) == f"m.q_proj::{part} has dtype torch.int32, expected a floating dtype"


def test_messages_of_nonfinite_frozen_and_norm():
    a, b = _ones()
    b[0, 0] = float("nan")
    with pytest.raises(ProtocolError, match=r"^m\.q_proj::B contains NaN or infinite values$"):
        validate_update(_update(a, b), _instruction())
    a, b = _ones()
    with pytest.raises(ProtocolError, match=r"^m\.q_proj::A changed, but the instruction trains "
                                            r"only B$"):  # fmt: skip
        validate_update(_update(a, b), _instruction("B"))
    norm = (
        r"^update changes the factors by L2 norm 1\.414, above validation\.max_update_norm = 1\.4$"
    )
    with pytest.raises(ProtocolError, match=norm):
        validate_update(
            _update(a, b), _instruction(), Limits(ValidationConfig(max_update_norm=1.4))
        )
    validate_update(_update(a, b), _instruction(), Limits(ValidationConfig(max_update_norm=0)))


@pytest.mark.parametrize(("sent_rank", "want_norm"), [(3, 2.0**0.5), (1, 14.0**0.5)])
def test_the_norm_is_measured_against_the_sent_factors_at_the_update_rank(sent_rank, want_norm):
    """Sent factors of another rank are cut or zero-padded to the update's rank 2 first.

    Sent: A = 1 (rank x 3), B = 1 (4 x rank); update: A = 1.5, B = 1.25 (rank 2, all entries).
    Rank 3 sent -> compared with its first 2 components: 6 * 0.25 + 8 * 0.0625 = 2.
    Rank 1 sent -> component 2 compared with 0: 3 * 0.25 + 3 * 2.25 + 4 * 0.0625 + 4 * 1.5625
    = 14.
    """
    sent = {"m.q_proj": LoraFactors(torch.ones(sent_rank, 3), torch.ones(4, sent_rank), 4.0)}
    ins = dataclasses.replace(_instruction(), adapter=sent)
    up = _update(torch.full((2, 3), 1.5), torch.full((4, 2), 1.25))
    above = Limits(ValidationConfig(max_update_norm=want_norm * 1.0001))
    below = Limits(ValidationConfig(max_update_norm=want_norm * 0.9999))
    validate_update(up, ins, above)
    with pytest.raises(ProtocolError, match="L2 norm"):
        validate_update(up, ins, below)


ZO_CASES = [
    (lambda u: _with_header(u, run_id="old"), "replay", "update is for run 'old'"),
    (lambda u: _with_header(u, model_fingerprint="x"), "header", "header model_fingerprint"),
    (lambda u: _with_header(u, adapter_hash="x"), "header", "(fedkseed zo spec)"),
    (
        lambda u: dataclasses.replace(u, seeds=np.array([0, 8, 3], np.uint16)),
        "seed_range",
        "seed index 8 is outside the pool 0..7",
    ),  # fmt: skip
    (
        lambda u: dataclasses.replace(u, seeds=u.seeds[:2], scalars=u.scalars[:2]),
        "structure",
        "fedkseed upload has 2 pairs and 0 block indices, expected 3 pairs and none",
    ),  # fmt: skip
    (
        lambda u: dataclasses.replace(u, blocks=np.zeros(3, np.uint16)),
        "structure",
        "fedkseed upload has 3 pairs and 3 block indices, expected 3 pairs and none",
    ),  # fmt: skip
    (
        lambda u: dataclasses.replace(u, synced_version=4),
        "replay",
        "client synced to version 4, expected 5",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("change", "code", "message"), ZO_CASES)
def test_seed_scalar_checks_with_their_codes_and_messages(change, code, message):
    validate_zo_update(_zo_update(5), _zo_instruction(5))
    with pytest.raises(ProtocolError) as err:
        validate_zo_update(change(_zo_update(5)), _zo_instruction(5))
    assert err.value.code == code and message in str(err.value)


def _ferret(blocks, seeds) -> tuple[ZoUpdate, ZoInstruction]:
    spec = dataclasses.replace(ZO_SPEC, algorithm="ferret")
    ins = dataclasses.replace(_zo_instruction(1), spec=spec)
    up = ZoUpdate(
        header=_header(spec.config_hash()),
        seeds=np.array(seeds, np.uint16),
        scalars=np.ones(len(seeds), np.float32),
        blocks=np.array(blocks, np.uint16),
        synced_version=1,
    )
    return up, ins


def test_ferret_upload_checks():
    limits = Limits(zo_blocks=3)
    validate_zo_update(*_ferret([0, 2, 2], [7, 0, 1]), limits)
    cases = [
        (([0, 3], [1, 1]), "seed_range", "block index 3 outside 0..2"),
        (([0, 1], [1]), "structure", "ferret upload has 2 blocks for 1 seeds"),
        (([1, 2, 1], [5, 5, 5]), "seed_range", "ferret upload repeats a (block, seed) pair"),
    ]
    for (blocks, seeds), code, message in cases:
        up, ins = _ferret(blocks, seeds)
        if len(blocks) != len(seeds):
            up = dataclasses.replace(up, scalars=np.ones(len(seeds), np.float32))
        with pytest.raises(ProtocolError) as err:
            validate_zo_update(up, ins, limits)
        assert err.value.code == code and str(err.value) == message


def test_secure_replies_carry_a_header_only():
    ins, lora_ins = _zo_instruction(2), _instruction()
    empty_zo = dataclasses.replace(_zo_update(2), seeds=np.zeros(0, np.uint16),
                                   scalars=np.zeros(0, np.float32))  # fmt: skip
    validate_secure_reply(empty_zo, ins)
    with pytest.raises(ProtocolError, match="must carry no pairs") as err:
        validate_secure_reply(_zo_update(2), ins)
    assert err.value.code == "structure"
    with pytest.raises(ProtocolError, match="client synced to version 1"):
        validate_secure_reply(dataclasses.replace(empty_zo, synced_version=1), ins)
    empty_lora = dataclasses.replace(_update(*_ones()), factors={})
    validate_secure_reply(empty_lora, lora_ins)
    with pytest.raises(ProtocolError, match="must carry no tensors") as err:
        validate_secure_reply(_update(*_ones()), lora_ins)
    assert err.value.code == "structure"
    with pytest.raises(ProtocolError, match="adapter_hash"):
        validate_secure_reply(_with_header(empty_lora, adapter_hash="x"), lora_ins)
    with pytest.raises(ProtocolError, match="reply kind does not match") as err:
        validate_secure_reply(empty_zo, lora_ins)
    assert err.value.code == "decode"


def test_reply_limits_by_hand():
    # LoRA: 1 MB + 8 bytes per sent value (6 + 8 values)
    assert reply_limit(_instruction(), Limits()) == 1_000_000 + 8 * 14
    # seed/scalar: 1 MB + 16 bytes per possible pair (K * blocks + local_steps)
    assert reply_limit(_zo_instruction(1), Limits(zo_blocks=4)) == 1_000_000 + 16 * (8 * 4 + 3)
    assert reply_limit(_zo_instruction(1), Limits(zo_blocks=0)) == 1_000_000 + 16 * (8 + 3)
    fixed = Limits(ValidationConfig(max_reply_mb=2.5))
    assert reply_limit(_instruction(), fixed) == reply_limit(_zo_instruction(1), fixed) == 2_500_000


def test_weight_cap_edges():
    ups = [_with_header(_update(*_ones()), num_examples=n) for n in (3, 5, 7)]
    same, capped = cap_weights(ups, 0.0)  # ratio 0: off
    assert [u.header.num_examples for u in same] == [3, 5, 7] and capped == 0
    assert cap_weights([], 2.0) == ([], 0)
    tiny, capped = cap_weights(ups, 0.1)  # floor(0.5) = 0 -> the cap is at least 1
    assert [u.header.num_examples for u in tiny] == [1, 1, 1] and capped == 3
    exact, capped = cap_weights(ups, 1.4)  # cap floor(7.0) = 7: nobody above it
    assert [u.header.num_examples for u in exact] == [3, 5, 7] and capped == 0


def test_bounds_below_one_count_and_equal_values_pass():
    """A norm bound of 0.5 is a bound; a change of norm exactly 5 passes a bound of 5; a
    max_scalar of 0 means no bound; a reply limit of 0.5 MB is half a megabyte."""
    a, b = torch.zeros(2, 3), torch.zeros(4, 2)
    a[0, 0], a[0, 1] = 3.0, 4.0  # the change from SENT (zeros) has norm exactly 5
    small = _update(a * 0.125, b)  # norm 0.625
    assert _code(validate_update, small, _instruction(),
                 Limits(ValidationConfig(max_update_norm=0.5))) == "norm"  # fmt: skip
    exact = _update(a, b)
    validate_update(exact, _instruction(), Limits(ValidationConfig(max_update_norm=5.0)))
    validate_zo_update(_zo_update(2, (0.1, -500.0, 0)), _zo_instruction(2),
                       Limits(ValidationConfig(max_scalar=0.0)))  # fmt: skip
    half = Limits(ValidationConfig(max_reply_mb=0.5))
    assert reply_limit(_instruction(), half) == reply_limit(_zo_instruction(1), half) == 500_000


def test_module_mismatch_lists_at_most_three_of_each():
    factors = {f"m.x{i}": LoraFactors(torch.zeros(2, 3), torch.zeros(4, 2), 4.0) for i in range(4)}
    spec = LoraSpec(rank=2, alpha=4.0, target_modules=tuple(f"y{i}" for i in range(4)))
    sent = {f"m.y{i}": LoraFactors(torch.zeros(2, 3), torch.zeros(4, 2), 4.0) for i in range(4)}
    ins = dataclasses.replace(_instruction(), lora=spec, adapter=sent)
    up = LoraUpdate(_header(spec.config_hash()), factors)
    with pytest.raises(ProtocolError) as err:
        validate_update(up, ins)
    assert str(err.value) == (
        "adapter modules differ from the instruction: missing ['m.y0', 'm.y1', 'm.y2'], "
        "extra ['m.x0', 'm.x1', 'm.x2']"
    )


def test_seed_scalar_messages_and_ferret_pairs_beyond_the_pool_size():
    with pytest.raises(ProtocolError, match=r"^scalars contain NaN or infinite values$"):
        validate_zo_update(_zo_update(2, (0.1, np.inf, 0.0)), _zo_instruction(2))
    # K = 8, 10 blocks: (block 8, seed 0) and (block 0, seed 1) are different directions
    up, ins = _ferret([8, 0], [0, 1])
    validate_zo_update(up, ins, Limits(zo_blocks=10))


def test_secure_reply_refusals_by_kind_and_message():
    ins, lora_ins = _zo_instruction(2), _instruction()
    seeds_only = dataclasses.replace(_zo_update(2), scalars=np.zeros(0, np.float32))
    with pytest.raises(ProtocolError, match=r"^a secure-aggregation reply must carry no pairs$"):
        validate_secure_reply(seeds_only, ins)
    with pytest.raises(ProtocolError, match=r"^a secure-aggregation reply must carry no tensors$"):
        validate_secure_reply(_update(*_ones()), lora_ins)
    with pytest.raises(ProtocolError, match=r"^reply kind does not match the instruction$") as err:
        validate_secure_reply(_update(*_ones()), ins)
    assert err.value.code == "decode"


def test_the_round_row_reports_ranks_when_they_differ_and_nothing_for_seed_scalar():
    from fedpeft.server.rows import client_choices

    rank4 = LoraSpec(rank=4, alpha=4.0, target_modules=("q_proj",))
    wide = {"m.q_proj": LoraFactors(a=torch.zeros(4, 3), b=torch.zeros(4, 4), alpha=4.0)}
    mixed = {
        "a": _instruction(),
        "b": dataclasses.replace(_instruction(), lora=rank4, adapter=wide),
    }
    assert client_choices(mixed) == {"client_ranks": {"a": 2, "b": 4}}
    assert client_choices({"a": _instruction(), "b": _instruction()}) == {}
    assert client_choices({"z": _zo_instruction(2), **mixed}) == {"client_ranks": {"a": 2, "b": 4}}
