"""Secure aggregation over Flower messages: ``query.secagg`` requests through any ``Grid``.

Each stage's request and reply travel as one ``ConfigRecord`` (``fedpeft.secagg``) of ints,
floats, strings, bytes and lists of them: nothing is pickled. :func:`grid_transport` sends a
stage to the nodes of a session and returns the replies that arrived before the timeout (a
node that errs or stays silent has dropped). :func:`secagg_handler` is the client side: it
keeps the node's :class:`~fedpeft.secagg.client.SecAggClient` for the session in the node's
Flower ``Context.state`` (which Flower carries per node across Ray actors, and a deployed
node's worker carries too), and asks ``provider(context, weight)`` for the vector to
contribute when a session starts
(``weight``: the ``keys`` request's ``weight``, in ``(0, 1]``, 1 if absent; the coordinator's
share for this client, which the client multiplies its vector by).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from fedpeft._flwr import message_nbytes, send_bounded
from fedpeft.errors import ProtocolError
from fedpeft.secagg.client import SecAggClient
from fedpeft.secagg.session import Send

__all__ = [
    "MESSAGE_TYPE",
    "RECORD",
    "from_record",
    "grid_transport",
    "reply_limit",
    "secagg_handler",
    "to_record",
]

MESSAGE_TYPE = "query.secagg"
RECORD = "fedpeft.secagg"
Provider = Callable[[Context, float], np.ndarray]


def to_record(data: Mapping[str, Any]) -> RecordDict:
    """A stage request or reply as a ``RecordDict``."""
    return RecordDict({RECORD: ConfigRecord(dict(data))})


def from_record(content: RecordDict) -> dict[str, Any]:
    """The request or reply inside a ``RecordDict``; ``ProtocolError`` if there is none."""
    rec = content.get(RECORD)
    if not isinstance(rec, ConfigRecord):
        raise ProtocolError(f"the message has no {RECORD!r} config record", "decode")
    return dict(rec)


def reply_limit(dim: int, participants: int) -> int:
    """Largest stage reply accepted, in bytes: a masked vector (8 bytes per coordinate in
    Z_2^64) plus a few kB of keys and shares per participant, plus 1 MB."""
    return 1_000_000 + 8 * dim + 4096 * participants


def grid_transport(
    grid: Grid,
    nodes: Mapping[int, int],
    timeout: float,
    counts: dict[str, int] | None = None,
    limit: int | None = None,
) -> Send:
    """A ``send`` for :func:`~fedpeft.secagg.session.run_session` over ``grid``.

    ``nodes`` maps a participant index to its node id; ``counts`` (if given) accumulates
    ``bytes_down`` / ``bytes_up`` of the framed messages; ``limit`` (bytes) bounds each reply
    where the grid can stop pulling it (see :func:`reply_limit`).
    """
    by_node = {node: i for i, node in nodes.items()}

    def send(stage: str, requests: Mapping[int, dict[str, Any]]) -> dict[int, Any]:
        msgs = [
            Message(to_record(req), nodes[i], MESSAGE_TYPE, group_id=stage)
            for i, req in requests.items()
        ]
        if counts is not None:
            counts["bytes_down"] = counts.get("bytes_down", 0) + sum(map(message_nbytes, msgs))
        out: dict[int, Any] = {}
        bounds = dict.fromkeys(by_node, limit) if limit is not None else {}
        for reply in send_bounded(grid, msgs, bounds, timeout):
            i = by_node.get(reply.metadata.src_node_id)
            if i is None or i in out or reply.has_error():
                continue
            if counts is not None:
                counts["bytes_up"] = counts.get("bytes_up", 0) + message_nbytes(reply)
            try:
                out[i] = from_record(reply.content)
            except ProtocolError:
                continue
        return out

    return send


SESSION = "fedpeft.secagg.session"  # Context.state: the client's session state
SESSION_VECTOR = "fedpeft.secagg.session-vector"  # Context.state: what it contributes


def _load_session(context: Context) -> SecAggClient | None:
    state, vector = context.state.get(SESSION), context.state.get(SESSION_VECTOR)
    if not isinstance(state, ConfigRecord) or not isinstance(vector, ArrayRecord):
        return None
    return SecAggClient.restore(dict(state), vector["vector"].numpy())


def _save_session(context: Context, client: SecAggClient, new: bool) -> None:
    context.state[SESSION] = ConfigRecord(client.state())
    if new:  # the vector is fixed for the session: stored once, not at every stage
        context.state[SESSION_VECTOR] = ArrayRecord({"vector": Array(client.vector)})


def secagg_handler(provider: Provider) -> Callable[[Message, Context], Message]:
    """A ClientApp query handler for ``query.secagg`` contributing ``provider(context, w)``.

    One session per node at a time, kept in ``context.state`` between the stages.
    """

    def handle(msg: Message, context: Context) -> Message:
        req = from_record(msg.content)
        session = req.get("session")
        if not isinstance(session, bytes):
            raise ProtocolError("secagg request without a session id", "decode")
        held = _load_session(context)
        new = held is None or held.session != session
        if held is not None and not new:
            client = held
        else:
            if req.get("stage") != "keys":
                raise ProtocolError("secagg request for an unknown session", "replay")
            weight = req.get("weight", 1.0)
            if not isinstance(weight, float) or not 0 < weight <= 1:
                raise ProtocolError(f"secagg weight must be a float in (0, 1], got {weight!r}")
            client = SecAggClient(provider(context, weight))
        try:
            return Message(to_record(client.handle(req)), reply_to=msg)
        finally:  # an abort, or a refused request that changed nothing, is kept as it is
            _save_session(context, client, new)

    return handle
