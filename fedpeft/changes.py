"""An update as a flat vector, and back: what the aggregation wrappers work on.

Robust aggregation, differential privacy, secure aggregation and the simulated attacks all
work on a LoRA update as ``d = (A - A_0, B - B_0)`` over the modules in sorted order, ``A``
before ``B`` (``A_0``, ``B_0``: the factors the client was sent), and on a seed/scalar upload
as its scalars summed per (block, seed) direction, a dense ``blocks * K`` vector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from fedpeft.errors import AggregationError
from fedpeft.wire.messages import Adapter, LoraFactors, LoraUpdate
from fedpeft.wire.zo import ZoUpdate, index_dtype

__all__ = [
    "CombinedLora",
    "FoldedZo",
    "carrying_mean",
    "clients_behind",
    "combined_update",
    "direction_sums",
    "flat_change",
    "folded",
    "folded_mean",
    "sent_factors",
    "shared_sent",
    "summed_round",
    "trained_mask",
    "with_change",
    "with_every_direction",
]


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


def sent_factors(plans: Mapping[str, Any]) -> dict[str, tuple[Adapter, str]]:
    """What each client of LoRA ``plans`` was sent: its factors and the ``parts`` it trains
    (a wrapper keeps this from ``configure_train`` to read the changes in ``aggregate_train``;
    seed/scalar plans have none)."""
    return {
        cid: (p.adapter, p.parts)
        for cid, p in plans.items()
        if getattr(p, "family", None) == "lora"
    }


def shared_sent(sent_of: Mapping[str, Adapter], cids: Sequence[str], refusal: str) -> Adapter:
    """The factors all of ``cids`` were sent (the same object).

    Raises
    ------
    AggregationError
        ``refusal`` plus the first client that was sent other factors.
    """
    sent = sent_of[cids[0]]
    for c in cids[1:]:
        if sent_of.get(c) is not sent:
            raise AggregationError(f"{refusal} (client {c} was sent other factors than {cids[0]})")
    return sent


@dataclass(frozen=True)
class CombinedLora(LoraUpdate):
    """One LoRA update standing for ``clients`` clients' (their mean, a robust combination,
    a DP release, a server optimizer's step): what a strategy aggregates in their place."""

    clients: int = 1


def combined_update(
    first: LoraUpdate, sent: Adapter, change: torch.Tensor, examples: int, clients: int
) -> CombinedLora:
    """One update standing for ``clients`` clients': ``sent + change``, ``examples`` behind
    it."""
    one = with_change(first, sent, change)
    header = replace(first.header, num_examples=examples)
    return CombinedLora(header, one.factors, one.metrics, one.keep, clients=clients)


def summed_round(updates: Sequence[Any], zo: bool) -> bool:
    """Whether ``updates`` are a round the coordinator already summed
    (:class:`fedpeft.server.fold.Fold`): one :class:`CombinedLora`, or seed/scalar stubs with
    a :class:`FoldedZo` among them. A wrapper that clips or privatizes each client's update
    finds that done (the fold clipped each change as it added it)."""
    if zo:
        return any(isinstance(u, FoldedZo) for u in updates)
    return len(updates) == 1 and isinstance(updates[0], CombinedLora)


def clients_behind(updates: Sequence[Any]) -> int:
    """How many clients ``updates`` stand for (a :class:`CombinedLora` counts its own)."""
    return sum(u.clients if isinstance(u, CombinedLora) else 1 for u in updates)


def direction_sums(
    update: ZoUpdate, num_blocks: int, num_seeds: int, clip: float = 0.0
) -> np.ndarray:
    """The upload's scalars summed per (block, seed) direction, ``(blocks * K,)`` float64;
    ``clip > 0``: each scalar is first clipped to ``[-clip, clip]`` (in float64)."""
    dense = np.zeros((num_blocks, num_seeds))
    blocks = (
        update.blocks.astype(np.int64)
        if len(update.blocks)
        else np.zeros(len(update.seeds), np.int64)
    )
    scalars = update.scalars.astype(np.float64)
    if clip > 0:
        scalars = np.clip(scalars, -clip, clip)
    np.add.at(dense, (blocks, update.seeds.astype(np.int64)), scalars)
    return dense.reshape(-1)


@dataclass(frozen=True)
class FoldedZo(ZoUpdate):
    """A seed/scalar round's weighted mean, handed to the strategy in place of the first
    client's update when the replies were summed (streaming, or a batch round of a linear
    strategy, or secure aggregation).

    ``mean`` is the float64 ``(blocks * K,)`` mean per (block, seed) direction, exactly as the
    sum gave it (each scalar already clipped to the strategy's ``scalar_clip``, except under
    secure aggregation, where the coordinator never sees a scalar); an in-tree strategy takes
    it as is (:func:`folded_mean`). The pairs carry the same mean times the number of clients
    in float32, one per direction, for strategies that read pairs (every other client's
    update then has none and counts one example), as before the mean was carried.
    """

    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))


def folded(update: ZoUpdate, mean: np.ndarray) -> FoldedZo:
    """``update`` (a :class:`FoldedZo` too) as a :class:`FoldedZo` carrying ``mean``."""
    # the plain update's fields (a FoldedZo given here gets the new mean in place of its own)
    return FoldedZo(**{f.name: getattr(update, f.name) for f in fields(ZoUpdate)}, mean=mean)


def carrying_mean(
    update: ZoUpdate, mean: np.ndarray, clients: int, num_blocks: int, num_seeds: int
) -> FoldedZo:
    """``update`` without its own pairs, carrying a round's folded ``mean`` (``(blocks * K,)``
    float64): as :class:`FoldedZo` and as one pair per direction with ``mean * clients``."""
    cut = slice(0, 0)
    bare = replace(update, seeds=update.seeds[cut], scalars=update.scalars[cut],
                   blocks=update.blocks[cut])  # fmt: skip
    return folded(with_every_direction(bare, mean * clients, num_blocks, num_seeds), mean)


def folded_mean(updates: Sequence[ZoUpdate], num_blocks: int, num_seeds: int) -> np.ndarray | None:
    """The mean a :class:`FoldedZo` among ``updates`` carries, ``(num_blocks, num_seeds)``;
    ``None`` when the updates are the clients' own.

    Raises
    ------
    AggregationError
        If more than one carries a mean, or its length is not ``num_blocks * num_seeds``.
    """
    means = [u.mean for u in updates if isinstance(u, FoldedZo)]
    if not means:
        return None
    if len(means) > 1 or means[0].size != num_blocks * num_seeds:
        raise AggregationError(
            f"a round's updates carry {len(means)} summed means of {means[0].size} values; "
            f"expected one of {num_blocks * num_seeds} (blocks x seeds)"
        )
    return means[0].reshape(num_blocks, num_seeds)


def with_every_direction(
    update: ZoUpdate, values: np.ndarray, num_blocks: int, num_seeds: int
) -> ZoUpdate:
    """``update`` plus one pair per (block, seed) direction, carrying ``values[b * K + s]``."""
    b, s = np.divmod(np.arange(num_blocks * num_seeds), num_seeds)
    blocks = update.blocks
    if num_blocks > 1 or len(update.blocks):  # block indices go with every pair or none
        blocks = np.concatenate([update.blocks, b.astype(np.uint16)])
    return replace(
        update,
        seeds=np.concatenate([update.seeds, s.astype(index_dtype(num_seeds))]),
        scalars=np.concatenate([update.scalars, values]).astype(np.float32),
        blocks=blocks,
    )
