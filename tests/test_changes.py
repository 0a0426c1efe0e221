"""Updates as flat vectors (what robust aggregation, DP, secure aggregation and attacks use)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.changes import (
    clients_behind,
    combined_update,
    direction_sums,
    flat_change,
    shared_sent,
    trained_mask,
    with_change,
    with_every_direction,
)
from fedpeft.errors import AggregationError
from fedpeft.wire.messages import Header, LoraFactors, LoraUpdate
from fedpeft.wire.zo import ZoUpdate

# two modules, listed out of order: the layout sorts them (m.k before m.v), A before B
SENT = {
    "m.v": LoraFactors(a=torch.zeros(1, 2), b=torch.zeros(2, 1), alpha=1.0),
    "m.k": LoraFactors(a=torch.ones(1, 1), b=torch.ones(1, 1), alpha=1.0),
}
GOT = {
    "m.v": LoraFactors(a=torch.tensor([[1.0, 2.0]]), b=torch.tensor([[3.0], [4.0]]), alpha=1.0),
    "m.k": LoraFactors(a=torch.tensor([[1.5]]), b=torch.tensor([[0.0]]), alpha=1.0),
}
UPDATE = LoraUpdate(Header("r", 1, "f", "h", 7, "c"), GOT)


def test_flat_change_layout_by_hand():
    d = flat_change(GOT, SENT)
    assert d.dtype == torch.float64
    assert d.tolist() == [0.5, -1.0, 1.0, 2.0, 3.0, 4.0]  # k.A, k.B, v.A (1x2), v.B (2x1)


def test_with_change_puts_a_vector_back_and_keeps_dtype_and_alpha():
    half = LoraFactors(a=torch.zeros(1, 2, dtype=torch.float16), b=torch.zeros(2, 1), alpha=3.0)
    up = LoraUpdate(Header("r", 1, "f", "h", 7, "c"), {**GOT, "m.v": half})
    back = with_change(up, SENT, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64))
    assert back.factors["m.k"].a.tolist() == [[2.0]] and back.factors["m.k"].b.tolist() == [[3.0]]
    assert back.factors["m.v"].a.tolist() == [[3.0, 4.0]] and back.factors["m.v"].a.dtype == (
        torch.float16)  # fmt: skip
    assert back.factors["m.v"].b.tolist() == [[5.0], [6.0]] and back.factors["m.v"].alpha == 3.0
    assert back.header == up.header
    again = flat_change(with_change(UPDATE, SENT, flat_change(GOT, SENT)).factors, SENT)
    assert torch.equal(again, flat_change(GOT, SENT))


@pytest.mark.parametrize(
    ("parts", "want"),
    [("AB", [1, 1, 1, 1, 1, 1]), ("A", [1, 0, 1, 1, 0, 0]), ("B", [0, 1, 0, 0, 1, 1])],
)
def test_trained_mask_marks_the_trained_factors(parts, want):
    assert trained_mask(SENT, parts).tolist() == [bool(x) for x in want]


def test_shared_sent_needs_the_very_same_factors_for_everyone():
    other = dict(SENT)
    assert shared_sent({"a": SENT, "b": SENT}, ["a", "b"], "no") is SENT
    with pytest.raises(AggregationError) as err:
        shared_sent({"a": SENT, "b": other}, ["a", "b"], "dp needs one")
    assert str(err.value) == "dp needs one (client b was sent other factors than a)"
    with pytest.raises(AggregationError, match="client z was sent"):
        shared_sent({"a": SENT}, ["a", "z"], "x")


def test_combined_update_carries_the_total_examples_and_clients():
    one = combined_update(UPDATE, SENT, torch.zeros(6, dtype=torch.float64), 99, 7)
    assert one.header.num_examples == 99 and one.header.client_id == "c"
    assert all(torch.equal(one.factors[m].a, SENT[m].a) for m in SENT)
    assert clients_behind([one, UPDATE]) == 8  # 7 behind the combined one, 1 behind a reply


def test_direction_sums_add_repeated_directions():
    seeds, blocks = np.array([2, 0, 2], np.uint16), np.array([1, 0, 1], np.uint16)
    scalars = np.array([1.0, 0.5, 2.0], np.float32)
    up = ZoUpdate(Header("r", 1, "f", "h", 1, "c"), seeds, scalars, blocks=blocks)
    assert direction_sums(up, 2, 3).tolist() == [0.5, 0.0, 0.0, 0.0, 0.0, 3.0]
    plain = ZoUpdate(Header("r", 1, "f", "h", 1, "c"), np.array([1, 1], np.uint16),
                     np.array([0.25, 0.5], np.float32))  # fmt: skip
    assert direction_sums(plain, 1, 3).tolist() == [0.0, 0.75, 0.0]


def test_with_every_direction_appends_one_pair_per_direction():
    plain = ZoUpdate(Header("r", 1, "f", "h", 1, "c"), np.array([1], np.uint16),
                     np.array([0.5], np.float32))  # fmt: skip
    out = with_every_direction(plain, np.array([7.0, 8.0, 9.0]), 1, 3)
    assert out.seeds.tolist() == [1, 0, 1, 2] and out.blocks.size == 0
    assert out.scalars.tolist() == [0.5, 7.0, 8.0, 9.0] and out.scalars.dtype == np.float32
    blocked = ZoUpdate(Header("r", 1, "f", "h", 1, "c"), np.array([1], np.uint16),
                       np.array([0.5], np.float32), blocks=np.array([1], np.uint16))  # fmt: skip
    out = with_every_direction(blocked, np.arange(4.0), 2, 2)
    assert out.blocks.tolist() == [1, 0, 0, 1, 1] and out.seeds.tolist() == [1, 0, 1, 0, 1]
    assert out.scalars.tolist() == [0.5, 0.0, 1.0, 2.0, 3.0]


def test_with_change_walks_three_modules_and_keeps_float32():
    sent = {m: LoraFactors(a=torch.zeros(1, 1), b=torch.zeros(1, 1), alpha=1.0) for m in "xyz"}
    up = LoraUpdate(Header("r", 1, "f", "h", 7, "c"), sent)
    back = with_change(up, sent, torch.arange(1.0, 7.0, dtype=torch.float64))
    assert [(f.a.item(), f.b.item()) for _, f in sorted(back.factors.items())] == [
        (1.0, 2.0), (3.0, 4.0), (5.0, 6.0)]  # fmt: skip
    assert {(f.a.dtype, f.b.dtype) for f in back.factors.values()} == {(torch.float32,) * 2}


def test_every_direction_pairs_carry_blocks_whenever_there_are_several():
    """Two blocks and an upload with no pairs yet (a Ferret client that sent nothing): the
    added pairs still carry their block index, in the pool's index dtype."""
    empty = ZoUpdate(Header("r", 1, "f", "h", 7, "c"), np.zeros(0, np.uint16),
                     np.zeros(0, np.float32), blocks=np.zeros(0, np.uint16))  # fmt: skip
    out = with_every_direction(empty, np.arange(6.0), 2, 3)
    assert out.blocks.tolist() == [0, 0, 0, 1, 1, 1] and out.blocks.dtype == np.uint16
    assert out.seeds.tolist() == [0, 1, 2, 0, 1, 2] and out.seeds.dtype == np.uint16
    assert out.scalars.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    one = with_every_direction(empty, np.arange(3.0), 1, 3)  # one block: no block indices
    assert one.blocks.size == 0 and one.seeds.tolist() == [0, 1, 2]
