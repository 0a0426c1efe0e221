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
from fedpeft.server.validate import Limits, cap_weights, validate_update, validate_zo_update
from fedpeft.wire import Header, LoraFactors, LoraSpec, LoraUpdate, TrainInstruction
from fedpeft.wire_zo import ZoInstruction, ZoSpec, ZoSync, ZoUpdate

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
