"""A LoRA update as its change to the factors it was sent, flattened, and back.

Robust aggregation, differential privacy, secure aggregation and the simulated attacks all
work on ``d = (A - A_0, B - B_0)`` over the modules in sorted order, ``A`` before ``B``
(``A_0``, ``B_0``: the factors the client was sent).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from fedpeft.wire import Adapter, LoraFactors, LoraUpdate

__all__ = ["flat_change", "trained_mask", "with_change"]


def flat_change(factors: Mapping[str, LoraFactors], sent: Adapter) -> torch.Tensor:
    """``(A - A_0, B - B_0)`` over ``sorted(sent)``, flat float64 (``sent``: the ``_0``)."""
    parts = []
    for m in sorted(sent):
        f, g = factors[m], sent[m]
        parts += [(f.a.double() - g.a.double()).reshape(-1)]  # (r * in,)
        parts += [(f.b.double() - g.b.double()).reshape(-1)]  # (out * r,)
    return torch.cat(parts)


def with_change(update: LoraUpdate, sent: Adapter, change: torch.Tensor) -> LoraUpdate:
    """``update`` with factors ``sent + change`` (``change`` as :func:`flat_change` lays it)."""
    out, at = {}, 0
    for m in sorted(sent):
        f, g = update.factors[m], sent[m]
        na, nb = g.a.numel(), g.b.numel()
        a = g.a.double() + change[at : at + na].reshape(g.a.shape)  # (r, in)
        b = g.b.double() + change[at + na : at + na + nb].reshape(g.b.shape)  # (out, r)
        at += na + nb
        out[m] = LoraFactors(a=a.to(f.a.dtype), b=b.to(f.b.dtype), alpha=f.alpha)
    return replace(update, factors=out)


def trained_mask(sent: Adapter, parts: str) -> torch.Tensor:
    """Which coordinates of :func:`flat_change` a client trains (``parts``: AB, A or B)."""
    return torch.cat(
        [
            torch.full((f.numel(),), part in parts, dtype=torch.bool)
            for m in sorted(sent)
            for part, f in (("A", sent[m].a), ("B", sent[m].b))
        ]
    )
