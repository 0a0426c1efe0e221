"""The pruning part of LoRA messages (FedSpine): what to prune to, and what a client kept.

An instruction carries a :class:`PrunePlan` in the ``fedpeft.prune`` ConfigRecord: the
unpruned model's layout (so both sides agree on what a bit means), the target ratio, the
structure the client starts from (bitmask, empty for the whole model), the stage schedule
and the protected layers. Its adapter is already cut to the starting structure. The update
answers with the structure it ended at (``keep``); its factors have that structure's shapes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from flwr.app import ConfigRecord, RecordDict

from fedpeft.errors import ProtocolError
from fedpeft.prune.layout import PruneLayout
from fedpeft.prune.structure import Keep
from fedpeft.wire.types import get_field, get_record

__all__ = ["PRUNE", "PrunePlan", "decode_keep", "decode_plan", "encode_keep", "encode_plan"]

PRUNE: Final = "fedpeft.prune"


@dataclass(frozen=True)
class PrunePlan:
    """What one client prunes this round (see the module docstring)."""

    layout: PruneLayout
    ratio: float
    keep: bytes = b""  # starting structure; b"" = the whole model
    stages: int = 1
    warmup_steps: int = 2
    protect: tuple[int, ...] = ()
    measure: bool = True  # report probe losses (what a bandit's reward needs)

    def __post_init__(self) -> None:
        n = len(self.layout.layers)
        problems = []
        if not (math.isfinite(self.ratio) and 0 <= self.ratio < 1):
            problems.append(f"ratio must be in [0, 1), got {self.ratio}")
        if self.stages < 1 or self.warmup_steps < 0:
            problems.append(
                f"stages must be >= 1 and warmup_steps >= 0, got {self.stages}, {self.warmup_steps}"
            )
        if any(not 0 <= i < n for i in self.protect):
            problems.append(f"protect lists layers outside 0..{n - 1}: {list(self.protect)}")
        if problems:
            raise ProtocolError("prune plan: " + "; ".join(problems))

    def start(self) -> list[Keep]:
        """The structure the client starts from."""
        return self.layout.decode(self.keep) if self.keep else self.layout.full()


def encode_plan(plan: PrunePlan) -> ConfigRecord:
    """The ``fedpeft.prune`` record of an instruction."""
    return ConfigRecord(
        {
            "layout": json.dumps(plan.layout.to_json()),
            "ratio": float(plan.ratio),
            "keep": plan.keep,
            "stages": plan.stages,
            "warmup_steps": plan.warmup_steps,
            "protect": json.dumps(list(plan.protect)),
            "measure": plan.measure,
        }
    )


def _json(rec: Mapping[str, Any], key: str) -> Any:
    try:
        return json.loads(get_field(rec, key, str, PRUNE))
    except json.JSONDecodeError as err:
        raise ProtocolError(f"{PRUNE}.{key} is not JSON: {err}") from None


def decode_plan(content: RecordDict) -> PrunePlan | None:
    """The instruction's plan, or ``None`` when it has no ``fedpeft.prune`` record."""
    if PRUNE not in content:
        return None
    rec = get_record(content, PRUNE, ConfigRecord)
    protect = _json(rec, "protect")
    if not isinstance(protect, list) or not all(isinstance(i, int) for i in protect):
        raise ProtocolError(f"{PRUNE}.protect must be a list of layer indices, got {protect!r}")
    plan = PrunePlan(
        layout=PruneLayout.from_json(_json(rec, "layout")),
        ratio=get_field(rec, "ratio", float, PRUNE),
        keep=get_field(rec, "keep", bytes, PRUNE),
        stages=get_field(rec, "stages", int, PRUNE),
        warmup_steps=get_field(rec, "warmup_steps", int, PRUNE),
        protect=tuple(protect),
        measure=get_field(rec, "measure", bool, PRUNE),
    )
    plan.start()  # a malformed starting mask fails here, not mid-training
    return plan


def encode_keep(keep: bytes) -> ConfigRecord:
    """The ``fedpeft.prune`` record of an update: the structure it ended at."""
    return ConfigRecord({"keep": keep})


def decode_keep(content: RecordDict) -> bytes | None:
    """An update's kept structure (``None`` when it did not prune)."""
    if PRUNE not in content:
        return None
    return get_field(get_record(content, PRUNE, ConfigRecord), "keep", bytes, PRUNE)  # type: ignore[no-any-return]
