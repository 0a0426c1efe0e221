"""The client's half of secure aggregation inside a training round.

When an instruction says ``secure``, the client trains as usual but keeps its contribution in
the node's Flower ``Context.state`` (:func:`keep_lora`: the change to the factors it was sent,
flattened, only the coordinates it trains; :func:`keep_zo`: its scalars summed per (block,
seed) direction, dense) and replies with the header and metrics only. Flower carries that
state per node, so the session's messages may reach another process (a Ray actor) than the
one that trained. The coordinator then runs a secure-aggregation session
(``query.secagg``) among the clients that trained; :func:`secagg_query` answers it with the
kept vector times the weight the session's first request gives this client. One vector per
node is kept; the next round's replaces it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message

from fedpeft.changes import direction_sums, flat_change, trained_mask
from fedpeft.errors import ProtocolError
from fedpeft.privacy import clip_and_noise
from fedpeft.secagg.flower import secagg_handler
from fedpeft.wire.messages import LoraUpdate, TrainInstruction
from fedpeft.wire.zo import ZoInstruction, ZoUpdate

__all__ = ["keep_lora", "keep_zo", "secagg_query"]

PENDING = "fedpeft.secagg.pending"  # Context.state: the vector kept for the next session


def _keep(context: Context, vector: np.ndarray) -> None:
    context.state[PENDING] = ArrayRecord({"vector": Array(np.asarray(vector, np.float64))})


def keep_lora(context: Context, update: LoraUpdate, ins: TrainInstruction) -> LoraUpdate:
    """Keep ``update``'s change for the session; returns the reply (no tensors)."""
    mask = trained_mask(ins.adapter, ins.parts).numpy()
    vector = flat_change(update.factors, ins.adapter).numpy()[mask]  # the trained coordinates
    if ins.dp_clip > 0:
        vector = clip_and_noise(vector, ins.dp_clip, ins.dp_noise)
    _keep(context, vector)
    return replace(update, factors={})


def keep_zo(context: Context, update: ZoUpdate, ins: ZoInstruction, num_blocks: int) -> ZoUpdate:
    """Keep ``update``'s scalars as a dense (blocks x K) vector; returns the reply (no pairs)."""
    vector = direction_sums(update, num_blocks, ins.spec.num_seeds)
    if ins.dp_clip > 0:
        vector = clip_and_noise(vector, ins.dp_clip, ins.dp_noise)
    _keep(context, vector)
    return replace(
        update,
        seeds=update.seeds[:0],
        scalars=update.scalars[:0],
        blocks=update.blocks[:0],
    )


def secagg_query() -> Callable[[Message, Context], Message]:
    """The ``query.secagg`` handler: contributes the vector this node kept."""

    def provider(context: Context, weight: float) -> np.ndarray:
        kept = context.state.get(PENDING)
        if isinstance(kept, ArrayRecord):
            del context.state[PENDING]  # one session per kept vector
        vector = kept["vector"].numpy() if isinstance(kept, ArrayRecord) else None
        if vector is None:
            raise ProtocolError(
                "secure aggregation asked for a contribution, but this node kept none "
                "(it did not train this round, or restarted since)",
                "client_error",
            )
        return vector * weight  # the coordinator's share for this client

    return secagg_handler(provider)
