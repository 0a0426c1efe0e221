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

The expected ids are a :class:`ClientIds` range, not a list, so a population of millions
costs nothing. With ``federation.discovery = "sampled"`` the coordinator asks only the clients
it samples, when first sampled (:meth:`Roster.ask_clients`), on a transport that addresses
a client id's node without asking (the in-process grid); "missing" then means a client that
was asked and did not join.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from flwr.app import Message
from flwr.serverapp import Grid

from fedpeft._flwr import message_nbytes, node_of, send_bounded
from fedpeft.errors import ProtocolError, clip
from fedpeft.models import fingerprint_mismatch
from fedpeft.server.exchange import check_error
from fedpeft.server.validate import MAX_NUM_EXAMPLES
from fedpeft.wire.messages import ClientInfo, decode_client_info, encode_query, encode_refusal

__all__ = ["MAX_PROPERTIES", "NOTICE_TIMEOUT_S", "ClientIds", "Roster"]

log = logging.getLogger(__name__)
K = TypeVar("K", int, str)

MAX_PROPERTIES = 32  # a node advertises a few capabilities, not a payload
MAX_INFO_BYTES = 1_000_000  # an answer to a query is a few hundred bytes
NOTICE_TIMEOUT_S = 10.0  # how long a refusal notice may take to be acknowledged


