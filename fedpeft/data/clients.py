"""Which records each simulated client holds, computed identically in every process.

The partition depends only on the data file, ``[federation]`` and the run seed, so the
coordinator, in-process clients and Ray workers all derive the same split without sending it.
In centralized mode the single client holds the union of what the federated clients would
hold (each client's cap included), which makes it the reference line for the same data.

With ``federation.records_per_client = N`` the records are not split but drawn: a client's
key mix and its at most N records (and its share of the held-out split, in the same mix) come
from generators seeded by the run seed and its id, computed when it is first asked, so a
population of millions costs nothing until its clients are sampled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedpeft.cache import PROCESS_CACHE, ProcessCache
from fedpeft.config import DataConfig, FederationConfig, RunConfig
from fedpeft.data.tasks import Task, load_task, template_fields
from fedpeft.errors import DataError
from fedpeft.seeding import np_rng
from fedpeft.simulation.attacks import attackers, flip_labels
from fedpeft.simulation.partition import draw_records, key_groups, key_mix, partition

__all__ = [
    "client_eval_records",
    "client_records",
    "drawn_indices",
    "eval_assignment",
    "get_task",
    "partition_indices",
    "partitions",
    "task_key",
]


def task_key(data: DataConfig, seed: int) -> str:
    """The cache key of the task for a data config and run seed."""
    return "task:" + json.dumps(asdict(data), sort_keys=True) + f":{seed}"


def get_task(data: DataConfig, seed: int, cache: ProcessCache = PROCESS_CACHE) -> Task:
    """The task for a data config, read once per process."""
    return cache.get(task_key(data, seed), lambda: load_task(data, seed))


def _train_keys(task: Task, fed: FederationConfig, data: DataConfig) -> list[Any]:
    """Each training record's partition key (all ``0`` for iid)."""
    if fed.partition == "iid":
        return [0] * len(task.train)
    if fed.partition_key not in task.train[0]:
        raise DataError(
            f"federation.partition_key {fed.partition_key!r} is not a field of {data.path!r}; "
            f"fields: {task.fields}"
        )
    return [r[fed.partition_key] for r in task.train]


def partition_indices(task: Task, fed: FederationConfig, data: DataConfig) -> list[list[int]]:
    """Training-record indices of each of the ``fed.num_clients`` federated clients."""
    rng = np_rng(fed.seed, "partition")
    keys = _train_keys(task, fed, data)
    parts = partition(fed.partition, keys, fed.num_clients, rng, fed.dirichlet_alpha)
    return [_capped(p, data.max_examples_per_client, fed.seed, c) for c, p in enumerate(parts)]


def _capped(indices: list[int], cap: int, seed: int, client: int) -> list[int]:
    """At most ``cap`` of ``indices`` (0: all), a seeded random subset per client, sorted."""
    if not cap or len(indices) <= cap:
        return indices
    return sorted(int(i) for i in np_rng(seed, "cap", client).permutation(indices)[:cap])


@dataclass(frozen=True)
class _Pools:
    """The key values' global frequencies and each value's training and held-out records."""

    prior: np.ndarray
    train: list[np.ndarray]
    eval: list[np.ndarray]


def _pools(cfg: RunConfig, task: Task, cache: ProcessCache) -> _Pools:
    fed = cfg.federation

    def build() -> _Pools:
        train = key_groups([str(k) for k in _train_keys(task, fed, cfg.data)])
        col = {v: i for i, v in enumerate(train)}
        held: list[list[int]] = [[] for _ in train]
        for j, r in enumerate(task.eval):
            c = col.get(str(r.get(fed.partition_key)) if fed.partition != "iid" else "0")
            if c is not None:
                held[c].append(j)
        prior = np.array([len(t) for t in train.values()], dtype=np.float64) / len(task.train)
        pools = [np.array(t) for t in train.values()]
        return _Pools(prior, pools, [np.array(h, int) for h in held])

    key = "pools:" + json.dumps([asdict(cfg.data), fed.partition, fed.partition_key])
    return cache.get(key + f":{fed.seed}", build)


def drawn_indices(
    cfg: RunConfig, task: Task, client: int, held_out: bool, cache: ProcessCache = PROCESS_CACHE
) -> list[int]:
    """Client ``client``'s drawn record indices (``federation.records_per_client``): its
    training records, or (``held_out``) its share of the held-out split in the same key mix,
    in proportion to the split's size."""
    fed, pools = cfg.federation, _pools(cfg, task, cache)
    mix = key_mix(pools.prior, fed.dirichlet_alpha, np_rng(fed.seed, "draw-mix", client))
    if not held_out:
        rng = np_rng(fed.seed, "draw-train", client)
        return draw_records(pools.train, mix, fed.records_per_client, rng)
    size = max(1, round(fed.records_per_client * len(task.eval) / len(task.train)))
    present = np.array([len(h) > 0 for h in pools.eval])
    if not present.any():
        return []
    mix = mix * present
    mix = mix / mix.sum() if mix.sum() > 0 else present / present.sum()
    return draw_records(pools.eval, mix, size, np_rng(fed.seed, "draw-eval", client))


