"""Lossy codecs for LoRA tensors on the wire, each with a documented error bound.

A codec turns one float tensor into a few numpy arrays (what travels) and back into float32.
Bytes are counted after encoding (the arrays are what Flower serializes).

=========  ==================================================  ===================================
codec      what travels                                        error of ``decode(encode(x))``
=========  ==================================================  ===================================
none       the tensor itself, original dtype                   0 (bit-exact)
fp16       float16 values                                      ``|e| <= 2^-11 |x|`` for
                                                               ``2^-14 <= |x| <= 65504``,
                                                               ``|e| <= 2^-25`` below; larger
                                                               values are refused
int8       int8 values + one float32 scale per row             ``|e| <= max|row| / 254`` per row
           (``scale = max|row| / 127``)                        (half a quantisation step)
topk       the ``k = ceil(ratio n)`` largest ``|x|``: uint32   kept entries exact, the others
           indices + float32 values                            become 0
compeft    ComPEFT (Yadav et al. 2023, arXiv:2311.13171):      kept: ``sign(x) alpha std(x)``,
           the top-k mask (zeros left out) and the kept        others 0 (sign-exact on the
           signs as packed bits + one float32 scale            kept set)
           ``alpha * std(x)``
=========  ==================================================  ===================================

``topk`` and ``compeft`` pair with :class:`ErrorFeedback` on the sender (Stich et al. 2018,
"Sparsified SGD with memory"): what a round leaves out is added to the next round's update,
so the sum of what was sent tracks the sum of the true updates. ComPEFT's paper does not use
error feedback; here it is on by default for both (``compress.error_feedback``).
Rows are taken along dim 0; adapters pass ``A (r, in)`` and ``B`` transposed, ``(r, out)``, so
int8 keeps one scale per rank component of each factor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from fedpeft.config import CODECS
from fedpeft.errors import ProtocolError

__all__ = ["CODECS", "CodecSpec", "ErrorFeedback", "decode_tensor", "encode_tensor"]

FP16_MAX = 65504.0


@dataclass(frozen=True)
class CodecSpec:
    """A codec and its parameters (``ratio`` for topk/compeft, ``alpha`` for compeft)."""

    name: str = "none"
    ratio: float = 0.1
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ProtocolError(f"unknown codec {self.name!r}; known: {', '.join(CODECS)}")
        if not 0 < self.ratio <= 1:
            raise ProtocolError(f"codec ratio must be in (0, 1], got {self.ratio}")

    @property
    def sparse(self) -> bool:
        """Whether entries are dropped (topk, compeft)."""
        return self.name in ("topk", "compeft")


def _keep(n: int, ratio: float) -> int:
    return max(1, min(n, math.ceil(ratio * n)))


def _topk_indices(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``|x|``, ties broken by position, ascending."""
    order = torch.argsort(flat.abs(), descending=True, stable=True)[:k]
    return torch.sort(order).values


def encode_tensor(t: torch.Tensor, codec: CodecSpec) -> dict[str, np.ndarray]:
    """The arrays that carry ``t`` under ``codec`` (``none`` is handled by the caller).

    Raises
    ------
    ProtocolError
        If ``t`` is not 2-D, or ``fp16`` is asked to carry values beyond its range.
    """
    x = t.detach().float().cpu()
    if x.dim() != 2:
        raise ProtocolError(f"codecs take 2-D tensors, got shape {tuple(x.shape)}")
    if codec.name == "fp16":
        peak = float(x.abs().max()) if x.numel() else 0.0
        if peak > FP16_MAX:
            raise ProtocolError(
                f"cannot encode values up to {peak:.3g} in fp16 (max {FP16_MAX}); use int8 or none"
            )
        return {"v": x.numpy().astype(np.float16)}
    if codec.name == "int8":
        peaks = x.abs().amax(dim=1, keepdim=True) if x.shape[1] else torch.zeros(x.shape[0], 1)
        scale = peaks / 127.0  # (rows, 1)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(x / safe).clamp(-127, 127).to(torch.int8)
        return {"q": q.numpy(), "s": scale.squeeze(1).numpy().astype(np.float32)}
    flat = x.reshape(-1)
    idx = _topk_indices(flat, _keep(flat.numel(), codec.ratio))
    if codec.name == "topk":
        return {"i": idx.numpy().astype(np.uint32), "v": flat[idx].numpy().astype(np.float32)}
    idx = idx[flat[idx] != 0]  # sign(0) = 0: a zero among the top k decodes to 0, not -scale
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[idx] = True
    std = float(flat.double().std(unbiased=False)) if flat.numel() > 1 else 0.0
    return {
        "m": np.packbits(mask.numpy()),
        "g": np.packbits((flat[idx] > 0).numpy()),
        "s": np.asarray([codec.alpha * std], dtype=np.float32),
    }


