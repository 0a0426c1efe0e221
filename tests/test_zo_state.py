"""The coordinator's seed/scalar coefficients: versions, and what each client downloads."""

from __future__ import annotations

import numpy as np

from fedpeft.algorithms.zo_state import Coefficients


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


def _listed(c: Coefficients, entries: int, blocks: int) -> None:
    c.commit(_delta(blocks, c.num_seeds, {(i % blocks, i // blocks): 1.0 for i in range(entries)}),
             1)  # fmt: skip


def test_triples_or_dense_at_the_exact_byte_boundary():
    """Bytes per listed entry: 2 (block, only with several blocks) + 2 (uint16 seed) + 4
    (value); dense costs 4 per coefficient; dense wins on a tie.
    One block, K = 12 (dense 48 B): 7 entries = 42 B as triples, 8 entries = 48 B -> dense.
    Two blocks, K = 5 (dense 40 B): 4 entries = 32 B as triples, 5 entries = 40 B -> dense."""
    for blocks, k, below in ((1, 12, 7), (2, 5, 4)):
        small, tie = Coefficients(blocks, k), Coefficients(blocks, k)
        _listed(small, below, blocks)
        _listed(tie, below + 1, blocks)
        s, t = small.sync_for("x"), tie.sync_for("x")
        per_entry = 8 if blocks > 1 else 6
        assert not s.dense and len(s.seeds) == below and s.nbytes == below * per_entry
        assert t.dense and t.nbytes == blocks * k * 4, (blocks, k)
    nine = Coefficients(2, 9)  # 2 blocks, K = 9 (72 B): 8 entries = 64 B -> still triples
    _listed(nine, 8, 2)
    assert not nine.sync_for("x").dense


def test_sync_fields_and_dtypes_for_triples_and_dense():
    c = Coefficients(2, 8)
    c.commit(_delta(2, 8, {(1, 2): 0.5}), 4)
    s = c.sync_for("new")
    assert s.blocks.dtype == np.uint16 and s.blocks.tolist() == [1]
    assert (s.from_version, s.to_version, s.full) == (0, 4, True)
    one = Coefficients(1, 8)
    one.commit(_delta(1, 8, {(0, 2): 0.5}), 4)
    assert one.sync_for("new").blocks.dtype == np.uint16
    dense = Coefficients(1, 2)
    dense.commit(_delta(1, 2, {(0, 0): 1.0, (0, 1): 2.0}), 3)
    d = dense.sync_for("new")
    assert d.dense and (d.from_version, d.to_version, d.full) == (0, 3, True)
    assert d.values.dtype == np.float32 and d.values.tolist() == [1.0, 2.0]
    dense.client_versions["held"] = 2
    h = dense.sync_for("held")  # a confirmed client's increment, sent dense because smaller
    assert h.dense and (h.from_version, h.to_version) == (2, 3)


def test_an_entry_that_changed_back_to_zero_is_listed_for_a_client_at_version_0():
    """The increment lists every entry changed since the client's version, whatever its value
    now: +1 at version 1 and -1 at version 2 leave 0, which the increment from 0 carries."""
    c = Coefficients(1, 16)
    c.client_versions["a"] = 0
    c.commit(_delta(1, 16, {(0, 3): 1.0}), 1)
    c.commit(_delta(1, 16, {(0, 3): -1.0, (0, 5): 2.0}), 2)
    s = c.sync_for("a")
    assert not s.full and s.seeds.tolist() == [3, 5] and s.values.tolist() == [0.0, 2.0]
