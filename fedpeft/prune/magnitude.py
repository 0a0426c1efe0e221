"""A structure the coordinator computes from the base weights alone: magnitude pruning.

A device that cannot hold the whole model cannot start FedSpine's prune-then-tune, which
scores groups from LoRA gradients on the model it holds. The coordinator, which has the base
model, can instead send it a start structure: at a ratio, each layer keeps the attention
groups and FFN channels whose weights are largest in magnitude (``|W|`` summed over every
row or column of the layer's projections that belongs to the group), the data-free criterion
of one-shot structured pruning. Protected layers stay whole, as in the device's own pruning.

The same ranking grows a pruned structure back (:func:`regrow`): a device moving to a less
pruned arm keeps the groups it chose and gets back the removed groups of largest magnitude,
instead of starting over from the whole model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedpeft.prune.importance import GroupScores, top_k
from fedpeft.prune.layout import PruneLayout
from fedpeft.prune.schedule import shrink, target_counts
from fedpeft.prune.structure import Keep

__all__ = ["magnitude_scores", "magnitude_structure", "regrow"]


def magnitude_scores(model: Any, layout: PruneLayout) -> GroupScores:
    """``|W|`` summed per attention group and FFN channel of every layer (unpruned model)."""
    found: dict[tuple[int, str], torch.Tensor] = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            role = layout.role(name)
            if (
                role is None
                or "lora_" in name
                or not isinstance(getattr(mod, "weight", None), torch.Tensor)
            ):
                continue
            w = mod.weight.detach().float()
            w = w.T if layout.arch == "gpt2" else w  # Conv1D stores (in, out)
            kind, s = layout.group_scores(role, w.abs())
            key = (role.layer, kind)
            found[key] = found[key] + s.double() if key in found else s.double()
    scores = GroupScores()
    for (i, kind), s in found.items():
        (scores.attn if kind == "attn" else scores.ffn)[i] = s
    return scores


def magnitude_structure(
    model: Any, layout: PruneLayout, ratio: float, protect: Sequence[int]
) -> list[Keep]:
    """The structure at ``ratio`` that keeps each layer's groups of largest ``|W|``."""
    scores = magnitude_scores(model, layout)
    return shrink(layout.full(), scores, target_counts(layout, ratio, protect))


def _add_back(
    kept: tuple[int, ...], score: torch.Tensor | None, n: int, want: int
) -> tuple[int, ...]:
    if len(kept) >= want:
        return kept
    removed = [j for j in range(n) if j not in set(kept)]
    if score is None:  # a layer nobody scored: its first removed groups
        return tuple(sorted([*kept, *removed[: want - len(kept)]]))
    picks = top_k(score[removed], want - len(kept))
    return tuple(sorted([*kept, *(removed[p] for p in picks)]))


def regrow(
    layout: PruneLayout, keeps: Sequence[Keep], scores: GroupScores, ratio: float,
    protect: Sequence[int],
) -> list[Keep]:  # fmt: skip
    """``keeps`` grown to the counts of ``ratio``: every kept group stays, and each layer gets
    back its removed groups of largest score (``scores`` index the unpruned model). A layer
    already at or below those counts is unchanged."""
    counts = target_counts(layout, ratio, protect)
    return [
        Keep(
            attn=_add_back(k.attn, scores.attn.get(i), x.groups, a),
            ffn=_add_back(k.ffn, scores.ffn.get(i), x.ffn, f),
        )
        for i, (k, x, (a, f)) in enumerate(zip(keeps, layout.layers, counts, strict=True))
    ]
