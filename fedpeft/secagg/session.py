"""Drive one secure-aggregation session over any transport.

:func:`run_session` takes a ``send`` callable that delivers one stage's requests (client index
-> request dict) and returns the replies that came back (client index -> reply dict; a client
that dropped or refused is simply missing). The in-process tests pass a function that calls
:class:`~fedpeft.secagg.client.SecAggClient` objects directly; :mod:`fedpeft.secagg.flower`
sends Flower messages over a ``Grid``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from fedpeft.secagg.server import SecAggServer, SecAggSum

__all__ = ["Send", "run_session"]

Send = Callable[[str, Mapping[int, dict[str, Any]]], dict[int, Any]]


def run_session(server: SecAggServer, send: Send) -> SecAggSum:
    """Run the four stages; returns the sum, with each stage's dropouts and seconds.

    Raises
    ------
    ProtocolError
        If a secret cannot be recovered or too few clients survive.
    """
    timings: dict[str, float] = {}
    dropped: dict[str, list[int]] = {}

    def stage(name: str, requests: Mapping[int, dict[str, Any]]) -> dict[int, Any]:
        t0 = time.perf_counter()
        replies = send(name, requests)
        timings[name] = time.perf_counter() - t0
        dropped[name] = sorted(set(requests) - set(replies))
        return replies

    replies = stage("keys", server.keys_requests())
    replies = stage("share", server.share_requests(replies))
    replies = stage("mask", server.mask_requests(replies))
    replies = stage("unmask", server.unmask_requests(replies))
    t0 = time.perf_counter()
    result = server.finish(replies)
    timings["finish"] = time.perf_counter() - t0
    result.dropped = dropped
    result.timings = timings
    return result
