"""Iterative prune-then-tune: how many groups each layer keeps, in stages, chosen by score.

A pruning ratio ``p`` keeps ``max(1, n - floor(p n))`` of a layer's ``n`` attention groups and
of its ``n`` FFN channels, counted on the **unpruned** model, in every layer but the
protected ones (first and last by default). A device reaches ``p`` in ``stages`` equal steps
of the ratio, ``p s / stages``; before each stage it tunes ``warmup_steps`` local steps while
the LoRAPrune scores accumulate (FedSpine's prune -> recover -> prune loop). A device already
at (or past) a stage's counts skips it.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedpeft.prune.importance import GroupScores, kept_count, top_k
from fedpeft.prune.layout import PruneLayout
from fedpeft.prune.structure import Keep

__all__ = ["default_protect", "needs_pruning", "shrink", "stage_ratios", "target_counts"]


def default_protect(layout: PruneLayout) -> tuple[int, ...]:
    """The first and the last layer."""
    return tuple(sorted({0, len(layout.layers) - 1}))


def target_counts(
    layout: PruneLayout, ratio: float, protect: Sequence[int]
) -> list[tuple[int, int]]:
    """``(attention groups, FFN channels)`` each layer keeps at ``ratio``."""
    if not 0 <= ratio < 1:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    return [
        (x.groups, x.ffn)
        if i in protect
        else (kept_count(x.groups, ratio), kept_count(x.ffn, ratio))
        for i, x in enumerate(layout.layers)
    ]


def needs_pruning(keeps: Sequence[Keep], counts: Sequence[tuple[int, int]]) -> bool:
    """Whether any layer keeps more than ``counts`` allows."""
    return any(len(k.attn) > a or len(k.ffn) > f for k, (a, f) in zip(keeps, counts, strict=True))


def stage_ratios(ratio: float, stages: int) -> list[float]:
    """``ratio * s / stages`` for ``s = 1 .. stages``."""
    return [ratio * s / stages for s in range(1, stages + 1)]


def shrink(
    keeps: Sequence[Keep], scores: GroupScores, counts: Sequence[tuple[int, int]]
) -> list[Keep]:
    """Cut every layer down to ``counts`` keeping its highest-scored groups.

    ``scores`` index groups by **position** in the current (already pruned) model; the result
    holds indices of the unpruned model. A layer without scores for a kind keeps its first
    groups of that kind (callers score every layer they prune; see ``magnitude`` fallbacks).
    """
    out = []
    for i, (k, (want_attn, want_ffn)) in enumerate(zip(keeps, counts, strict=True)):
        attn, ffn = k.attn, k.ffn
        if len(attn) > want_attn:
            s = scores.attn.get(i)
            pos = top_k(s, want_attn) if s is not None else tuple(range(want_attn))
            attn = tuple(attn[p] for p in pos)
        if len(ffn) > want_ffn:
            s = scores.ffn.get(i)
            pos = top_k(s, want_ffn) if s is not None else tuple(range(want_ffn))
            ffn = tuple(ffn[p] for p in pos)
        out.append(Keep(attn=attn, ffn=ffn))
    return out
