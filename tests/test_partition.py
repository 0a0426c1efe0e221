"""Partitioner properties: every record assigned exactly once; skew follows alpha."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft.errors import DataError
from fedpeft.simulation.partition import label_skew, natural_partition, partition

KEYS = [f"k{i % 12}" for i in range(3000)] + [f"rare{i}" for i in range(20)]


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "natural"])
@pytest.mark.parametrize("clients", [1, 5, 10])
def test_every_record_assigned_exactly_once(kind, clients):
    parts = partition(kind, KEYS, clients, np.random.default_rng(0), alpha=0.3)
    assert len(parts) == clients
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(KEYS)))
    assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "natural"])
def test_same_seed_same_split_other_seed_other_split(kind):
    a = partition(kind, KEYS, 6, np.random.default_rng(1), alpha=0.5)
    b = partition(kind, KEYS, 6, np.random.default_rng(1), alpha=0.5)
    c = partition(kind, KEYS, 6, np.random.default_rng(2), alpha=0.5)
    assert a == b
    assert a != c


def test_dirichlet_skew_grows_as_alpha_shrinks():
    skews = []
    for alpha in (100.0, 1.0, 0.1):
        runs = [
            label_skew(partition("dirichlet", KEYS, 8, np.random.default_rng(s), alpha=alpha), KEYS)
            for s in range(5)
        ]
        skews.append(float(np.mean(runs)))
    print("mean TV distance to the global key mix for alpha 100 / 1 / 0.1:", skews)
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.5


def test_iid_is_balanced_and_unskewed():
    parts = partition("iid", KEYS, 7, np.random.default_rng(0))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert label_skew(parts, KEYS) < 0.1


def test_natural_gives_each_key_to_one_client_and_balances_sizes():
    parts = natural_partition(KEYS, 4, np.random.default_rng(0))
    owner = {}
    for c, p in enumerate(parts):
        for i in p:
            assert owner.setdefault(KEYS[i], c) == c
    sizes = [len(p) for p in parts]
    assert max(sizes) / min(sizes) < 1.5


def test_natural_needs_enough_keys():
    with pytest.raises(DataError, match="distinct key values"):
        natural_partition(["a", "b"], 3, np.random.default_rng(0))


def test_too_few_records_is_an_error():
    with pytest.raises(DataError):
        partition("iid", ["a"] * 3, 5, np.random.default_rng(0))
