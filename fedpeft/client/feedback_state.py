"""A node's error-feedback residual, kept in its Flower ``Context.state`` between rounds.

Sparse upload codecs (top-k, ComPEFT) leave entries out; error feedback adds what earlier
rounds left out to the next upload. The residual is per node and per run, so it lives where
Flower keeps per-node state: ``Context.state``, which Flower carries across Ray actors and a
deployed node's worker carries too. A residual from another run is dropped.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from fedpeft.wire.codecs import ErrorFeedback

__all__ = ["load_feedback", "save_feedback"]

RESIDUAL = "fedpeft.error-feedback"  # ArrayRecord: tensor key -> residual (float32)
OWNER = "fedpeft.error-feedback-run"  # ConfigRecord: {"run_id": the run it belongs to}


def load_feedback(context: Context, run_id: str) -> ErrorFeedback:
    """The node's residual for ``run_id`` (empty for a new run)."""
    owner, arrays = context.state.get(OWNER), context.state.get(RESIDUAL)
    if not isinstance(owner, ConfigRecord) or owner.get("run_id") != run_id:
        return ErrorFeedback()
    if not isinstance(arrays, ArrayRecord):
        return ErrorFeedback()
    return ErrorFeedback({k: torch.from_numpy(a.numpy().copy()) for k, a in arrays.items()})


def save_feedback(context: Context, run_id: str, feedback: ErrorFeedback) -> None:
    """Keep ``feedback`` as the node's residual for ``run_id``."""
    context.state[OWNER] = ConfigRecord({"run_id": run_id})
    context.state[RESIDUAL] = ArrayRecord(
        {k: Array(np.ascontiguousarray(r.detach().cpu().float().numpy()))
         for k, r in sorted(feedback.residual.items())}
    )  # fmt: skip
