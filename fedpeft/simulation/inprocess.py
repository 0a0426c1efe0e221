"""A Flower ``Grid`` that runs virtual clients in this process, one message at a time.

Flower's own simulation engine needs Ray, starts worker processes and loads a model in each
(Flower 1.41 has no in-process backend; its Ray-free ``SimpleBackend`` PR #3989 is open).
:class:`InProcessGrid` implements the public ``Grid`` interface by calling the ``ClientApp``
directly, so the same ``ServerApp`` and ``ClientApp`` run unchanged, every virtual client
shares the process's one base model, and runs are deterministic.

With ``serialize=True`` (the default) every instruction and reply is encoded to Flower's wire
objects and decoded again, as a real network would, so a payload that would not survive
deployment fails here too; the bytes of each reply are counted as they are made
(:meth:`InProcessGrid.carried_nbytes`), not serialized a second time to count them. A
``ClientApp`` exception becomes an error reply, as in Flower's runtimes. Each node keeps its
own ``Context`` (``state`` persists across rounds), made when the node first gets a message:
a population of a million nodes costs nothing up front (:class:`PartitionConfigs` gives
their configs on demand), and :meth:`InProcessGrid.node_of` addresses a client id's node
without asking, so the coordinator can ask only the clients it samples who they are
(``federation.discovery = "sampled"``).
"""

from __future__ import annotations

import traceback
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, overload

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedpeft._flwr import (
    SERVER_NODE_ID,
    WireCache,
    make_run,
    roundtrip,
    roundtrip_counted,
    set_message_id,
    set_task_identity,
)
from fedpeft.simulation.node_records import load_node_state, node_state_dict

__all__ = ["InProcessGrid", "PartitionConfigs"]

FIRST_NODE_ID = 10_001
CLIENT_APP_RAISED_EXCEPTION = 2  # flwr.common.constant.ErrorCode in flwr 1.41


class PartitionConfigs(Sequence[Mapping[str, int]]):
    """``{"partition-id": i, "num-partitions": n}`` of node ``i`` of ``n``, made when asked."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, i: int) -> Mapping[str, int]: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Mapping[str, int]]: ...
    def __getitem__(self, i: int | slice) -> Mapping[str, int] | Sequence[Mapping[str, int]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(f"node {i} of {self.n}")
        return {"partition-id": i % self.n, "num-partitions": self.n}


class InProcessGrid(Grid):
    """Calls ``client_app`` for each pushed message, in push order, in this process.

    Parameters
    ----------
    client_app : ClientApp
        The app every virtual node runs.
    node_configs : Sequence[Mapping[str, int | float | str | bool]]
        One node config per virtual node (``partition-id``, ``num-partitions``, ...); read
        when the node first gets a message.
    run_id : int
        Flower run id (messages carry it).
    serialize : bool
        Round-trip every message through Flower's wire encoding.
    on_reply : Callable[[int, Message], None] | None
        Called after each reply, with the node id (progress reporting).
    """

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Sequence[Mapping[str, int | float | str | bool]],
        run_id: int = 1,
        serialize: bool = True,
        on_reply: Callable[[int, Message], None] | None = None,
    ) -> None:
        self._app = client_app
        self._serialize = serialize
        self._on_reply = on_reply
        self._run = make_run(run_id)
        self._run_id = run_id
        self._configs = node_configs
        self._contexts: dict[int, Context] = {}  # the nodes that got a message, by node id
        self._replies: dict[str, Message] = {}
        self._wire = WireCache()  # records repeated across messages are serialized once
        # the bytes of each reply this grid serialized, until the reply is dropped
        self._carried: weakref.WeakKeyDictionary[Message, int] = weakref.WeakKeyDictionary()
        set_task_identity(run_id, SERVER_NODE_ID)

    def set_run(self, run: object) -> None:
        """Replace the run record (Flower's interface)."""
        self._run = run  # type: ignore[assignment]

    @property
    def run(self):  # type: ignore[no-untyped-def]  # flwr.supercore.run.Run
        """The run this grid serves."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Build an instruction message (prefer the ``Message`` constructor)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Ids of the virtual nodes."""
        return range(FIRST_NODE_ID, FIRST_NODE_ID + len(self._configs))

    def node_of(self, client_id: str) -> int | None:
        """The node of the client whose ``partition-id`` is ``client_id`` (``None``: none)."""
        if not client_id.isdecimal() or str(int(client_id)) != client_id:
            return None
        i = int(client_id)
        if i >= len(self._configs) or self._configs[i].get("partition-id") != i:
            return None
        return FIRST_NODE_ID + i

    def context(self, node_id: int) -> Context:
        """A node's context, made when first asked for."""
        ctx = self._contexts.get(node_id)
        if ctx is None:
            if not self._exists(node_id):
                raise KeyError(f"node {node_id} does not exist")
            ctx = Context(
                run_id=self._run_id,
                node_id=node_id,
                node_config=dict(self._configs[node_id - FIRST_NODE_ID]),
                state=RecordDict(),
                run_config={},
            )
            self._contexts[node_id] = ctx
        return ctx

    def _exists(self, node_id: int) -> bool:
        return 0 <= node_id - FIRST_NODE_ID < len(self._configs)

    @property
    def started(self) -> int:
        """How many nodes have a context (got a message)."""
        return len(self._contexts)

    def state_dict(self) -> dict[str, Any]:
        """Every virtual node's ``Context.state`` (a device's own storage), checkpointable.

        A simulated device's state would survive a coordinator crash on its own disk; in a
        simulation the nodes die with the coordinator, so the checkpoint keeps it for them.
        """
        return {str(n): node_state_dict(c.state) for n, c in sorted(self._contexts.items())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` into the nodes of the same ids (the others start empty)."""
        self._contexts = {}
        for n, saved in state.items():
            self.context(int(n)).state = load_node_state(saved)

    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        incoming = roundtrip(msg, self._wire) if self._serialize else msg
        try:
            reply = self._app(incoming, self.context(node))
        except Exception as ex:  # reported to the coordinator as this client's failure
            reason = f"{type(ex).__name__}: {ex}"
            if not isinstance(ex, ValueError):
                reason += "\n" + traceback.format_exc(limit=-3)
            reply = Message(
                Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=incoming
            )
        set_message_id(reply)
        if not self._serialize:
            return reply
        copy, nbytes = roundtrip_counted(reply, self._wire)
        self._carried[copy] = nbytes
        return copy

    def carried_nbytes(self, message: Message) -> int | None:
        """The bytes of a reply this grid serialized and handed over (``None``: another
        message, or ``serialize=False``): the coordinator need not count them again."""
        return self._carried.get(message)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now; replies wait in this grid until pulled."""
        ids: list[str] = []
        for msg in messages:
            mid = set_message_id(msg)
            if not self._exists(msg.metadata.dst_node_id):
                reply = Message(
                    Error(code=5, reason=f"node {msg.metadata.dst_node_id} does not exist"),
                    reply_to=msg,
                )
                set_message_id(reply)
            else:
                reply = self._deliver(msg)
            self._replies[mid] = reply
            ids.append(mid)
            if self._on_reply is not None:
                self._on_reply(msg.metadata.dst_node_id, reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Hand over (and forget) the replies to the given message ids."""
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver messages and return their replies (calls are synchronous: no timeout)."""
        return self.pull_messages(self.push_messages(messages))
