"""A structure the coordinator computes from the base weights alone: magnitude pruning.

A device that cannot hold the whole model cannot start FedSpine's prune-then-tune, which
scores groups from LoRA gradients on the model it holds. The coordinator, which has the base
model, can instead send it a start structure: at a ratio, each layer keeps the attention
groups and FFN channels whose weights are largest in magnitude (``|W|`` summed over every
row or column of the layer's projections that belongs to the group), the data-free criterion
of one-shot structured pruning. Protected layers stay whole, as in the device's own pruning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedpeft.prune.importance import GroupScores
from fedpeft.prune.layout import PruneLayout
from fedpeft.prune.schedule import shrink, target_counts
from fedpeft.prune.structure import Keep

__all__ = ["magnitude_structure"]


def magnitude_structure(
    model: Any, layout: PruneLayout, ratio: float, protect: Sequence[int]
) -> list[Keep]:
    """The structure at ``ratio`` that keeps each layer's groups of largest ``|W|``."""
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
    return shrink(layout.full(), scores, target_counts(layout, ratio, protect))
