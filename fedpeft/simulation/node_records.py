"""A node's ``Context.state`` as plain, checkpointable values, and back.

fedpeft keeps per-node state in ``ArrayRecord`` (tensors) and ``ConfigRecord`` (tags) entries;
both round-trip exactly (arrays keep their dtype and shape). A ``MetricRecord`` is kept as
numbers too. Anything else in a node's state is refused with its name, never dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpeft.errors import FedpeftError

__all__ = ["load_node_state", "node_state_dict"]


def node_state_dict(state: RecordDict) -> dict[str, Any]:
    """``{name: {"kind": arrays|config|metrics, "values": {...}}}`` of a node's state."""
    out: dict[str, Any] = {}
    for name, rec in state.items():
        if isinstance(rec, ArrayRecord):
            values: dict[str, Any] = {k: np.array(a.numpy()) for k, a in rec.items()}
            out[name] = {"kind": "arrays", "values": values}
        elif isinstance(rec, ConfigRecord):
            out[name] = {"kind": "config", "values": dict(rec)}
        elif isinstance(rec, MetricRecord):
            out[name] = {"kind": "metrics", "values": dict(rec)}
        else:
            raise FedpeftError(
                f"node state entry {name!r} is a {type(rec).__name__}; cannot keep it"
            )
    return out


def load_node_state(saved: Mapping[str, Any]) -> RecordDict:
    """The ``RecordDict`` :func:`node_state_dict` describes."""
    records: dict[str, Any] = {}
    for name, entry in saved.items():
        kind, values = entry["kind"], entry["values"]
        if kind == "arrays":
            records[name] = ArrayRecord(
                {k: Array(np.ascontiguousarray(np.asarray(v))) for k, v in values.items()}
            )
        elif kind == "config":
            records[name] = ConfigRecord(dict(values))
        elif kind == "metrics":
            records[name] = MetricRecord(dict(values))
        else:
            raise FedpeftError(f"node state entry {name!r} has unknown kind {kind!r}")
    return RecordDict(records)
