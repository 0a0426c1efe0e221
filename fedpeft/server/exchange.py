"""One exchange of a round: encode instructions, send them, decode and validate the replies.

Works for both kinds of training: LoRA (``train.lora``: :class:`~fedpeft.wire.TrainInstruction`
-> :class:`~fedpeft.wire.LoraUpdate`) and seed/scalar (``train.zo``:
:class:`~fedpeft.wire_zo.ZoInstruction` -> :class:`~fedpeft.wire_zo.ZoUpdate`). Counts the
framed bytes of every message (Flower's serialized object tree) and, separately, the payload
(the arrays of the encoded adapters for LoRA, after any codec; index, scalar and sync bytes
for seed/scalar training).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedpeft._flwr import message_nbytes
from fedpeft.errors import ProtocolError
from fedpeft.server.validate import validate_update, validate_zo_update
from fedpeft.wire import (
    LoraUpdate,
    SharedRecords,
    TrainInstruction,
    decode_update,
    encode_instruction,
    instruction_payload,
    update_payload,
)
from fedpeft.wire_zo import ZoInstruction, ZoUpdate, decode_zo_update, encode_zo_instruction

__all__ = ["Exchange", "Instruction", "Update", "exchange"]

Instruction = TrainInstruction | ZoInstruction
Update = LoraUpdate | ZoUpdate


@dataclass
class Exchange:
    """What came back from one round's instructions."""

    updates: list[Any] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(
        default_factory=lambda: {"bytes_down": 0, "bytes_up": 0, "payload_down": 0, "payload_up": 0}
    )
    client_bytes_down: dict[str, int] = field(default_factory=dict)
    client_bytes_up: dict[str, int] = field(default_factory=dict)


def _encode(ins: Instruction, shared: SharedRecords) -> RecordDict:
    if isinstance(ins, ZoInstruction):
        return encode_zo_instruction(ins)
    return encode_instruction(ins, shared)


def _payload_down(ins: Instruction, content: RecordDict) -> int:
    if isinstance(ins, ZoInstruction):
        return ins.sync.nbytes + (ins.probs.size * 4 if ins.probs is not None else 0)
    return instruction_payload(content)


def _decode(reply: Message, ins: Instruction, zo_blocks: int) -> tuple[Update, int]:
    if reply.has_error():
        raise ProtocolError(f"client error: {reply.error.reason}")
    if isinstance(ins, ZoInstruction):
        zo = decode_zo_update(reply.content)
        validate_zo_update(zo, ins, zo_blocks)
        return zo, zo.payload_nbytes
    update = decode_update(reply.content, reference=ins.adapter)
    validate_update(update, ins)
    return update, update_payload(reply.content)


def exchange(
    grid: Grid,
    instructions: Mapping[str, Instruction],
    nodes: Mapping[str, int],
    server_round: int,
    timeout: float,
    zo_blocks: int = 1,
) -> Exchange:
    """Send every instruction, wait for the replies and keep only the valid updates.

    A reply that is an error, does not decode or does not match its instruction is recorded
    in ``failures`` under its client id (``client error: ...`` / ``rejected: ...``), as is a
    client that did not answer before ``timeout``.
    """
    shared: SharedRecords = {}  # one encoded copy of each distinct broadcast adapter
    msgs = [
        Message(_encode(ins, shared), nodes[cid], ins.message_type, group_id=str(server_round))
        for cid, ins in instructions.items()
    ]
    out = Exchange()
    out.client_bytes_down = {
        cid: message_nbytes(m) for cid, m in zip(instructions, msgs, strict=True)
    }
    out.counts["bytes_down"] = sum(out.client_bytes_down.values())
    out.counts["payload_down"] = sum(
        _payload_down(ins, m.content) for ins, m in zip(instructions.values(), msgs, strict=True)
    )
    by_node = {nodes[cid]: cid for cid in instructions}
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    del msgs, shared
    replies.reverse()
    answered: set[str] = set()
    while replies:  # pop as we decode: a reply's bytes are freed once it is decoded
        reply = replies.pop()
        cid = by_node.get(reply.metadata.src_node_id)
        if cid is None or cid in answered:
            continue  # not asked this round, or a duplicate reply
        answered.add(cid)
        out.client_bytes_up[cid] = message_nbytes(reply)
        out.counts["bytes_up"] += out.client_bytes_up[cid]
        try:
            update, payload = _decode(reply, instructions[cid], zo_blocks)
        except ProtocolError as err:
            reason = err.reason
            out.failures[cid] = (
                reason if reason.startswith("client error") else f"rejected: {reason}"
            )
            continue
        out.counts["payload_up"] += payload
        out.updates.append(update)
    for cid in instructions:
        if cid not in answered:
            out.failures[cid] = "no reply before the round timeout"
    # replies arrive in whatever order the transport delivers them (Ray: scheduling); sorted,
    # every float sum downstream (the round's mean train loss, ...) is the same on any backend
    out.updates.sort(key=lambda u: u.header.client_id)
    return out
