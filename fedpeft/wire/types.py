"""The small value types of LoRA messages and the typed field access every decoder uses."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import RecordDict

from fedpeft.errors import ProtocolError

__all__ = [
    "Adapter",
    "LoraFactors",
    "LoraSpec",
    "get_field",
    "get_flag",
    "get_float",
    "get_record",
    "get_text",
]


@dataclass(frozen=True, slots=True)
class LoraFactors:
    """One adapted linear layer: ``delta_W = (alpha / r) * B @ A``.

    Attributes
    ----------
    a : torch.Tensor
        ``(r, in_features)``.
    b : torch.Tensor
        ``(out_features, r)``.
    alpha : float
        LoRA alpha; the scale is ``alpha / r``.
    """

    a: torch.Tensor
    b: torch.Tensor
    alpha: float

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() != 2:
            raise ProtocolError(
                f"LoRA factors must be 2-D, got A{tuple(self.a.shape)} and B{tuple(self.b.shape)}"
            )
        if self.a.shape[0] != self.b.shape[1]:
            raise ProtocolError(
                f"LoRA rank mismatch: A is {tuple(self.a.shape)} (r, in) but B is "
                f"{tuple(self.b.shape)} (out, r)"
            )
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ProtocolError(f"LoRA alpha must be finite and > 0, got {self.alpha}")

    @property
    def rank(self) -> int:
        """The rank r."""
        return int(self.a.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / r``."""
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The dense update in float32: ``(alpha/r) * (out, r) @ (r, in) -> (out, in)``."""
        return self.scale * (self.b.float() @ self.a.float())


Adapter = Mapping[str, LoraFactors]  # module name -> factors


@dataclass(frozen=True, slots=True)
class LoraSpec:
    """The structure of an adapter: what a client must build to train it."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    dropout: float = 0.0

    def config_hash(self) -> str:
        """Hash of the structural fields (rank, alpha, targets); dropout is excluded."""
        blob = json.dumps(
            {"rank": self.rank, "alpha": float(self.alpha), "targets": sorted(self.target_modules)},
            sort_keys=True,
        )
        return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


def get_field(rec: Mapping[str, Any], key: str, tp: type[Any], where: str) -> Any:
    if key not in rec:
        raise ProtocolError(f"{where} has no field {key!r}")
    value = rec[key]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ProtocolError(f"{where}.{key} must be {tp.__name__}, got {value!r}")
    return value


def get_flag(rec: Mapping[str, Any], key: str, where: str) -> bool:
    """An optional bool field (``False`` when absent: older senders did not write it)."""
    return bool(get_field(rec, key, bool, where)) if key in rec else False


def get_text(rec: Mapping[str, Any], key: str, where: str) -> str:
    """An optional str field (``""`` when absent: older senders did not write it)."""
    return str(get_field(rec, key, str, where)) if key in rec else ""


def get_float(rec: Mapping[str, Any], key: str, where: str) -> float:
    """An optional non-negative finite float field (0 when absent)."""
    if key not in rec:
        return 0.0
    value = float(get_field(rec, key, float, where))
    if not (value >= 0 and math.isfinite(value)):
        raise ProtocolError(f"{where}.{key} must be a finite float >= 0, got {value!r}")
    return value


def get_record(content: RecordDict, name: str, tp: type[Any]) -> Any:
    if name not in content:
        raise ProtocolError(f"message has no {name!r} record (records: {sorted(content)})")
    rec = content[name]
    if not isinstance(rec, tp):
        raise ProtocolError(f"record {name!r} must be a {tp.__name__}, got {type(rec).__name__}")
    return rec
