"""Group importance from LoRA gradients alone (LoRAPrune, Zhang et al. 2023, arXiv:2305.18403).

The base weights are frozen and get no gradient; LoRA's factors do. For ``W' = W + s B A`` the
weight gradient is estimated from the factors' gradients (the first-order change LoRA can
make), and the importance of an element is the first-order Taylor term of removing it::

    G ~= s (dL/dB A + B dL/dA)                  # (out, r) @ (r, in) + (out, r) @ (r, in)
    I  = | G * (W + s B A) |                    # elementwise, (out, in)

A group's score is the sum of ``I`` over its rows/columns in every adapted module it touches
(q/k/v rows and o columns of its heads; gate/up rows and the down column of a channel), and
scores are smoothed across steps, ``S_t = beta S_{t-1} + (1 - beta) I_t``. A group with no
adapted module falls back to the magnitude ``|W|`` (documented deviation: LoRAPrune adapts
every linear layer). :func:`choose_keep` keeps the top ``1 - ratio`` share of each layer's
groups, at least one, and leaves protected layers (first and last by default) whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fedpeft.prune.structure import Keep, LayerShape

__all__ = [
    "GroupScores",
    "choose_keep",
    "element_importance",
    "kept_count",
    "reduce_groups",
    "top_k",
]


def element_importance(
    w: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    grad_a: torch.Tensor | None,
    grad_b: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """``|G * (W + s B A)|`` with ``G`` estimated from LoRA's gradients; ``|W|`` without them."""
    merged = w.float() + scale * (b.float() @ a.float())  # (out, r) @ (r, in) -> (out, in)
    if grad_a is None or grad_b is None:
        return w.float().abs()
    g = scale * (grad_b.float() @ a.float() + b.float() @ grad_a.float())  # (out, in)
    return (g * merged).abs()


def reduce_groups(imp: torch.Tensor, dim: int, groups: int) -> torch.Tensor:
    """Sum ``imp`` over equal blocks along ``dim`` (rows: 0, columns: 1) into ``groups`` scores."""
    per = imp.sum(dim=1 - dim)  # (size along dim,)
    if per.numel() % groups:
        raise ValueError(f"{per.numel()} rows/columns do not split into {groups} groups")
    return per.reshape(groups, -1).sum(dim=1)


@dataclass
class GroupScores:
    """Smoothed importance per layer: ``attn`` (groups,) and ``ffn`` (channels,) tensors."""

    beta: float = 0.9
    attn: dict[int, torch.Tensor] = field(default_factory=dict)
    ffn: dict[int, torch.Tensor] = field(default_factory=dict)

    def add(self, layer: int, attn: torch.Tensor | None, ffn: torch.Tensor | None) -> None:
        """Fold one step's scores into the running averages."""
        for table, value in ((self.attn, attn), (self.ffn, ffn)):
            if value is None:
                continue
            old = table.get(layer)
            v = value.detach().double().cpu()
            table[layer] = v if old is None else self.beta * old + (1 - self.beta) * v


def choose_keep(
    scores: GroupScores,
    shapes: Sequence[LayerShape],
    ratio: float,
    protect: Sequence[int] | None = None,
) -> dict[int, Keep]:
    """What each layer keeps at pruning ``ratio`` (share of groups removed, 0 <= ratio < 1).

    ``protect`` lists layers left whole (default: the first and the last). Layers without
    scores are left whole too. Ties keep the lower index.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    protected = set(protect if protect is not None else (0, len(shapes) - 1))
    out: dict[int, Keep] = {}
    for i, shape in enumerate(shapes):
        if i in protected or ratio == 0:
            continue
        keep_attn = _top(scores.attn.get(i), shape.attn_groups, ratio)
        keep_ffn = _top(scores.ffn.get(i), shape.ffn_channels, ratio)
        out[i] = Keep(attn=keep_attn, ffn=keep_ffn)
    return out


def kept_count(n: int, ratio: float) -> int:
    """How many of ``n`` groups pruning ``ratio`` keeps: ``max(1, n - floor(ratio n))``."""
    return max(1, n - math.floor(ratio * n))


def top_k(score: torch.Tensor, k: int) -> tuple[int, ...]:
    """Positions of the ``k`` largest scores, sorted (ties keep the lower position)."""
    order = sorted(range(len(score)), key=lambda j: (-float(score[j]), j))[:k]
    return tuple(sorted(order))


def _top(score: torch.Tensor | None, n: int, ratio: float) -> tuple[int, ...]:
    if score is None:
        return tuple(range(n))
    return top_k(score, kept_count(n, ratio))
