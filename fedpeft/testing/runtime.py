"""Test doubles for code that talks to Flower's deployed runtime, without a SuperLink.

:class:`RecordedRuntime` answers the Runtime API calls the coordinator's grid makes to pull
replies (``PullMessages``, ``PullObject``, ``ConfirmMessageReceived``) from replies held in
memory, encoded exactly as a SuperLink stores them (Flower's content-addressed object tree);
:func:`http_grid_on` gives Flower's own deployed ``HttpGrid`` connected to it. The tests and
``benchmarks/faults.py`` use them to pull a reply the way the deployed coordinator does.
Checked against flwr 1.41. :func:`free_port` picks ports for servers that tests and
benchmarks start in other processes.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

__all__ = ["RecordedRuntime", "free_port", "http_grid_on"]

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range (no process that binds port 0, such
    as a node's tunnel, can take it before its use) and not handed out before by this process.

    The server binds it later: a caller that can see the bind fail retries with another port.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        candidate = random.randrange(10_000, low)
        if candidate in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
        _HANDED_OUT.add(candidate)
        return candidate


class RecordedRuntime:
    """A SuperLink's Runtime API serving ``replies``; counts the object bytes it hands out."""

    def __init__(self, *replies: Message) -> None:
        from flwr.app.message import remove_content_from_message
        from flwr.common.serde import message_to_proto
        from flwr.supercore.inflatable.inflatable_object import (
            get_all_nested_objects,
            get_object_tree,
        )

        self.objects: dict[str, bytes] = {}
        self.messages: list[tuple[Any, Any]] = []
        for reply in replies:
            nested = get_all_nested_objects(reply)
            self.objects.update({i: o.deflate() for i, o in nested.items()})
            proto = message_to_proto(remove_content_from_message(reply))
            self.messages.append((proto, get_object_tree(reply)))
        self.pulled = 0
        self.confirmed: list[str] = []

    def PullMessages(self, request: Any) -> Any:  # noqa: N802 (Flower's method names)
        """Every recorded reply, with its object tree."""
        from flwr.proto.runtime_pb2 import PullAppMessagesResponse  # pylint: disable=E0611

        protos, trees = zip(*self.messages, strict=True) if self.messages else ((), ())
        return PullAppMessagesResponse(messages_list=protos, message_object_trees=trees)

    def PullObject(self, request: Any) -> Any:  # noqa: N802
        """One object's bytes."""
        from flwr.proto.message_pb2 import PullObjectResponse  # pylint: disable=E0611

        data = self.objects[request.object_id]
        self.pulled += len(data)
        return PullObjectResponse(object_found=True, object_available=True, object_content=data)

    def ConfirmMessageReceived(self, request: Any) -> Any:  # noqa: N802
        """Note that the coordinator is done with a reply."""
        self.confirmed.append(request.message_object_id)


def http_grid_on(runtime: RecordedRuntime, run_id: int = 7) -> Grid:
    """Flower's deployed ``HttpGrid``, connected to ``runtime`` instead of a SuperLink."""
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.superlink.grid.http_grid import HttpGrid

    from fedpeft._flwr import make_run

    grid = HttpGrid.__new__(HttpGrid)
    grid._client = runtime  # type: ignore[assignment]  # what its _runtime_client returns
    grid.node = Node(node_id=1)
    grid._run = make_run(run_id)
    return grid
