"""Update families (LoRA factors, seed/scalar pairs): see :mod:`fedpeft.families.base`."""

from __future__ import annotations

from typing import Any

from fedpeft.errors import ProtocolError
from fedpeft.families.base import FlatLayout, Stamp, UpdateFamily
from fedpeft.families.lora import LORA
from fedpeft.families.zo import ZO
from fedpeft.server.validate import MB, Limits

__all__ = ["FAMILIES", "FlatLayout", "Stamp", "UpdateFamily", "family_of", "reply_limit"]

FAMILIES: dict[str, UpdateFamily] = {LORA.name: LORA, ZO.name: ZO}


def family_of(thing: Any) -> UpdateFamily:
    """The family of a plan, instruction or update (its ``family`` class attribute)."""
    name = getattr(type(thing), "family", None)
    if name not in FAMILIES:
        raise ProtocolError(
            f"{type(thing).__name__} belongs to no update family (expected a LoRA or "
            f"seed/scalar plan, instruction or update; families: {sorted(FAMILIES)})"
        )
    return FAMILIES[name]


def reply_limit(ins: Any, limits: Limits) -> int:
    """Largest reply in bytes accepted for ``ins``: ``validation.max_reply_mb``, else its
    family's automatic bound."""
    if limits.rules.max_reply_mb > 0:
        return int(limits.rules.max_reply_mb * MB)
    return family_of(ins).auto_reply_limit(ins, limits)
