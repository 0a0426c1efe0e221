"""Algorithms, each registered whole: its coordinator strategy, its client half (``trainer``),
its options (``Config``) and its capabilities, in one class (see ``docs/architecture.md``).

- :mod:`.base`: the ``Strategy`` protocol, plans and the strategy context;
- :mod:`.capabilities`: what an algorithm can do, as data the config rules read;
- :mod:`.registry`: names, file paths, dotted paths and entry points (group
  ``fedpeft.strategies``) to classes;
- one module per in-tree algorithm (FedAvg/FedIT, FFA-LoRA, RoLoRA, FLoRA, FlexLoRA, HetLoRA,
  FedSpine, FedKSeed, Sparse MeZO, Ferret) and :mod:`.wrappers` (robust rules and DP over the
  linear seam).

This file imports nothing, so importing one algorithm does not import the others.
"""
