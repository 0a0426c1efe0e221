"""Check a scenario's data before any model loads: the mistakes that would otherwise surface
only after minutes of loading, or as a failed round.

:func:`data_problems` reads the data file (or the records a caller passed in), and reports one
line per distinct problem, each naming the configuration key to change:

- ``data.path``: missing, unreadable, empty;
- ``data.prompt_template`` / ``data.response_template``: a field the records lack;
- ``data.split_field``: absent, or a split left empty;
- ``federation.partition`` / ``federation.partition_key``: the key is not a field, or the split
  cannot give every client records (``natural`` with fewer key values than clients, too few
  records, a Dirichlet draw that leaves a client empty).

``fedpeft validate`` and every simulation run it; the simulation refuses to start on any
problem, so no run folder is left half-written.
"""

from __future__ import annotations

from fedpeft.cache import PROCESS_CACHE, ProcessCache
from fedpeft.config import RunConfig
from fedpeft.data.clients import get_task, partitions
from fedpeft.data.tasks import template_fields
from fedpeft.errors import ConfigError, DataError

__all__ = ["check_data", "data_problems"]


def data_problems(cfg: RunConfig, cache: ProcessCache = PROCESS_CACHE) -> list[str]:
    """Everything in ``cfg``'s data that would fail a run, one line per distinct problem
    (empty: the data fits the scenario). Reads the data once into ``cache``."""
    try:
        task = get_task(cfg.data, cfg.federation.seed, cache)
    except DataError as err:
        return [str(err)]  # nothing else can be checked without the records
    problems = _template_problems(cfg, task.train + task.eval)
    fed = cfg.federation
    if fed.partition != "iid" and fed.partition_key not in task.train[0]:
        problems.append(
            f"federation.partition_key {fed.partition_key!r} is not a field of {cfg.data.path!r} "
            f"(fields: {task.fields}); name one of them or use federation.partition='iid'"
        )
    elif not fed.centralized and not fed.records_per_client:
        try:
            partitions(cfg, cache)  # cached: the clients reuse it
        except DataError as err:
            problems.append(f"federation.partition={fed.partition!r}: {err}")
    return problems


def _template_problems(cfg: RunConfig, records: list[dict[str, object]]) -> list[str]:
    out = []
    for key in ("prompt_template", "response_template"):
        for name in sorted(template_fields(getattr(cfg.data, key))):
            lacking = sum(1 for r in records if name not in r)
            if lacking:
                fields = sorted({f for r in records[:100] for f in r})
                out.append(
                    f"data.{key} uses field {name!r}, which {lacking} of the {len(records)} "
                    f"records lack (fields: {fields}); fix the template or the data"
                )
    return out


def check_data(cfg: RunConfig, cache: ProcessCache = PROCESS_CACHE) -> None:
    """Raise ``ConfigError`` listing :func:`data_problems`, if there are any."""
    if problems := data_problems(cfg, cache):
        raise ConfigError(problems)
