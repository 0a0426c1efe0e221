"""Folded aggregation: each valid reply added to the round's exact sum, the strategy handed
the mean.

With ``federation.aggregation = "stream"`` the coordinator keeps no client's tensors. A linear
strategy's new global is the model every client was sent plus the weighted mean of their
changes (capability ``linear``), so it needs only that mean, which is what secure
aggregation hands it too (:mod:`fedpeft.server.secure_round`). Each valid update's change
(its family's flat vector: the trained LoRA coordinates, or the seed/scalar sums per
direction) is multiplied by its weight and added to an :class:`ExactSum`, then dropped; only
its header and metrics stay (a *stub*). At the end the family rebuilds what the strategy
aggregates from the sum: one combined LoRA update, or every seed/scalar client's stub with the
mean's scalars on the first.

Client-level DP (``[dp]`` without secure aggregation) folds too: each change is scaled to
L2 norm at most ``dp.clip_norm`` as it is added, every client weighs one, and the sum is
divided by the clients per round rather than by the weights; the DP wrapper then adds its
noise to that mean (:mod:`fedpeft.algorithms.wrappers.dp`). So does robust clipping with the
strategy's own mean (``[robust]`` with ``rule = "mean"``): each LoRA change is scaled to L2
norm at most ``robust.clip_norm``, or each seed/scalar scalar clipped to
``robust.scalar_clip``, as it is added, with the usual weights; the fold counts what it
clipped for the round's row, as the robust wrapper does
(:mod:`fedpeft.algorithms.wrappers.robust`).

Weights are otherwise those of the batch path: ``num_examples`` (or 1 each without example
weighting), capped at ``validation.max_weight_ratio`` times a median. The batch path takes
the median of the valid updates' counts, which is known only when every reply is in; here it
is the median of the counts the sampled clients reported at discovery, known before the first
reply (an update's count is validated to be at most its client's reported one).

The sum is exact (:mod:`fedpeft.server.exact_sum`), so the order replies arrive in cannot
change a bit of the result: streaming in any order gives the same global as folding the
collected replies in client-id order. That is what a batch round of the same scenario does
(every scenario streaming would accept, :func:`fedpeft.config.rules.foldable`): it collects
the replies, caps their weights, folds them and hands the strategy the same rebuilt mean, so
the two paths give bit-identical globals; they differ only in what they hold meanwhile (and
in the median the weight cap takes, see above).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedpeft.errors import AggregationError, ProtocolError
from fedpeft.families import family_of
from fedpeft.server.exact_sum import TOP, ExactSum
from fedpeft.server.validate import cap_update

__all__ = ["Fold"]


class Fold:
    """A round's valid updates, folded into their weighted sum one at a time.

    Parameters
    ----------
    instructions : Mapping[str, Any]
        The round's instructions by client id (LoRA: all sent the same factors).
    zo_blocks : int
        Seed/scalar strategies: blocks of the tuned tensors.
    cap : int | None
        The largest ``num_examples`` an update counts with
        (:func:`fedpeft.server.validate.weight_cap`).
    example_weighted : bool
        Weight each update by its (capped) ``num_examples``; ``False``: 1 each.
    scalar_clip : float
        Seed/scalar: clip each scalar to this magnitude as it is added (the strategy's
        ``Capabilities.scalar_clip``; 0: not clipped).
    norm_clip : float
        Scale each update's change, as its layout lays it out, to L2 norm at most this before
        it is weighted (0: off): ``dp.clip_norm`` (with ``example_weighted = False``), as
        :class:`fedpeft.algorithms.wrappers.dp.DpAggregation` clips, or ``robust.clip_norm``,
        as :class:`fedpeft.algorithms.wrappers.robust.RobustAggregation` clips.
    divisor : int | None
        The mean's denominator: ``None``, the folded weights' sum; DP, the clients per round
        (a fixed ``k`` keeps the sensitivity at ``clip / k`` when clients drop).
    watch_scalars : float
        Seed/scalar: count the scalars above this magnitude and track the largest
        (``robust.scalar_clip``, whose clipping ``scalar_clip`` includes; 0: not counted).

    Raises
    ------
    AggregationError
        If the instructions cannot be summed as one vector (LoRA clients sent different
        factors).
    """

    def __init__(
        self,
        instructions: Mapping[str, Any],
        zo_blocks: int = 1,
        cap: int | None = None,
        example_weighted: bool = True,
        scalar_clip: float = 0.0,
        norm_clip: float = 0.0,
        divisor: int | None = None,
        watch_scalars: float = 0.0,
    ) -> None:
        cids = sorted(instructions)
        if not cids:
            raise AggregationError("a folded round needs at least one instruction")
        family = family_of(instructions[cids[0]])
        self.layout = family.flat(instructions, cids, zo_blocks, scalar_clip)
        self.cap = cap
        self.example_weighted = example_weighted
        self.capped = 0
        self.norm_clip = norm_clip
        self.divisor = divisor
        self.watch_scalars = watch_scalars
        self.norm_clipped = 0  # updates whose change ``norm_clip`` scaled down
        self.norm_max = 0.0  # the largest change norm before clipping (with ``norm_clip``)
        self.scalars_above = 0  # scalars above ``watch_scalars``
        self.scalar_max = 0.0  # the largest scalar magnitude (with ``watch_scalars``)
        self._sum = ExactSum(self.layout.dim)
        self._weights: list[float] = []

    def add(self, update: Any) -> Any:
        """Fold ``update`` into the sum; returns its stub (header and metrics, capped count).

        Raises
        ------
        ProtocolError
            ``norm``: a weighted value is beyond the sum's range (``2**64``).
        """
        update, cut = cap_update(update, self.cap)
        self.capped += cut
        change = torch.from_numpy(self.layout.vector(update))  # (dim,) float64
        norm, scale = 0.0, 1.0
        if self.norm_clip > 0:  # scaled to norm at most the clip
            norm = float(change.norm())
            scale = min(1.0, self.norm_clip / max(norm, 1e-300))
            change = change * scale
        weight = float(update.header.num_examples) if self.example_weighted else 1.0
        try:
            self._sum.add(change * weight)
        except ValueError as err:
            raise ProtocolError(
                f"its weighted change is outside the streaming sum's range 2**{TOP}: {err}", "norm"
            ) from None
        self._weights.append(weight)
        self.norm_clipped += scale < 1.0
        self.norm_max = max(self.norm_max, norm)
        if self.watch_scalars > 0 and len(update.scalars):
            magnitudes = np.abs(update.scalars.astype(np.float64))
            self.scalars_above += int((magnitudes > self.watch_scalars).sum())
            self.scalar_max = max(self.scalar_max, float(magnitudes.max()))
        return self.layout.stub(update)

    def result(self, stubs: Sequence[Any]) -> list[Any]:
        """What the strategy aggregates, from the sum of the folded updates (``stubs``: theirs,
        the ones still counted)."""
        kept = sorted(stubs, key=lambda u: u.header.client_id)
        if len(kept) != self._sum.terms:
            raise AggregationError(
                f"{len(kept)} stubs for a sum of {self._sum.terms} updates: every folded "
                "update must be aggregated"
            )
        # correctly rounded: any order, same value
        denominator = math.fsum(self._weights) if self.divisor is None else float(self.divisor)
        return self.layout.rebuild(kept, self._sum.value().numpy(), denominator)
