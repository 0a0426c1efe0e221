"""Sparse MeZO (Liu, Zhu, Gong, Cheng, Hsieh, You 2024, arXiv:2402.15751) with FedKSeed's
seed/scalar exchange.

MeZO perturbs every weight along a random direction ``z``; Sparse MeZO perturbs and updates
only the weights of small magnitude, ``theta +- eps (m * z)`` with ``m`` marking the entries
whose ``|theta|`` is at most a per-layer threshold. Its paper reports large gains over MeZO
(+9 points on RTE, 3.5x faster convergence). Here it is FedKSeed (a pool of K seeds, clients
send ``(seed index, g)`` pairs, the coordinator accumulates ``lr * p_i * clip(g)`` per seed)
whose every direction, on the clients and in the coordinator's replay, is masked by
:class:`SmallestWeights`: the fraction ``density`` of each tuned tensor's entries smallest in
``|theta_0|``.

Deviations from the paper, and why:

- The mask is computed once, from ``theta_0``, per tensor, not from the current weights at
  every step. Every node can then compute it from the base model alone, so coordinator and
  clients agree without sending it (the spec carries its ``repr``, and a node with another
  mask refuses the spec); with zeroth-order learning rates the weights move far less than the
  gap between magnitudes, so the selection barely changes in a run.
- The threshold is a quantile per tuned tensor (a weight matrix, a norm vector), where the
  paper sets one per layer; with ties at the threshold a tensor keeps every tied entry.
- ``density`` is part of the class (0.25, a quarter of each tensor), not an option: the mask
  is the client half's and is named in the spec. Another density is a one-line plug-in,
  ``class SparseMezo50(SparseMezo): trainer = ZoTrainer(mask=SmallestWeights(0.5))``.
- With ``zo.target = "lora"`` the LoRA ``B`` factors start at zero, so the mask keeps all of
  them; the density applies to ``A``.

Memory: the masks are float32 copies of the tuned tensors' shapes (538 MB for SmolLM2-135M's
134.5 M parameters), held beside the synced snapshot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedpeft.algorithms.fedkseed import FedKSeed
from fedpeft.algorithms.registry import register_strategy
from fedpeft.zo.trainer import ZoTrainer

__all__ = ["SmallestWeights", "SparseMezo"]


@dataclass(frozen=True)
class SmallestWeights:
    """The direction mask of Sparse MeZO: the ``density`` fraction of a tensor's entries with
    the smallest ``|theta_0|`` (every entry tied with the last one kept too)."""

    density: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.density <= 1:
            raise ValueError(f"SmallestWeights.density must be in (0, 1], got {self.density}")

    def __call__(self, name: str, initial: torch.Tensor) -> torch.Tensor:
        """True where ``|initial|`` is among the ``ceil(density * numel)`` smallest."""
        magnitude = initial.detach().abs().float()
        k = max(1, math.ceil(self.density * magnitude.numel()))
        threshold = magnitude.reshape(-1).kthvalue(k).values
        return magnitude <= threshold


class SparseMezo(FedKSeed):
    """FedKSeed whose directions move only each tensor's smallest-magnitude quarter."""

    zo_algorithm = "fedkseed"  # the local loop: two-point steps
    trainer = ZoTrainer(mask=SmallestWeights(0.25))


register_strategy("sparse-mezo", SparseMezo)
