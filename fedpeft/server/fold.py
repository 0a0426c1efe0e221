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
noise to that mean (:mod:`fedpeft.algorithms.wrappers.dp`).

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
        Client-level DP (``dp.clip_norm``; 0: off): each update's change, as its layout
        lays it out, is scaled to L2 norm at most this, and that scale is its weight (no
        example weighting), as :class:`fedpeft.algorithms.wrappers.dp.DpAggregation` clips.
    divisor : int | None
        The mean's denominator: ``None``, the folded weights' sum; DP, the clients per round
        (a fixed ``k`` keeps the sensitivity at ``clip / k`` when clients drop).

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
        if self.norm_clip > 0:  # DP: scaled to norm at most the clip; that scale weighs it
            weight = min(1.0, self.norm_clip / max(float(change.norm()), 1e-300))
        else:
            weight = float(update.header.num_examples) if self.example_weighted else 1.0
        vector = change * weight
        try:
            self._sum.add(vector)
        except ValueError as err:
            raise ProtocolError(
                f"its weighted change is outside the streaming sum's range 2**{TOP}: {err}", "norm"
            ) from None
        self._weights.append(weight)
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