def partitions(cfg: RunConfig, cache: ProcessCache) -> tuple[Task, list[list[int]], str]:
    """The task, every client's training indices (built once per process) and their cache key."""
    task = get_task(cfg.data, cfg.federation.seed, cache)
    key = "partition:" + json.dumps([asdict(cfg.data), asdict(cfg.federation)], sort_keys=True)
    return task, cache.get(key, lambda: partition_indices(task, cfg.federation, cfg.data)), key


def client_records(
    cfg: RunConfig, partition_id: int, cache: ProcessCache = PROCESS_CACHE, own: bool = False
) -> list[dict[str, Any]]:
    """The training records of client ``partition_id`` (all clients' union if centralized).

    ``own``: the data file is this client's own (a deployed node's ``data-path``): all of its
    training records, capped at ``data.max_examples_per_client`` as a partition is.
    """
    if own:
        records = get_task(cfg.data, cfg.federation.seed, cache).train
        keep = _capped(
            list(range(len(records))),
            cfg.data.max_examples_per_client,
            cfg.federation.seed,
            partition_id,
        )
        return [records[i] for i in keep]
    fed = cfg.federation
    if fed.records_per_client and not fed.centralized:
        _check_client(partition_id, fed.num_clients)
        task = get_task(cfg.data, fed.seed, cache)
        drawn = drawn_indices(cfg, task, partition_id, held_out=False, cache=cache)
        mine = _capped(drawn, cfg.data.max_examples_per_client, fed.seed, partition_id)
    else:
        task, parts, _ = partitions(cfg, cache)
        if fed.centralized:
            if partition_id != 0:
                raise DataError(
                    f"centralized mode has one client (0), got partition {partition_id}"
                )
            return [task.train[i] for i in sorted(i for p in parts for i in p)]
        _check_client(partition_id, len(parts))
        mine = parts[partition_id]
    records = [task.train[i] for i in mine]
    if cfg.attack.kind == "label_flip" and str(partition_id) in attackers(cfg):
        records = flip_labels(records, template_fields(cfg.data.response_template))
    return records


def _check_client(partition_id: int, clients: int) -> None:
    if not 0 <= partition_id < clients:
        raise DataError(f"partition {partition_id} is outside 0..{clients - 1}")


def eval_assignment(
    train_keys: list[Any], parts: list[list[int]], eval_keys: list[Any], rng: np.random.Generator
) -> list[list[int]]:
    """Give each held-out record to a client in proportion to that client's share of its key.

    A client's local held-out set then follows its own training distribution: under a natural
    split it holds exactly its own domains, under Dirichlet the same skew. Keys absent from
    training are spread uniformly.
    """
    owners: dict[Any, np.ndarray] = {}
    for c, part in enumerate(parts):
        for i in part:
            owners.setdefault(train_keys[i], np.zeros(len(parts)))[c] += 1
    out: list[list[int]] = [[] for _ in parts]
    uniform = np.full(len(parts), 1 / len(parts))
    for j, key in enumerate(eval_keys):
        counts = owners.get(key)
        probs = counts / counts.sum() if counts is not None else uniform
        out[int(rng.choice(len(parts), p=probs))].append(j)
    return out


def client_eval_records(
    cfg: RunConfig, partition_id: int, cache: ProcessCache = PROCESS_CACHE, own: bool = False
) -> list[dict[str, Any]]:
    """Client ``partition_id``'s share of the held-out split (for federated evaluation).

    ``own``: the data file is this client's own: all of its held-out records.
    """
    if own:
        return list(get_task(cfg.data, cfg.federation.seed, cache).eval)
    fed = cfg.federation
    if fed.records_per_client and not fed.centralized:
        _check_client(partition_id, fed.num_clients)
        task = get_task(cfg.data, fed.seed, cache)
        return [task.eval[j] for j in drawn_indices(cfg, task, partition_id, True, cache)]
    task, parts, key = partitions(cfg, cache)
    if fed.centralized:
        return list(task.eval)
    by = fed.partition_key if fed.partition != "iid" else None

    def assign() -> list[list[int]]:  # once per process: every record's key is read
        train_keys = [r[by] if by else 0 for r in task.train]
        eval_keys = [r.get(by) if by else 0 for r in task.eval]
        return eval_assignment(train_keys, parts, eval_keys, np_rng(fed.seed, "eval-assign"))

    owned = cache.get("eval-" + key, assign)
    return [task.eval[j] for j in owned[partition_id]]
