"""What every update family provides: one object per family instead of type branches.

An update family is a kind of thing clients send: LoRA factors (:mod:`.lora`) or
seed/scalar pairs (:mod:`.zo`). The coordinator, the exchange and secure aggregation ask the
family of a plan or instruction (its ``family`` class attribute, the same name as
``Capabilities.family``) to build, encode, bound, decode and validate, and to lay the updates
out as one flat vector for secure aggregation; none of them branch on types.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from flwr.app import RecordDict

from fedpeft.config import CompressConfig, TrainConfig
from fedpeft.server.validate import Limits
from fedpeft.wire.messages import Header, SharedRecords

__all__ = ["FlatLayout", "Stamp", "UpdateFamily"]


@dataclass(frozen=True)
class Stamp:
    """What the coordinator adds to every plan to make it an instruction."""

    header: Header
    train: TrainConfig
    seed: int
    compress: CompressConfig
    secure: bool = False
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    strategy: str = ""  # the algorithm's registered name (strategy.name)


@dataclass(frozen=True)
class FlatLayout:
    """A round's updates as one flat vector of ``dim`` values (secure aggregation, streaming).

    ``rebuild(kept, total, denominator)`` turns the sum ``total`` (of the ``kept`` clients'
    weighted vectors) back into the updates the strategy aggregates. ``vector(update)`` is an
    update's vector (float64, what a secure client contributes); ``stub(update)`` is what is
    left of it once its vector is summed: header and metrics, no tensors.
    """

    dim: int
    rebuild: Callable[[list[Any], np.ndarray, float], list[Any]]
    vector: Callable[[Any], np.ndarray]
    stub: Callable[[Any], Any]


class UpdateFamily(Protocol):
    """One update family (see the module docstring)."""

    name: str

    def instruction(self, plan: Any, stamp: Stamp) -> Any:
        """The instruction for one client's ``plan``."""
        ...

    def encode(self, ins: Any, shared: SharedRecords) -> RecordDict:
        """The instruction as Flower records (``shared``: one copy of each broadcast)."""
        ...

    def payload_down(self, ins: Any, content: RecordDict) -> int:
        """Payload bytes of an encoded instruction (besides Flower's framing)."""
        ...

    def auto_reply_limit(self, ins: Any, limits: Limits) -> int:
        """Largest reply in bytes accepted for ``ins`` when ``validation.max_reply_mb`` is 0
        (see :func:`fedpeft.families.reply_limit`)."""
        ...

    def decode(self, content: RecordDict, ins: Any, limits: Limits) -> tuple[Any, int]:
        """Decode and validate a reply against ``ins``; returns (update, payload bytes)."""
        ...

    def choices(self, ins: Any) -> dict[str, float]:
        """What the round's row reports about this client's instruction (rank, prune ratio)."""
        ...

    def flat(
        self,
        instructions: Mapping[str, Any],
        cids: Sequence[str],
        zo_blocks: int,
        scalar_clip: float = 0.0,
    ) -> FlatLayout:
        """How the updates of clients ``cids`` are summed as one vector (``scalar_clip``:
        seed/scalar updates' scalars are clipped to it first, when above 0)."""
        ...
