"""A node's own tensors kept between rounds in its Flower ``Context.state``.

Some algorithms keep per-node state across rounds: SCAFFOLD's client control variate,
FedSA-LoRA's personal ``B``. It lives where Flower keeps per-node state, ``Context.state``,
which Flower carries across Ray actors and a deployed node's worker carries too; never in a
process cache. Every entry is tagged with the run it belongs to, so a node that takes part in
another run (or the same process running another scenario) starts fresh.

An algorithm's client half gets a :class:`NodeState` when it sets ``stateful = True``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

__all__ = ["NodeState"]

PREFIX = "fedpeft.node."


class NodeState:
    """Named groups of tensors a node keeps for one run.

    Parameters
    ----------
    context : Context
        The node's Flower context (its ``state`` is what persists).
    run_id : str
        The run the entries belong to; entries of other runs read as absent.
    """

    def __init__(self, context: Context, run_id: str) -> None:
        self.context = context
        self.run_id = run_id

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        """The tensors saved under ``name`` for this run, or ``None``."""
        owner = self.context.state.get(PREFIX + name + ".run")
        arrays = self.context.state.get(PREFIX + name)
        if not isinstance(owner, ConfigRecord) or owner.get("run_id") != self.run_id:
            return None
        if not isinstance(arrays, ArrayRecord):
            return None
        return {k: torch.from_numpy(a.numpy().copy()) for k, a in arrays.items()}

    def save(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Keep ``tensors`` (stored as float32) under ``name`` for this run."""
        self.context.state[PREFIX + name + ".run"] = ConfigRecord({"run_id": self.run_id})
        self.context.state[PREFIX + name] = ArrayRecord(
            {
                k: Array(np.ascontiguousarray(t.detach().cpu().float().numpy()))
                for k, t in sorted(tensors.items())
            }
        )
