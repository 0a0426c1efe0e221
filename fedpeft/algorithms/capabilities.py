"""What an algorithm can do, as data that the configuration rules read.

Every strategy class carries ``capabilities``: a :class:`Capabilities`, or a function of its
options dataclass returning one (FedKSeed's ``pro`` option changes what it uses). The rules in
:mod:`fedpeft.config.rules` decide every combination of sections from these fields and never
from a strategy's name, so an out-of-tree strategy that declares the same capabilities as an
in-tree one is accepted in the same places.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from fedpeft.config import CODECS
from fedpeft.errors import StrategyError

__all__ = ["ALL_CODECS", "Capabilities", "capabilities_of", "weighted_linear"]

ALL_CODECS = frozenset(CODECS)  # every upload codec [compress] knows, new ones included


@dataclass(frozen=True)
class Capabilities:
    """What a strategy does and accepts.

    Attributes
    ----------
    family : {"lora", "zo"}
        The update family: LoRA factors, or seed/scalar pairs (zeroth order).
    heterogeneous_ranks : bool
        Accepts clients training different LoRA ranks (``[ranks]`` other than uniform).
    linear : bool
        The new global is the one every client was sent plus the example-weighted mean of the
        clients' changes to what they trained. Such a strategy gets the same result from one
        combined update carrying that mean, which is what secure aggregation can deliver.
    example_weighted : bool
        With ``linear``: the mean weights each client by its ``num_examples`` (as capped by
        ``validation.max_weight_ratio``); ``False``: every client counts once.
    client_statistics : bool
        Uses statistics of individual clients' updates beyond their mean (e.g. FedKSeed-Pro's
        per-seed magnitudes), which client-level DP does not cover.
    codecs : frozenset[str]
        The upload codecs (``compress.up``) its updates may travel in.
    chooses_ranks : bool
        Picks each client's rank itself (FedSpine's bandit), so ``[ranks]`` does not apply.
    needs_layout : bool
        Prunes the base model per client (FedSpine): clients train different shapes.
    needs_validation : bool
        Scores adapters on the coordinator's validation records (``eval.validation_examples``).
    fixed_steps : bool
        Derives quantities from the local steps the coordinator asks for (SCAFFOLD's control
        variates), so every client must run ``train.local_steps`` (``train.epochs = 0``).
    personal : bool
        Clients keep a personal part of the model that never leaves them (FedSA-LoRA's
        ``B``): the global model alone is not what a client runs; evaluate with
        ``eval.personalized``.
    merges_base : bool
        Writes adapters into the base model's weights (FLoRA merges the stacked global into
        the base before each round), which a quantized base cannot take.
    scalar_clip : float
        Seed/scalar, with ``linear``: each client's scalars count clipped to
        ``[-scalar_clip, scalar_clip]`` (0: not clipped). A round whose replies are summed
        before the strategy sees them (:mod:`fedpeft.server.fold`) clips each scalar as it adds
        it, so the strategy gets the mean of the clipped scalars.
    """

    family: Literal["lora", "zo"] = "lora"
    heterogeneous_ranks: bool = False
    linear: bool = False
    example_weighted: bool = True
    client_statistics: bool = False
    codecs: frozenset[str] = ALL_CODECS
    chooses_ranks: bool = False
    needs_layout: bool = False
    needs_validation: bool = False
    fixed_steps: bool = False
    personal: bool = False
    merges_base: bool = False
    scalar_clip: float = 0.0

    def __post_init__(self) -> None:
        if self.family not in ("lora", "zo"):
            raise StrategyError(f"Capabilities.family must be 'lora' or 'zo', got {self.family!r}")
        unknown = set(self.codecs) - ALL_CODECS
        if unknown or "none" not in self.codecs:
            raise StrategyError(
                f"Capabilities.codecs must include 'none' and only {sorted(ALL_CODECS)}, "
                f"got {sorted(self.codecs)}"
            )
        if self.scalar_clip < 0 or (self.scalar_clip and self.family != "zo"):
            raise StrategyError(
                f"Capabilities.scalar_clip must be 0 or, for a seed/scalar (zo) strategy, "
                f"positive; got {self.scalar_clip} for family {self.family!r}"
            )
        if self.family == "zo" and (
            self.heterogeneous_ranks or self.needs_layout or self.chooses_ranks or self.personal
        ):
            raise StrategyError(
                "a seed/scalar (zo) strategy cannot declare heterogeneous_ranks, chooses_ranks, "
                "needs_layout or personal"
            )


def weighted_linear(family: Literal["lora", "zo"], **fields: Any) -> Callable[[Any], Capabilities]:
    """Capabilities of a linear strategy whose options have ``weighted`` (example weights or
    one weight per client)."""

    def caps(options: Any) -> Capabilities:
        return Capabilities(
            family=family, linear=True, example_weighted=bool(options.weighted), **fields
        )

    return caps


def capabilities_of(cls: type[Any], options: Any = None) -> Capabilities:
    """The capabilities of strategy class ``cls`` with its options dataclass ``options``.

    Raises
    ------
    StrategyError
        If ``cls.capabilities`` is missing or neither a :class:`Capabilities` nor a function
        of the options returning one.
    """
    caps: Capabilities | Callable[[Any], Capabilities] | None = getattr(cls, "capabilities", None)
    if isinstance(caps, Capabilities):
        return caps
    if callable(caps):
        if options is None:
            options = cls.Config()
        got = caps(options)
        if isinstance(got, Capabilities):
            return got
        raise StrategyError(
            f"{cls.__name__}.capabilities({options!r}) returned {got!r}, not a Capabilities"
        )
    raise StrategyError(
        f"{cls.__name__} needs `capabilities = Capabilities(...)` (fedpeft.algorithms."
        "capabilities): what it does (family, heterogeneous_ranks, linear, ...) decides which "
        "sections it combines with"
    )
