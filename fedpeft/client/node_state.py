"""A node's own tensors kept between rounds in its Flower ``Context.state``.

Some algorithms keep per-node state across rounds: SCAFFOLD's client control variate,
FedSA-LoRA's personal ``B``. It lives where Flower keeps per-node state, ``Context.state``,
which Flower carries across Ray actors and a deployed node's worker carries too; never in a
process cache. Every entry is tagged with the run it belongs to, so a node that takes part in
another run (or the same process running another scenario) starts fresh.

Entries are versioned by the round that wrote them, and a round reads the newest version
written *before* it. A round that runs again (a retried round, or the round a coordinator
was killed in, run again after ``--resume`` while the nodes kept running) therefore starts
from the same state as the first time, not from what its first attempt left. A save keeps
the version it replaces the reading of (the newest older one) and drops the rest.

An algorithm's client half gets a :class:`NodeState` when it sets ``stateful = True``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from fedpeft.errors import ProtocolError

__all__ = ["NodeState", "require_node"]

PREFIX = "fedpeft.node."


class NodeState:
    """Named groups of tensors a node keeps for one run, versioned by round.

    Parameters
    ----------
    context : Context
        The node's Flower context (its ``state`` is what persists).
    run_id : str
        The run the entries belong to; entries of other runs read as absent.
    server_round : int
        The round being served: :meth:`load` reads what earlier rounds wrote, :meth:`save`
        writes this round's version.
    """

    def __init__(self, context: Context, run_id: str, server_round: int) -> None:
        self.context = context
        self.run_id = run_id
        self.server_round = server_round

    def _versions(self, name: str) -> dict[int, str]:
        """Round -> state key of ``name``'s versions of this run."""
        out: dict[int, str] = {}
        head = PREFIX + name + "@"
        for key, rec in self.context.state.items():
            if not key.startswith(head) or not isinstance(rec, ConfigRecord):
                continue
            if rec.get("run_id") == self.run_id and key.endswith(".run"):
                out[int(key[len(head) : -len(".run")])] = key[: -len(".run")]
        return out

    def _before(self, name: str) -> tuple[int, str] | None:
        older = {r: k for r, k in self._versions(name).items() if r < self.server_round}
        return max(older.items()) if older else None

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        """The newest tensors saved under ``name`` by an earlier round of this run, or ``None``."""
        found = self._before(name)
        if found is None:
            return None
        arrays = self.context.state.get(found[1])
        if not isinstance(arrays, ArrayRecord):
            return None
        return {k: torch.from_numpy(a.numpy().copy()) for k, a in arrays.items()}

    def save(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Keep ``tensors`` (stored as float32) as this round's version of ``name``; versions
        other than this one and the newest earlier one are dropped (so are other runs')."""
        keep = {self.server_round}
        if (found := self._before(name)) is not None:
            keep.add(found[0])
        head = PREFIX + name + "@"
        kept = {k for r, k in self._versions(name).items() if r in keep}
        for key in [k for k in self.context.state if k.startswith(head)]:
            if key.removesuffix(".run") not in kept:
                del self.context.state[key]
        key = f"{head}{self.server_round}"
        self.context.state[key + ".run"] = ConfigRecord({"run_id": self.run_id})
        self.context.state[key] = ArrayRecord(
            {
                k: Array(np.ascontiguousarray(t.detach().cpu().float().numpy()))
                for k, t in sorted(tensors.items())
            }
        )


def require_node(node: NodeState | None, algorithm: str, keeps: str) -> NodeState:
    """``node``, or a clear error when a stateful client half runs without one."""
    if node is None:
        raise ProtocolError(
            f"{algorithm} keeps {keeps} in its node's state; run it in a ClientApp "
            "(fit(..., node=NodeState(context, run_id, server_round)))"
        )
    return node
