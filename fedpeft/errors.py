"""The one exception hierarchy of fedpeft.

Every error says the value it got, what was expected and, where there is one, what to do.
Callers catch :class:`FedpeftError` to handle anything fedpeft raises on purpose.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = [
    "MAX_REASON",
    "REJECT_CODES",
    "AggregationError",
    "ConfigError",
    "DataError",
    "FedpeftError",
    "ModelError",
    "ProtocolError",
    "RoundError",
    "StrategyError",
    "by_reason",
    "clip",
]

#: Longest reason text kept from a client (rows, checkpoints, logs): what a client sends must
#: not grow what the coordinator writes.
MAX_REASON = 1024


def clip(text: str, limit: int = MAX_REASON) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text)} characters, cut to {limit}]"


def by_reason(failures: Mapping[str, str], what: str = "client") -> str:
    """``failures`` (id -> reason) grouped by reason, each reason once with the ids it hit:
    ``clients 0, 1, 5: <reason>; client 3: <other>`` (ids in sorted order)."""
    groups: dict[str, list[str]] = {}
    for cid in sorted(failures, key=lambda c: (len(c), c)):  # numeric ids in numeric order
        groups.setdefault(failures[cid], []).append(cid)
    return "; ".join(
        f"{what}{'s' if len(ids) > 1 else ''} {', '.join(ids)}: {reason}"
        for reason, ids in groups.items()
    )


class FedpeftError(Exception):
    """Base class of every error fedpeft raises on purpose."""


class ConfigError(FedpeftError, ValueError):
    """A configuration is invalid.

    Parameters
    ----------
    problems : Sequence[str]
        Every problem found; loading a config collects them all before raising once.
    """

    def __init__(self, problems: Sequence[str] | str) -> None:
        self.problems: tuple[str, ...] = (
            (problems,) if isinstance(problems, str) else tuple(problems)
        )
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems in the configuration:\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(text)


#: Typed reasons an update is refused; the round's metrics count them under ``rejected``.
REJECT_CODES: dict[str, str] = {
    "decode": "the bytes do not decode as the expected message",
    "payload_size": "the reply is larger than the limit for its instruction",
    "header": "protocol, run, base-model fingerprint, adapter hash or client id differ",
    "replay": "the update is for another round than the one asked",
    "duplicate": "a second reply to the same instruction",
    "structure": "modules, shapes, rank, alpha or pruned structure differ from the instruction",
    "frozen": "a factor the instruction froze came back changed",
    "dtype": "a tensor is not floating point",
    "nonfinite": "NaN or infinite values",
    "norm": "the update's norm is above validation.max_update_norm",
    "num_examples": "num_examples outside 1..what the client reported at discovery",
    "seed_range": "a zeroth-order seed or block index outside the pool, or a repeated pair",
    "client_error": "the client answered with an error",
    "timeout": "no reply before the round timeout",
    "unavailable": "the node is offline (Flower: no heartbeat) or did not answer a probe after "
    "an earlier timeout",
    "deadline": "the simulated device missed devices.deadline_s",
    "memory": "the update's measured peak memory is above its simulated device's budget",
}


class ProtocolError(FedpeftError, ValueError):
    """A message could not be decoded or does not match what was expected of it.

    Parameters
    ----------
    reason : str
        What is wrong with the message, naming the offending field and value.
    code : str
        One of :data:`REJECT_CODES` (``decode`` unless the check knows better).

    The reason is kept to :data:`MAX_REASON` characters: it often quotes what a client sent.
    """

    def __init__(self, reason: str, code: str = "decode") -> None:
        if code not in REJECT_CODES:
            raise ValueError(f"unknown rejection code {code!r}; known: {sorted(REJECT_CODES)}")
        reason = clip(reason)
        self.reason = reason
        self.code = code
        super().__init__(reason)


class AggregationError(FedpeftError):
    """A strategy cannot combine the updates it was given.

    Parameters
    ----------
    reason : str
        Why, naming the client and the field, and which strategy would work instead.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class StrategyError(FedpeftError, ValueError):
    """A strategy could not be registered, found or built."""


class DataError(FedpeftError, ValueError):
    """A dataset could not be loaded, templated or partitioned."""


class ModelError(FedpeftError, RuntimeError):
    """A base model or adapter could not be loaded or does not fit the configuration."""


class RoundError(FedpeftError, RuntimeError):
    """A federated round could not complete (too few valid updates, every client failed).

    Parameters
    ----------
    server_round : int
        The round that failed.
    reason : str
        Why it failed, including the per-client reasons.
    """

    def __init__(self, server_round: int, reason: str) -> None:
        self.server_round = server_round
        self.reason = reason
        super().__init__(f"round {server_round} failed: {reason}")