class ClientIds(Sequence[str]):
    """The client ids ``"0" .. str(n - 1)`` in numeric order, without a list of them."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __contains__(self, cid: object) -> bool:
        return (
            isinstance(cid, str) and cid.isdecimal() and str(int(cid)) == cid and int(cid) < self.n
        )

    def __iter__(self) -> Iterator[str]:
        return (str(i) for i in range(self.n))

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...
    def __getitem__(self, i: int | slice) -> str | Sequence[str]:
        if isinstance(i, slice):
            return [str(j) for j in range(self.n)[i]]
        return str(range(self.n)[i])


@dataclass
class Roster:
    """The expected client ids, the nodes that hold them, and the nodes left out.

    Parameters
    ----------
    expected : Sequence[str]
        Client ids the scenario expects (a :class:`ClientIds` range).
    run_id : str
        Stamped on the queries.
    fingerprint : str
        The coordinator's base-model fingerprint.
    quantizations : tuple[str, ...]
        Other quantizations of the same weights a node may load (``model.node_quantizations``).
    on_demand : bool
        Only the client ids asked for (:meth:`ask_clients`) are wanted, not every expected one.
    """

    expected: Sequence[str]
    run_id: str
    fingerprint: str
    quantizations: tuple[str, ...] = ()
    on_demand: bool = False
    clients: dict[str, ClientInfo] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)
    asked: set[int] = field(default_factory=set)
    wanted: set[str] = field(default_factory=set)  # on demand: the client ids asked for
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
            cid = reason.split(":", 1)[0].removeprefix("client ")
            if reason.startswith("client ") and cid in self.expected:
                claims.setdefault(cid, []).append(f"node {node} was refused")
        wanted = sorted(self.wanted, key=int) if self.on_demand else self.expected
        return {
            cid: "; ".join(claims.get(cid, ["no node claimed it"]))
            for cid in wanted
            if cid not in self.clients
        }

    def report(self) -> dict[str, Any]:
        """What ``summary.json`` and the first row say about who joined."""
        return {
            "expected": len(self.expected),
            **({"discovery": "sampled", "asked": len(self.wanted)} if self.on_demand else {}),
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
        replies, down, up = self._query(grid, {node: node for node in new}, timeout)
        self.bytes_down += down
        self.bytes_up += up
        answered: set[int] = set()
        notices: dict[int, str] = {}
        joined = 0
        for node, reply in replies:  # in arrival order: the first node to claim an id keeps it
            if node in answered:
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

    def ask_clients(self, grid: Grid, cids: Iterable[str], timeout: float) -> dict[str, str]:
        """Ask the nodes of ``cids`` that have not joined who they are, addressing each
        through the grid (:func:`fedpeft._flwr.node_of`); returns the client ids among
        ``cids`` that are not admitted, each with why (a node that answers as another client
        than the one it was addressed as is refused)."""
        cids = list(cids)
        self.wanted.update(cids)
        nodes: dict[str, int] = {}
        for cid in cids:
            if cid in self.clients:
                continue
            node = node_of(grid, cid)
            if node is None:
                raise ProtocolError(
                    f"the grid has no node for client id {clip(cid, 64)!r} (federation.discovery"
                    " = 'sampled' needs a transport that addresses clients by id)"
                )
            nodes[cid] = node
        addressed = {node: cid for cid, node in nodes.items()}
        self.ask(grid, addressed, set(addressed), timeout)
        for cid, info in list(self.clients.items()):
            meant = addressed.get(info.node_id, cid)
            if meant != cid:
                del self.clients[cid]
                self.refused[info.node_id] = f"client {cid}: its node is client {meant}'s"
        why: dict[str, str] = {}
        for cid, node in sorted(nodes.items()):
            if cid not in self.clients:
                why[cid] = "did not join: " + self.refused.get(node, "no answer")
        return why

    def _admit(self, reply: Message, node: int, connected: set[int]) -> None:
        try:
            info = _client_info(reply, node)
        except ProtocolError as err:
            why = f"its answer was refused ({err.code}): {err.reason}"
            raise _Refused(why, tell=False) from None
        cid = info.client_id
        if cid not in self.expected:
            raise _Refused(
                f"client id {clip(cid, 64)!r} is not one of the scenario's "
                f"{_span(self.expected)} (federation.num_clients); check --partition-id"
            )
        fp = clip(info.header.model_fingerprint, 64)
        if differ := fingerprint_mismatch(fp, self.fingerprint, self.quantizations):
            raise _Refused(f"client {cid}: {differ}")
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
        targets = {cid: self.clients[cid].node_id for cid in sorted(cids)}
        if not targets:
            return {}, 0
        replies, down, up = self._query(grid, targets, timeout)
        why = {cid: f"no answer to a probe within {timeout:g} s" for cid in targets}
        for cid, reply in replies:
            try:
                info = _client_info(reply, targets[cid])
            except ProtocolError as err:
                why[cid] = f"its answer to a probe was refused ({err.code}): {err.reason}"
                continue
            if info.client_id == cid:
                why.pop(cid, None)
        return why, down + up

    def _query(
        self, grid: Grid, targets: Mapping[K, int], timeout: float
    ) -> tuple[list[tuple[K, Message]], int, int]:
        """Send ``query.info`` to each target's node; the replies that answer one, in arrival
        order and keyed like ``targets``, and the bytes down and up."""
        keys = list(targets)
        msgs = [Message(encode_query(self.run_id), targets[k], "query.info") for k in keys]
        bounds = dict.fromkeys(targets.values(), MAX_INFO_BYTES)
        replies = send_bounded(grid, msgs, bounds, timeout)
        by_message = {m.metadata.message_id: k for k, m in zip(keys, msgs, strict=True)}
        answers = [(by_message[r.metadata.reply_to_message_id], r) for r in replies
                   if r.metadata.reply_to_message_id in by_message]  # fmt: skip
        down = sum(message_nbytes(m) for m in msgs)
        return answers, down, sum(message_nbytes(r) for r in replies)

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


def _client_info(reply: Message, node: int) -> ClientInfo:
    """The ``ClientInfo`` a reply carries (``ProtocolError`` for an error reply or bad bytes)."""
    check_error(reply)
    return decode_client_info(reply.content, node_id=node)


def _span(ids: Sequence[str]) -> str:
    return f"{ids[0]}..{ids[-1]}" if len(ids) > 1 else repr(ids[0])
