"""The strategy plug-in point: a four-method protocol and the small types around it.

A strategy decides what each sampled client trains (``configure_train``) and how the returned
updates become the next global adapter (``aggregate_train``). It owns the global adapter, and
all of its state round-trips through ``state_dict`` / ``load_state_dict`` so a coordinator can
resume exactly. The round loop, sampling, headers, validation, byte counting and evaluation
live in the coordinator, not here.

A strategy class has a ``Config`` dataclass (its options, from ``[strategy.options]``) and is
built as ``Strategy(config, ctx)``; its constructor only stores what it is given. Register it
beside its definition with :func:`fedpeft.algorithms.registry.register_strategy`, or load it
from outside the package by file or dotted path (see ``strategies/README.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

from fedpeft.config import TrainConfig
from fedpeft.errors import AggregationError
from fedpeft.lora.ranks import FixedRanks, RankPolicy
from fedpeft.prune.layout import PruneLayout
from fedpeft.wire.messages import Adapter, ClientInfo, LoraFactors, LoraSpec, LoraUpdate
from fedpeft.wire.prune import PrunePlan
from fedpeft.wire.zo import ZoSpec, ZoSync

__all__ = [
    "AggregateResult",
    "LoraPlan",
    "Strategy",
    "StrategyContext",
    "ZoGlobal",
    "ZoPlan",
    "adapter_from_state",
    "adapter_state",
    "check_same_structure",
    "weights_of",
]


@dataclass(frozen=True)
class ZoGlobal:
    """The global model of a zeroth-order strategy: ``theta_0 - sum coeffs[b, k] z_{b,k}``.

    ``coeffs`` (blocks x K, float32) are the values every synced node holds.
    """

    spec: ZoSpec
    version: int
    coeffs: np.ndarray


@dataclass(frozen=True)
class ZoPlan:
    """What one zeroth-order client trains: the spec, what it must sync, Pro's probabilities."""

    family: ClassVar[str] = "zo"  # its update family (fedpeft.families)
    spec: ZoSpec
    sync: ZoSync
    probs: np.ndarray | None = None


@dataclass(frozen=True)
class StrategyContext:
    """What every strategy is built with.

    Attributes
    ----------
    initial : Adapter
        The starting global adapter (``B = 0``), at ``spec.rank``.
    spec : LoraSpec
        The run's adapter structure (rank, alpha, target modules, dropout).
    seed : int
        The run seed, for any randomness the strategy needs (derive, don't share).
    zo : ZoSpec | None
        Zeroth-order strategies: the direction pool and training spec.
    zo_blocks : int
        Zeroth-order strategies: blocks of the tuned tensors (1 unless Ferret).
    ranks : RankPolicy | None
        Heterogeneous-rank strategies: who trains which rank (``None``: ``spec.rank`` for all).
    layout : PruneLayout | None
        Pruning strategies (class attribute ``needs_layout = True``): the base model's
        prunable structure.
    validation_loss : Callable[[LoraSpec, Adapter], float] | None
        Strategies with ``needs_validation = True``: the loss of an adapter on the
        coordinator's validation records (``eval.validation_examples``, disjoint from the
        evaluated ones), on the unpruned base model; ``None`` when there are none.
    train : Callable[[int], TrainConfig] | None
        The ``[train]`` section round ``r``'s instructions carry (learning-rate schedule and
        centralized step budget applied; :func:`fedpeft.rounds.round_train`); ``None``
        outside a run (the section's defaults).
    num_clients : int
        All clients of the federation (0: unknown).
    magnitude_start : Callable[[float, bytes], bytes] | None
        Pruning strategies: ``magnitude_start(ratio, keep=b"")``, the structure at a ratio
        that magnitude pruning of the base weights gives (encoded with ``layout``), a start
        for a device that cannot hold the whole model; with a device's pruned ``keep``, that
        structure grown back to ``ratio`` by the same ranking (:mod:`fedpeft.prune.magnitude`).
    """

    initial: Adapter
    spec: LoraSpec
    seed: int
    zo: ZoSpec | None = None
    zo_blocks: int = 1
    ranks: RankPolicy | None = None
    layout: PruneLayout | None = None
    validation_loss: Callable[[LoraSpec, Adapter], float] | None = None
    train: Callable[[int], TrainConfig] | None = None
    num_clients: int = 0
    magnitude_start: Callable[..., bytes] | None = None

    def round_train(self, server_round: int) -> TrainConfig:
        """``train(server_round)``, or the ``[train]`` defaults."""
        return self.train(server_round) if self.train is not None else TrainConfig()

    def rank_policy(self) -> RankPolicy:
        """``ranks``, or everyone at ``spec.rank``."""
        return self.ranks if self.ranks is not None else FixedRanks(self.spec.rank, {})


