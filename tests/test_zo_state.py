"""The coordinator's seed/scalar coefficients: versions, and what each client downloads."""

from __future__ import annotations

import numpy as np

from fedpeft.strategies.zo_state import Coefficients


def _delta(blocks: int, k: int, entries: dict[tuple[int, int], float]) -> np.ndarray:
    d = np.zeros((blocks, k))
    for (b, s), v in entries.items():
        d[b, s] = v
    return d


def test_commit_counts_entries_whose_float32_value_changed():
    c = Coefficients(2, 8)
    assert c.commit(_delta(2, 8, {(0, 1): 0.5, (1, 7): -2.0}), 1) == 2
    assert c.version == 1 and c.changed_at[0, 1] == 1 and c.changed_at[1, 7] == 1
    # 1e-12 does not change a float32 0.5: nothing a node holds changes, nothing to send
    assert c.commit(_delta(2, 8, {(0, 1): 1e-12}), 2) == 0
    assert c.changed_at[0, 1] == 1 and c.values[0, 1] == 0.5 + 1e-12
    assert c.commit(_delta(2, 8, {(0, 1): 0.25, (0, 2): 1.0}), 3) == 2
    assert c.published.dtype == np.float32 and c.published[0, 1] == 0.75


def test_sync_for_a_new_client_lists_every_nonzero_entry_as_triples():
    c = Coefficients(2, 8)
    c.commit(_delta(2, 8, {(0, 1): 0.5, (1, 7): -2.0}), 1)
    s = c.sync_for("new")
    assert (s.from_version, s.to_version, s.full, s.dense) == (0, 1, True, False)
    assert s.blocks.tolist() == [0, 1] and s.seeds.tolist() == [1, 7]
    assert s.values.tolist() == [0.5, -2.0] and s.seeds.dtype == np.uint16


def test_sync_for_a_confirmed_client_lists_only_later_changes():
    c = Coefficients(2, 8)
    c.commit(_delta(2, 8, {(0, 1): 0.5, (1, 7): -2.0}), 1)
    c.client_versions["a"] = 1
    c.commit(_delta(2, 8, {(1, 3): 4.0}), 2)
    s = c.sync_for("a")
    assert (s.from_version, s.to_version, s.full) == (1, 2, False)
    got = zip(s.blocks.tolist(), s.seeds.tolist(), s.values.tolist(), strict=True)
    assert list(got) == [(1, 3, 4.0)]
    forced = c.sync_for("a", full=True)  # a forced full sync lists every nonzero entry
    assert forced.full and forced.seeds.tolist() == [1, 3, 7]
    c.client_versions["b"] = 0  # confirmed version 0: every entry changed since
    assert c.sync_for("b").seeds.tolist() == [1, 3, 7] and not c.sync_for("b").full


def test_one_block_sends_no_block_indices_and_dense_wins_when_smaller():
    c = Coefficients(1, 4)
    c.commit(_delta(1, 4, {(0, 2): 1.5}), 1)
    s = c.sync_for("x")  # 1 entry: 2 + 4 bytes < 4 values * 4 bytes
    assert s.blocks.size == 0 and s.seeds.tolist() == [2] and not s.dense
    c.commit(_delta(1, 4, {(0, 0): 1.0, (0, 1): 1.0}), 2)
    s = c.sync_for("x")  # 3 entries * 6 bytes = 18 >= 16: the dense matrix is smaller
    assert s.dense and s.full and s.values.tolist() == [1.0, 1.0, 1.5, 0.0]
    big = Coefficients(1, 70_000)  # more than 65,536 seeds: uint32 indices
    big.commit(_delta(1, 70_000, {(0, 69_999): 1.0}), 1)
    assert big.sync_for("x").seeds.dtype == np.uint32


def test_state_round_trip_forgets_what_clients_hold():
    c = Coefficients(2, 8)
    c.commit(_delta(2, 8, {(0, 1): 0.5}), 3)
    c.client_versions["a"] = 3
    state = c.state_dict()
    assert set(state) == {"values", "changed_at", "version", "client_versions"}
    assert state["client_versions"] == {"a": 3}
    back = Coefficients(2, 8)
    back.load_state_dict(state)
    assert back.version == 3 and back.client_versions == {}
    assert back.values.dtype == np.float64 and back.changed_at.dtype == np.int64
    assert np.array_equal(back.values, c.values) and np.array_equal(back.changed_at, c.changed_at)
    assert back.sync_for("a").full  # the restored coordinator sends everyone a full sync
