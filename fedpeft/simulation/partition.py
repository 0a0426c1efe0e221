"""Split a task's training records among simulated clients.

Every partitioner returns one list of record indices per client; together they assign every
index exactly once. All randomness comes from the generator passed in.

- ``iid``: a random permutation cut into near-equal parts.
- ``dirichlet``: per value of a key (a label or domain), client shares drawn from
  Dirichlet(alpha); small alpha gives each client few dominant values (Hsu et al. 2019,
  "Measuring the Effects of Non-Identical Data Distribution").
- ``natural``: each client gets whole key values (e.g. WordNet lexicographer domains), assigned
  largest-first to the client with the fewest records, so sizes stay balanced.

A population larger than the records (``federation.records_per_client``) is not split but
drawn: :func:`key_mix` and :func:`draw_records` give one client its records on demand from a
generator seeded by its id, so nothing is computed for clients that are never sampled.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np

from fedpeft.errors import DataError

__all__ = [
    "dirichlet_partition",
    "draw_records",
    "iid_partition",
    "key_groups",
    "key_mix",
    "label_skew",
    "natural_partition",
    "partition",
]


def iid_partition(n: int, num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffle ``range(n)`` and cut it into ``num_clients`` near-equal parts."""
    if n < num_clients:
        raise DataError(
            f"{n} records cannot be split among {num_clients} clients: lower "
            "federation.num_clients or let each client draw its records "
            "(federation.records_per_client)"
        )
    order = rng.permutation(n)
    return [sorted(int(i) for i in part) for part in np.array_split(order, num_clients)]


def key_groups(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """The indices of each key value, the values ordered by their text."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    return dict(sorted(groups.items(), key=lambda kv: str(kv[0])))


def dirichlet_partition(
    keys: Sequence[Hashable],
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[list[int]]:
    """Label-skewed split: each key value's records divided by Dirichlet(alpha) shares.

    Redraws (up to ``max_tries`` times) until every client has ``min_size`` records.

    Raises
    ------
    DataError
        If no draw gives every client ``min_size`` records.
    """
    if len(keys) < num_clients * min_size:
        raise DataError(
            f"{len(keys)} records cannot give {num_clients} clients {min_size} each: lower "
            "federation.num_clients or let each client draw its records "
            "(federation.records_per_client)"
        )
    groups = key_groups(keys)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for idx in groups.values():
            shuffled = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(shuffled)).astype(int)
            for c, piece in enumerate(np.split(shuffled, cuts)):
                parts[c].extend(int(i) for i in piece)
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise DataError(
        f"Dirichlet(alpha={alpha}) left a client with < {min_size} records in {max_tries} draws; "
        "raise federation.dirichlet_alpha or lower federation.num_clients"
    )


def natural_partition(
    keys: Sequence[Hashable], num_clients: int, rng: np.random.Generator
) -> list[list[int]]:
    """Whole key values per client, largest value first to the currently smallest client.

    Raises
    ------
    DataError
        If there are fewer distinct key values than clients.
    """
    groups = key_groups(keys)
    if len(groups) < num_clients:
        raise DataError(
            f"natural partition needs >= {num_clients} distinct key values, found {len(groups)}; "
            "use federation.partition='dirichlet' or 'iid'"
        )
    # Ties in size are broken by a seeded shuffle so the seed changes the assignment.
    names = list(groups)
    order = sorted(rng.permutation(len(names)), key=lambda j: -len(groups[names[j]]))
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for j in order:
        smallest = min(range(num_clients), key=lambda c: (len(parts[c]), c))
        parts[smallest].extend(groups[names[j]])
    return [sorted(p) for p in parts]


def partition(
    kind: str,
    keys: Sequence[Hashable],
    num_clients: int,
    rng: np.random.Generator,
    alpha: float = 0.5,
) -> list[list[int]]:
    """Dispatch to the partitioner named ``kind`` (iid, dirichlet, natural)."""
    if kind == "iid":
        return iid_partition(len(keys), num_clients, rng)
    if kind == "dirichlet":
        return dirichlet_partition(keys, num_clients, alpha, rng)
    if kind == "natural":
        return natural_partition(keys, num_clients, rng)
    raise DataError(f"unknown partition {kind!r}; use iid, dirichlet or natural")


def key_mix(prior: np.ndarray, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """One client's share of each key value: Dirichlet(alpha * K * prior) over the K values.

    ``prior``: the values' global frequencies (summing to 1). This is Hsu et al.'s (2019)
    per-client draw ``q ~ Dir(a p)`` with ``a = alpha * K``, so that with equal frequencies each
    value's concentration is ``alpha``, as in :func:`dirichlet_partition`: smaller alpha,
    fewer dominant values per client.
    """
    if len(prior) == 1:
        return np.ones(1)
    return rng.dirichlet(np.maximum(alpha * len(prior) * prior, 1e-12))


def draw_records(
    groups: Sequence[np.ndarray], mix: np.ndarray, size: int, rng: np.random.Generator
) -> list[int]:
    """At most ``size`` distinct record indices: how many of each group from
    Multinomial(size, mix), then that many (at most the group's size) without replacement."""
    counts = rng.multinomial(size, mix)
    out: list[int] = []
    for group, count in zip(groups, counts, strict=True):
        if count:
            out += rng.choice(group, min(int(count), len(group)), replace=False).tolist()
    return sorted(out)


def label_skew(parts: Sequence[Sequence[int]], keys: Sequence[Hashable]) -> float:
    """Mean total-variation distance between each client's key distribution and the global one.

    0 means every client looks like the whole; values near 1 mean disjoint key sets.
    """
    values = sorted({str(k) for k in keys})
    col = {v: i for i, v in enumerate(values)}
    glob = np.zeros(len(values))
    for k in keys:
        glob[col[str(k)]] += 1
    glob /= glob.sum()
    dists = []
    for part in parts:
        h = np.zeros(len(values))
        for i in part:
            h[col[str(keys[i])]] += 1
        if h.sum() > 0:
            dists.append(0.5 * np.abs(h / h.sum() - glob).sum())
    return float(np.mean(dists))
