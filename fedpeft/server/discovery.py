"""Who takes part: every expected client id either joins or is listed with the reason it did not.

The scenario expects the client ids ``0 .. federation.nodes - 1`` (a node's client id is its
``partition-id``). Each node that connects is asked who it is (``query.info``) once; its
answer admits it, or refuses it with a reason:

- its reply is an error (a missing data file, a partition its data cannot make...) or does
  not decode;
- its client id is not one the scenario expects;
- another node that is still connected holds that client id already (the first node to
  join keeps it; the later one is refused) — a node whose holder has gone (a restarted
  ``fedpeft client`` gets a new node id) takes the client id over;
- its base model differs from the coordinator's (the fingerprints are named);
- it reports an impossible example count.

A node refused for what the coordinator decided (id, duplicate, base model, examples) is
told why with a ``query.refused`` message, so its own log says it. What the roster holds —
joined, missing and refused, each with its reason — goes into the first metrics row and into
``summary.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedpeft._flwr import message_nbytes, send_bounded
from fedpeft.errors import ProtocolError, clip
from fedpeft.server.exchange import check_error
from fedpeft.server.validate import MAX_NUM_EXAMPLES
from fedpeft.wire import ClientInfo, decode_client_info, encode_query, encode_refusal

__all__ = ["MAX_PROPERTIES", "NOTICE_TIMEOUT_S", "Roster"]

log = logging.getLogger(__name__)

MAX_PROPERTIES = 32  # a node advertises a few capabilities, not a payload
MAX_INFO_BYTES = 1_000_000  # an answer to a query is a few hundred bytes
NOTICE_TIMEOUT_S = 10.0  # how long a refusal notice may take to be acknowledged


@dataclass
class Roster:
    """The expected client ids, the nodes that hold them, and the nodes left out.

    Parameters
    ----------
    expected : tuple[str, ...]
        Client ids the scenario expects.
    run_id : str
        Stamped on the queries.
    fingerprint : str
        The coordinator's base-model fingerprint.
    """

    expected: tuple[str, ...]
    run_id: str
    fingerprint: str
    clients: dict[str, ClientInfo] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)
    asked: set[int] = field(default_factory=set)
    bytes_down: int = 0
    bytes_up: int = 0

    @property
    def complete(self) -> bool:
        """Every expected client id has a node."""
        return len(self.clients) == len(self.expected)

    def missing(self) -> dict[str, str]:
        """Expected client ids without a node, each with why (a refused claim, or none)."""
        claims: dict[str, list[str]] = {}
        for node, reason in sorted(self.refused.items()):
            for cid in self.expected:
                if reason.startswith(f"client {cid}:"):
                    claims.setdefault(cid, []).append(f"node {node} was refused")
        return {
            cid: "; ".join(claims.get(cid, ["no node claimed it"]))
            for cid in self.expected
            if cid not in self.clients
        }

    def report(self) -> dict[str, Any]:
        """What ``summary.json`` and the first row say about who joined."""
        return {
            "expected": len(self.expected),
            "joined": sorted(self.clients),
            "missing": self.missing(),
            "refused": {str(n): r for n, r in sorted(self.refused.items())},
        }

    def infos(self) -> list[ClientInfo]:
        """The admitted clients, ordered by client id."""
        return [self.clients[c] for c in sorted(self.clients)]

    # ------------------------------------------------------------------ asking
    def ask(self, grid: Grid, nodes: Iterable[int], connected: set[int], timeout: float) -> int:
        """Query ``nodes`` (not asked before) and admit or refuse each; returns how many
        joined. ``connected``: the nodes the grid sees now (a holder not among them has
        gone, so its client id is free)."""
        new = sorted(set(nodes) - self.asked)
        if not new:
            return 0
        self.asked.update(new)
        query = encode_query(self.run_id)
        msgs = [Message(query, node, "query.info") for node in new]
        self.bytes_down += sum(message_nbytes(m) for m in msgs)
        replies = send_bounded(grid, msgs, dict.fromkeys(new, MAX_INFO_BYTES), timeout)
        by_message = {m.metadata.message_id: node for node, m in zip(new, msgs, strict=True)}
        answered: set[int] = set()
        notices: dict[int, str] = {}
        joined = 0
        for reply in replies:  # in arrival order: the first node to claim an id keeps it
            self.bytes_up += message_nbytes(reply)
            node = by_message.get(reply.metadata.reply_to_message_id, -1)
            if node < 0 or node in answered:
                continue
            answered.add(node)
            try:
                self._admit(reply, node, connected)
            except _Refused as why:
                self.refused[node] = why.reason
                if why.tell:
                    notices[node] = why.reason
                log.warning("fedpeft: node %d left out: %s", node, why.reason)
                continue
            self.refused.pop(node, None)
            joined += 1
        for node in new:
            if node not in answered:
                self.refused[node] = "no answer to the discovery query (federation.round_timeout_s)"
        if notices:
            self._tell(grid, notices)
        return joined

    def _admit(self, reply: Message, node: int, connected: set[int]) -> None:
        try:
            check_error(reply)
            info = decode_client_info(reply.content, node_id=node)
        except ProtocolError as err:
            why = f"its answer was refused ({err.code}): {err.reason}"
            raise _Refused(why, tell=False) from None
        cid = info.client_id
        if cid not in self.expected:
            raise _Refused(
                f"client id {clip(cid, 64)!r} is not one of the scenario's "
                f"{_span(self.expected)} (federation.num_clients); check --partition-id"
            )
        if info.header.model_fingerprint != self.fingerprint:
            raise _Refused(
                f"client {cid}: base model {clip(info.header.model_fingerprint, 64)}, the "
                f"coordinator trains {self.fingerprint}: load the same model (and dtype "
                "rounding) on both sides"
            )
        if not 1 <= info.num_examples <= MAX_NUM_EXAMPLES:
            raise _Refused(
                f"client {cid}: reports {info.num_examples} examples, expected "
                f"1..{MAX_NUM_EXAMPLES}"
            )
        if len(info.properties) > MAX_PROPERTIES or any(len(k) > 64 for k in info.properties):
            raise _Refused(
                f"client {cid}: advertises {len(info.properties)} properties, at most "
                f"{MAX_PROPERTIES} with names of at most 64 characters"
            )
        holder = self.clients.get(cid)
        if holder is not None and holder.node_id != node and holder.node_id in connected:
            raise _Refused(
                f"client {cid}: node {holder.node_id} joined earlier with the same client id "
                "and is still connected; give each node its own --partition-id"
            )
        if holder is not None:
            log.warning(
                "fedpeft: client %s is back as node %d (node %d is gone)", cid, node, holder.node_id
            )
        self.clients[cid] = ClientInfo(
            header=info.header,
            node_id=node,
            device=clip(info.device, 64),
            properties=info.properties,
        )

    def probe(self, grid: Grid, cids: Iterable[str], timeout: float) -> tuple[dict[str, str], int]:
        """Ask the nodes of ``cids`` who they are, waiting at most ``timeout`` seconds.

        Returns the client ids that did not answer as themselves, each with why, and the
        bytes the probes cost (both ways).
        """
        msgs = {
            cid: Message(encode_query(self.run_id), self.clients[cid].node_id, "query.info")
            for cid in sorted(cids)
        }
        if not msgs:
            return {}, 0
        nbytes = sum(message_nbytes(m) for m in msgs.values())
        bounds = {m.metadata.dst_node_id: MAX_INFO_BYTES for m in msgs.values()}
        replies = send_bounded(grid, list(msgs.values()), bounds, timeout)
        by_message = {m.metadata.message_id: cid for cid, m in msgs.items()}
        why = {cid: f"no answer to a probe within {timeout:g} s" for cid in msgs}
        for reply in replies:
            nbytes += message_nbytes(reply)
            cid = by_message.get(reply.metadata.reply_to_message_id)
            if cid is None:
                continue
            try:
                check_error(reply)
                info = decode_client_info(reply.content, node_id=reply.metadata.src_node_id)
            except ProtocolError as err:
                why[cid] = f"its answer to a probe was refused ({err.code}): {err.reason}"
                continue
            if info.client_id == cid:
                del why[cid]
        return why, nbytes

    def _tell(self, grid: Grid, notices: dict[int, str]) -> None:
        """Tell refused nodes why (their logs show it); a node that does not listen is fine."""
        msgs = [
            Message(encode_refusal(self.run_id, reason), node, "query.refused")
            for node, reason in sorted(notices.items())
        ]
        self.bytes_down += sum(message_nbytes(m) for m in msgs)
        bounds = dict.fromkeys(notices, MAX_INFO_BYTES)
        for reply in send_bounded(grid, msgs, bounds, NOTICE_TIMEOUT_S):
            self.bytes_up += message_nbytes(reply)


class _Refused(Exception):
    def __init__(self, reason: str, tell: bool = True) -> None:
        super().__init__(reason)
        self.reason = clip(reason)
        self.tell = tell


def _span(ids: tuple[str, ...]) -> str:
    return f"{ids[0]}..{ids[-1]}" if len(ids) > 1 else repr(ids[0])