def _field(fields: Mapping[str, np.ndarray], name: str, dtype: type, where: str) -> np.ndarray:
    if name not in fields:
        raise ProtocolError(f"{where}: codec field {name!r} is missing (got {sorted(fields)})")
    arr = fields[name]
    if arr.dtype != np.dtype(dtype):
        raise ProtocolError(f"{where}: codec field {name!r} is {arr.dtype}, expected {dtype}")
    return arr


def decode_tensor(
    fields: Mapping[str, np.ndarray], codec: CodecSpec, shape: tuple[int, int], where: str
) -> torch.Tensor:
    """Float32 tensor of ``shape`` from what :func:`encode_tensor` produced.

    Raises
    ------
    ProtocolError
        If a field is missing, mistyped or inconsistent with ``shape`` (names ``where``).
    """
    rows, cols = shape
    n = rows * cols
    if rows < 0 or cols < 0:
        raise ProtocolError(f"{where}: negative shape {shape}")
    if codec.name == "fp16":
        v = _field(fields, "v", np.float16, where)
        if v.shape != (rows, cols):
            raise ProtocolError(f"{where}: fp16 values are {v.shape}, expected {shape}")
        return torch.from_numpy(v.astype(np.float32))
    if codec.name == "int8":
        q, s = _field(fields, "q", np.int8, where), _field(fields, "s", np.float32, where)
        if q.shape != (rows, cols) or s.shape != (rows,):
            raise ProtocolError(f"{where}: int8 fields {q.shape}/{s.shape} do not fit {shape}")
        return torch.from_numpy(q.astype(np.float32) * s[:, None])
    out = torch.zeros(n, dtype=torch.float32)
    if codec.name == "topk":
        i, v = _field(fields, "i", np.uint32, where), _field(fields, "v", np.float32, where)
        if i.shape != v.shape or i.ndim != 1 or (i.size and int(i.max()) >= n):
            raise ProtocolError(f"{where}: top-k indices/values do not fit {n} entries")
        out[torch.from_numpy(i.astype(np.int64))] = torch.from_numpy(v.copy())
        return out.reshape(rows, cols)
    m, g = _field(fields, "m", np.uint8, where), _field(fields, "g", np.uint8, where)
    s = _field(fields, "s", np.float32, where)
    if m.shape != ((n + 7) // 8,) or s.shape != (1,):
        raise ProtocolError(f"{where}: compeft mask/scale do not fit {n} entries")
    mask = np.unpackbits(m)[:n].astype(bool)
    kept = int(mask.sum())
    if g.shape != ((kept + 7) // 8,):
        raise ProtocolError(f"{where}: compeft has {g.size} sign bytes for {kept} kept entries")
    signs = np.unpackbits(g)[:kept].astype(np.float32) * 2 - 1
    out[torch.from_numpy(mask)] = torch.from_numpy(signs * s[0])
    return out.reshape(rows, cols)


@dataclass
class ErrorFeedback:
    """A sender's residual per tensor key: what earlier encodings left out.

    ``apply(key, x)`` returns ``x + residual`` to encode; ``record(key, sent, decoded)``
    keeps ``sent - decoded`` for next time. A residual of another shape (the rank changed)
    is dropped.
    """

    residual: dict[str, torch.Tensor] = field(default_factory=dict)

    def apply(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` plus the stored residual of ``key`` (when shapes agree)."""
        r = self.residual.get(key)
        return x + r if r is not None and r.shape == x.shape else x

    def record(self, key: str, sent: torch.Tensor, decoded: torch.Tensor) -> None:
        """Keep what the receiver did not get."""
        self.residual[key] = (sent - decoded).detach().clone()
