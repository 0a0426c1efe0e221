"""The coordinator's checkpoint: its whole state in one file, replaced atomically every round.

A checkpoint is one safetensors file. Its tensors are every tensor and numpy array of the
state; its metadata ``state`` entry is the rest of the state as JSON, where each tensor is a
reference to its entry. Nothing is pickled, so a checkpoint from elsewhere cannot run code.
Python types that JSON would blur are kept exactly: tuples, dicts with non-string keys, numpy
arrays (restored as numpy, with their dtype), bytes and floats (``repr`` round-trips; NaN and
infinities included).

:func:`save_checkpoint` writes ``<path>.tmp``, flushes it to disk, renames it over ``path``
and flushes the folder, so a crash at any moment leaves either the previous checkpoint or the
new one, never a half-written file.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft.algorithms.base import AggregateResult, ZoGlobal, adapter_from_state, adapter_state
from fedpeft.errors import FedpeftError
from fedpeft.wire.messages import LoraSpec
from fedpeft.wire.zo import ZoSpec

__all__ = [
    "CHECKPOINT",
    "CheckpointError",
    "load_checkpoint",
    "result_from_state",
    "result_state",
    "save_checkpoint",
]

CHECKPOINT = "checkpoint.safetensors"
FORMAT = 1


class CheckpointError(FedpeftError):
    """A checkpoint is missing, unreadable or belongs to another run."""


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _store(self, tensor: torch.Tensor) -> str:
        key = f"t{len(self.tensors)}"
        self.tensors[key] = tensor.detach().cpu().contiguous().clone()
        return key

    def encode(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {"tensor": self._store(value)}
        if isinstance(value, np.ndarray):
            return {"ndarray": self._store(torch.from_numpy(np.ascontiguousarray(value)))}
        if isinstance(value, np.generic):
            return self.encode(value.item())
        if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
            return value
        if isinstance(value, float):
            return {"float": repr(value)}
        if isinstance(value, bytes):
            return {"bytes": base64.b64encode(value).decode("ascii")}
        if isinstance(value, tuple):
            return {"tuple": [self.encode(v) for v in value]}
        if isinstance(value, list):
            return [self.encode(v) for v in value]
        if isinstance(value, Mapping):
            return {"dict": [[self.encode(k), self.encode(v)] for k, v in value.items()]}
        raise CheckpointError(
            f"cannot checkpoint a {type(value).__name__} ({value!r:.80}); state_dict() must "
            "hold only tensors, numpy arrays, numbers, strings, bytes, None, lists, tuples, dicts"
        )


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    (kind, body), *rest = value.items()
    if rest:
        raise CheckpointError(f"malformed checkpoint entry {value!r:.80}")
    if kind == "tensor":
        return tensors[body].clone()
    if kind == "ndarray":
        return tensors[body].numpy().copy()
    if kind == "float":
        return float(body)
    if kind == "bytes":
        return base64.b64decode(body, validate=True)
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in body)
    if kind == "dict":
        return {_freeze(_decode(k, tensors)): _decode(v, tensors) for k, v in body}
    raise CheckpointError(f"unknown checkpoint entry kind {kind!r}")


def _freeze(key: Any) -> Any:
    return tuple(_freeze(k) for k in key) if isinstance(key, (list, tuple)) else key


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Atomically replace ``path`` with ``state`` (see the module docstring)."""
    from safetensors.torch import save

    enc = _Encoder()
    tree = json.dumps({"format": FORMAT, "state": enc.encode(state)}, allow_nan=True)
    data = save(enc.tensors, metadata={"fedpeft": tree})
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves the previous checkpoint, no debris
        raise
    _fsync_dir(path.parent)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state :func:`save_checkpoint` wrote to ``path``.

    Raises
    ------
    CheckpointError
        If there is no checkpoint at ``path`` or it cannot be read.
    """
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {str(path)!r}: the run never completed round 0 there, or the "
            "folder is not a fedpeft run folder"
        )
    from safetensors import SafetensorError

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        tree = json.loads(meta["fedpeft"])
        ours = isinstance(tree, dict) and tree.get("format") == FORMAT
        state = _decode(tree["state"], tensors) if ours else None
    except (CheckpointError, OSError, KeyError, ValueError, TypeError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable: {err}") from err
    if not ours:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not in format {FORMAT}, the one this fedpeft reads"
        )
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds no state")
    return state


def result_state(result: AggregateResult) -> dict[str, Any]:
    """A global model as checkpointable state."""
    zo = result.zo
    return {
        "adapter": adapter_state(result.adapter) if result.adapter is not None else None,
        "spec": dataclasses.asdict(result.spec) if result.spec is not None else None,
        "metrics": dict(result.metrics),
        "zo": None
        if zo is None
        else {"spec": dataclasses.asdict(zo.spec), "version": zo.version, "coeffs": zo.coeffs},
    }


def result_from_state(state: Mapping[str, Any]) -> AggregateResult:
    """Inverse of :func:`result_state`."""
    zo = state["zo"]
    if zo is not None:
        spec = dict(zo["spec"])
        spec["lora"] = LoraSpec(**spec["lora"]) if spec["lora"] is not None else None
        glob = ZoGlobal(ZoSpec(**spec), int(zo["version"]), zo["coeffs"])
        return AggregateResult(zo=glob, metrics=state["metrics"])
    return AggregateResult(
        adapter=adapter_from_state(state["adapter"]),
        spec=LoraSpec(**state["spec"]),
        metrics=state["metrics"],
    )