@dataclass(frozen=True)
class LoraPlan:
    """What one client trains this round: an adapter structure and its starting factors.

    ``parts`` names the factors it trains and sends back (``AB``, ``A`` or ``B``; the other
    stays as sent). ``base`` is merged into the client's base weights for the round (FLoRA).
    ``prune`` asks for
    structured pruning (FedSpine); ``adapter`` then has the shapes of ``prune.keep``.
    ``options`` are the algorithm's own values for this client (bool, int, float or str); they
    travel as one record and its trainer reads them from the instruction. ``aux`` are its own
    tensors laid out like the adapter (SCAFFOLD's server control variate).
    """

    family: ClassVar[str] = "lora"  # its update family (fedpeft.families)
    spec: LoraSpec
    adapter: Adapter
    parts: str = "AB"
    base: Adapter | None = None
    prune: PrunePlan | None = None
    options: Mapping[str, bool | int | float | str] = field(default_factory=dict)
    aux: Adapter | None = None


@dataclass(frozen=True)
class AggregateResult:
    """The global model after a round and the strategy's own metrics.

    LoRA strategies set ``adapter`` and ``spec``; zeroth-order strategies set ``zo``.
    """

    adapter: Adapter | None = None
    spec: LoraSpec | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    zo: ZoGlobal | None = None

    def __post_init__(self) -> None:
        if (self.zo is None) == (self.adapter is None or self.spec is None):
            raise AggregationError(
                "an AggregateResult needs either adapter and spec (LoRA) or zo (zeroth-order)"
            )


@runtime_checkable
class Strategy(Protocol):
    """Aggregation strategy protocol (see the module docstring)."""

    def configure_train(
        self, server_round: int, clients: Sequence[ClientInfo]
    ) -> Mapping[str, LoraPlan] | Mapping[str, ZoPlan]:
        """Plan each sampled client's training; keys are client ids (omit to skip one)."""
        ...

    def aggregate_train(self, server_round: int, updates: Sequence[Any]) -> AggregateResult:
        """Combine validated updates into the next global adapter.

        Raises ``AggregationError`` (naming the client) if the updates cannot be combined.
        """
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this strategy is now."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


def weights_of(updates: Sequence[LoraUpdate]) -> list[float]:
    """Example-weighted shares ``p_k = n_k / sum(n)`` of sorted-by-client updates."""
    total = sum(u.header.num_examples for u in updates)
    if total <= 0:
        raise AggregationError("updates report 0 examples in total; cannot weight them")
    return [u.header.num_examples / total for u in updates]


def check_same_structure(updates: Sequence[LoraUpdate], strategy: str) -> None:
    """Raise ``AggregationError`` unless all updates have the same modules, shapes and alpha.

    The message names the first client that differs and what to use instead.
    """
    if not updates:
        raise AggregationError(f"strategy {strategy!r} got no updates to aggregate")
    ref = updates[0]
    for u in updates[1:]:
        if set(u.factors) != set(ref.factors):
            diff = sorted(set(u.factors) ^ set(ref.factors))[:3]
            raise AggregationError(
                f"client {u.header.client_id} adapted other modules than client "
                f"{ref.header.client_id} (differing: {diff}); strategy {strategy!r} needs the same"
            )
        for m, f in u.factors.items():
            g = ref.factors[m]
            if f.a.shape != g.a.shape or f.b.shape != g.b.shape or f.alpha != g.alpha:
                raise AggregationError(
                    f"client {u.header.client_id} sent rank {f.rank} (alpha {f.alpha}) for {m!r}, "
                    f"client {ref.header.client_id} rank {g.rank} (alpha {g.alpha}); strategy "
                    f"{strategy!r} needs equal ranks - use a heterogeneous-rank strategy"
                )


def adapter_state(adapter: Adapter) -> dict[str, Any]:
    """A plain, ``torch.save``-able dict of an adapter (tensors cloned)."""
    return {
        m: {"a": f.a.clone(), "b": f.b.clone(), "alpha": float(f.alpha)}
        for m, f in sorted(adapter.items())
    }


def adapter_from_state(state: Mapping[str, Any]) -> dict[str, LoraFactors]:
    """Inverse of :func:`adapter_state`."""
    return {
        m: LoraFactors(
            a=torch.as_tensor(v["a"]).clone(),
            b=torch.as_tensor(v["b"]).clone(),
            alpha=float(v["alpha"]),
        )
        for m, v in state.items()
    }
