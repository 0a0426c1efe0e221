"""How a scenario splits its data among clients: sizes, key mix, and one skew figure.

``fedpeft data inspect --config X`` prints it; every simulation writes it to ``split.json`` in
the run folder, and ``fedpeft report`` shows it. The records are the ones each client trains
on (partition, ``data.max_examples_per_client`` and drawn records all applied), computed by the
same functions the clients call.

**Skew** is the total variation distance between a client's key mix and the mix of all the
clients' records together, ``TV = 1/2 sum_v |p_client(v) - p_all(v)|``: 0 when a client holds
the overall mix, 1 when it shares no key value with it. The report gives its mean over clients
(weighted by records) and its maximum. Keys are ``federation.partition_key`` values; an iid
split is measured by that field too when the records have it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from fedpeft.cache import PROCESS_CACHE, ProcessCache
from fedpeft.config import RunConfig
from fedpeft.data.clients import client_eval_records, client_records, get_task

__all__ = ["MAX_CLIENTS", "format_split", "inspect_split"]

#: Clients a split report covers at most (a population of millions is summarised by its first).
MAX_CLIENTS = 1000


def inspect_split(cfg: RunConfig, cache: ProcessCache = PROCESS_CACHE) -> dict[str, Any]:
    """Per-client training and held-out sizes, key counts, skew, and totals (see module)."""
    fed = cfg.federation
    task = get_task(cfg.data, fed.seed, cache)
    key = fed.partition_key if task.train and fed.partition_key in task.train[0] else None
    n = 1 if fed.centralized else min(fed.num_clients, MAX_CLIENTS)
    sizes: list[tuple[int, int]] = []  # (train, held-out) per client
    counts: list[Counter[str]] = []
    for pid in range(n):
        train = client_records(cfg, pid, cache)
        sizes.append((len(train), len(client_eval_records(cfg, pid, cache))))
        counts.append(Counter(str(r[key]) for r in train) if key else Counter())
    overall: Counter[str] = sum(counts, Counter())
    total = sum(overall.values())
    skews = [
        _tv(c, overall, size, total) if key else 0.0
        for c, (size, _) in zip(counts, sizes, strict=True)
    ]
    used = sum(size for size, _ in sizes)
    clients = [
        {"client": str(pid), "train": size, "eval": held, "skew": skew,
         "keys": dict(c.most_common())}
        for pid, ((size, held), c, skew) in enumerate(zip(sizes, counts, skews, strict=True))
    ]  # fmt: skip
    return {
        "partition": "centralized" if fed.centralized else fed.partition,
        "partition_key": key,
        "num_clients": 1 if fed.centralized else fed.num_clients,
        "clients_shown": n,
        "records_train": len(task.train),
        "records_eval": len(task.eval),
        "records_used": used,
        "key_values": len(overall),
        "skew_mean": sum(k * size for k, (size, _) in zip(skews, sizes, strict=True)) / used
        if used
        else 0.0,
        "skew_max": max(skews, default=0.0),
        "clients": clients,
    }


def _tv(mine: Counter[str], overall: Counter[str], size: int, total: int) -> float:
    """Total variation distance between a client's key mix and the overall one."""
    if not size or not total:
        return 0.0
    return 0.5 * sum(abs(mine.get(v, 0) / size - overall[v] / total) for v in overall)


def format_split(split: dict[str, Any], top: int = 3, rows: int = 50) -> str:
    """The split as a plain-text table (at most ``rows`` clients, ``top`` key values each)."""
    key = split["partition_key"]
    head = (
        f"split: {split['partition']}"
        + (f" by {key!r}" if key else "")
        + f", {split['num_clients']} clients, {split['key_values']} key values; "
        f"{split['records_used']} of {split['records_train']} training records used, "
        f"{split['records_eval']} held out"
    )
    lines = [head, f"{'client':>8} {'train':>7} {'held-out':>8} {'skew':>5}  top key values"]
    for c in split["clients"][:rows]:
        tops = ", ".join(
            f"{v} {k / c['train']:.0%}" for v, k in list(c["keys"].items())[:top] if c["train"]
        )
        lines.append(f"{c['client']:>8} {c['train']:>7} {c['eval']:>8} {c['skew']:>5.2f}  {tops}")
    hidden = split["clients_shown"] - min(rows, len(split["clients"]))
    if hidden > 0:
        lines.append(f"{'':>8} ... {hidden} more clients (all in split.json)")
    if split["clients_shown"] < split["num_clients"]:
        lines.append(f"(the first {split['clients_shown']} of {split['num_clients']} clients)")
    lines.append(
        f"skew (total variation from the overall key mix; 0 = same mix, 1 = no value in "
        f"common): mean {split['skew_mean']:.2f}, max {split['skew_max']:.2f}"
    )
    return "\n".join(lines)
