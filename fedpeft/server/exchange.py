"""One exchange of a round: encode instructions, send them, decode and validate the replies.

Works for every update family (:mod:`fedpeft.families`: LoRA factors, ``train.lora``;
seed/scalar pairs, ``train.zo``), which encodes, bounds, decodes and validates. Counts the
framed bytes of every message (Flower's serialized object tree) and, separately, the payload
(the arrays of the encoded adapters for LoRA, after any codec; index, scalar and sync bytes
for seed/scalar training).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedpeft._flwr import (
    REPLY_TOO_LARGE,
    UNAVAILABLE_CODES,
    WireCache,
    carried_nbytes,
    send_bounded,
)
from fedpeft.errors import ProtocolError, clip
from fedpeft.families import family_of, reply_limit
from fedpeft.server.fold import Fold
from fedpeft.server.validate import Limits
from fedpeft.wire.messages import LoraUpdate, SharedRecords, TrainInstruction
from fedpeft.wire.zo import ZoInstruction, ZoUpdate

__all__ = ["Exchange", "Instruction", "Update", "check_error", "exchange"]

Instruction = TrainInstruction | ZoInstruction
Update = LoraUpdate | ZoUpdate
Screen = Callable[[str, Any, int, int], Any]  # (client id, update, bytes down, up) -> update


@dataclass
class Exchange:
    """What came back from one round's instructions.

    ``failures`` maps a client id to why it contributes nothing this round (text starting
    with its code); ``rejected`` counts those codes (:data:`~fedpeft.errors.REJECT_CODES`),
    including second replies to one instruction (``duplicate``), which do not fail the client.
    """

    updates: list[Any] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    rejected: Counter[str] = field(default_factory=Counter)
    counts: dict[str, int] = field(
        default_factory=lambda: {"bytes_down": 0, "bytes_up": 0, "payload_down": 0, "payload_up": 0}
    )
    client_bytes_down: dict[str, int] = field(default_factory=dict)
    client_bytes_up: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # added to the round's row
    contributors: list[Any] = field(default_factory=list)  # secure aggregation: who is summed

    def fail(self, cid: str, code: str, reason: str) -> None:
        """Record that ``cid`` contributes nothing this round, and why."""
        self.failures[cid] = clip(f"{code}: {reason}")
        self.rejected[code] += 1


def check_error(reply: Message) -> None:
    """Raise the :class:`ProtocolError` an error reply stands for (``unavailable`` when the
    runtime made it because the node or the message is gone, else ``client_error``)."""
    if not reply.has_error():
        return
    code = "unavailable" if reply.error.code in UNAVAILABLE_CODES else "client_error"
    if reply.error.code == REPLY_TOO_LARGE:
        code = "payload_size"
    raise ProtocolError(str(reply.error.reason), code)


def _decode(reply: Message, ins: Instruction, limits: Limits, nbytes: int) -> tuple[Update, int]:
    limit = reply_limit(ins, limits)
    if nbytes > limit:  # error replies too: their text is as much the client's as an update
        raise ProtocolError(
            f"reply is {nbytes} bytes, the limit for this instruction is {limit} "
            "(validation.max_reply_mb)",
            "payload_size",
        )
    check_error(reply)
    return family_of(ins).decode(reply.content, ins, limits)


def exchange(
    grid: Grid,
    instructions: Mapping[str, Instruction],
    nodes: Mapping[str, int],
    server_round: int,
    timeout: float,
    limits: Mapping[str, Limits] | None = None,
    fold: Fold | None = None,
    window: int = 0,
    screen: Screen | None = None,
) -> Exchange:
    """Send every instruction, wait for the replies and keep only the valid updates.

    A reply that is an error, is too large, does not decode or does not match its
    instruction (and ``limits[cid]``: the run's bounds and the client's example count) is
    recorded in ``failures`` under its client id as ``<code>: <reason>``, as is a client that
    did not answer before ``timeout``; ``rejected`` counts the codes.

    ``window``: instructions in flight at once (0: all); the replies of a window are decoded
    before the next window is sent, so at most a window's replies are held. ``fold``: each
    valid update is folded into it as it is decoded and only its stub (header and metrics)
    is kept in ``updates`` (streaming aggregation, :mod:`fedpeft.server.fold`). ``screen``:
    called with each valid update (client id, update, bytes down and up) before it is
    folded or kept; it returns the update to keep or raises :class:`ProtocolError` to fail
    the client (:class:`fedpeft.server.screen.DeviceScreen`).
    """
    out = Exchange()
    held = {cid: (limits or {}).get(cid, Limits()) for cid in instructions}
    shared: SharedRecords = {}  # one encoded copy of each distinct broadcast adapter
    cids = list(instructions)
    step = window if window > 0 else max(len(cids), 1)
    deadline = time.monotonic() + timeout
    answered: set[str] = set()
    wire = WireCache()  # the round's messages share records: each is serialized once
    for at in range(0, len(cids), step):
        left = deadline - time.monotonic()
        if left <= 0:
            break  # the rest were never sent: they fail as timeouts below
        chunk = {cid: instructions[cid] for cid in cids[at : at + step]}
        _window(grid, chunk, nodes, server_round, left, held, shared, out, answered, fold, wire,
                screen)  # fmt: skip
    for cid in instructions:
        if cid not in answered:
            out.fail(cid, "timeout", "no reply before the round timeout")
    # replies arrive in whatever order the transport delivers them (Ray: scheduling); sorted,
    # every float sum downstream (the round's mean train loss, ...) is the same on any backend
    out.updates.sort(key=lambda u: u.header.client_id)
    return out


def _window(
    grid: Grid,
    instructions: Mapping[str, Instruction],
    nodes: Mapping[str, int],
    server_round: int,
    timeout: float,
    held: Mapping[str, Limits],
    shared: SharedRecords,
    out: Exchange,
    answered: set[str],
    fold: Fold | None,
    wire: WireCache,
    screen: Screen | None,
) -> None:
    """Send ``instructions`` at once and decode (and fold) their replies into ``out``."""
    msgs = [
        Message(
            family_of(ins).encode(ins, shared),
            nodes[cid],
            ins.message_type,
            group_id=str(server_round),
        )  # fmt: skip
        for cid, ins in instructions.items()
    ]
    for (sent_to, ins), m in zip(instructions.items(), msgs, strict=True):
        out.client_bytes_down[sent_to] = wire.nbytes(m)
        out.counts["bytes_down"] += out.client_bytes_down[sent_to]
        out.counts["payload_down"] += family_of(ins).payload_down(ins, m.content)
    bounds = {nodes[c]: reply_limit(i, held[c]) for c, i in instructions.items()}
    replies = send_bounded(grid, msgs, bounds, timeout)
    # a reply belongs to the instruction it answers; the runtime's own error replies (node
    # unavailable, message expired) come from the SuperLink, not from the node
    by_message = {m.metadata.message_id: cid for cid, m in zip(instructions, msgs, strict=True)}
    del msgs
    replies.reverse()
    while replies:  # pop as we decode: a reply's bytes are freed once it is decoded
        reply = replies.pop()
        cid = by_message.get(reply.metadata.reply_to_message_id)
        if cid is None:
            continue  # not asked in this window
        if cid in answered:
            out.rejected["duplicate"] += 1  # the first reply to an instruction counts
            continue
        answered.add(cid)
        carried = carried_nbytes(grid, reply)  # the in-process grid counted what it made
        out.client_bytes_up[cid] = wire.nbytes(reply) if carried is None else carried
        out.counts["bytes_up"] += out.client_bytes_up[cid]
        try:
            update, payload = _decode(reply, instructions[cid], held[cid], out.client_bytes_up[cid])
            if screen is not None:
                down, up = out.client_bytes_down[cid], out.client_bytes_up[cid]
                update = screen(cid, update, down, up)
            if fold is not None:
                update = fold.add(update)
        except ProtocolError as err:
            out.fail(cid, err.code, err.reason)
            continue
        out.counts["payload_up"] += payload
        out.updates.append(update)
