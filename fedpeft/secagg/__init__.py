"""Secure aggregation (SecAgg, SecAgg+) on ``cryptography``: docs/secure-aggregation.md."""

from fedpeft.secagg.client import SecAggAbort, SecAggClient
from fedpeft.secagg.params import Encoding, default_degree, default_threshold, harary_graph
from fedpeft.secagg.server import SecAggServer, SecAggSum

__all__ = [
    "Encoding",
    "SecAggAbort",
    "SecAggClient",
    "SecAggServer",
    "SecAggSum",
    "default_degree",
    "default_threshold",
    "harary_graph",
]
