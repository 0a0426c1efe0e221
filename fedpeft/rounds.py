"""What each round asks of the clients: how many train, and the training config they get.

:func:`clients_per_round` is the sample size; :func:`round_train` the ``[train]`` section as a
round's instructions carry it: in centralized mode the one client runs as many steps as the
clients of a federated round together, and the learning rate follows ``train.lr_schedule``
(:func:`round_lr`). Strategies that derive quantities from the clients' steps (SCAFFOLD's
control variates) read the same function through their context.

The learning-rate schedule is over the run's budget: clients start a fresh optimizer every
round, so a schedule inside a round would restart each time; this one is over rounds instead.

Clients start a fresh optimizer every round, so a schedule inside a round would restart each
time; this one is over rounds instead. Round ``r`` of ``R`` (1-based) trains with
``train.lr * f(r)``:

- warmup (``r <= w``, ``w = train.warmup_rounds``): ``f = r / (w + 1)``;
- then with progress ``p = (r - w - 1) / (R - w)`` in ``[0, 1)`` and ``e = train.lr_end_factor``:
  ``constant``: ``f = 1``; ``linear``: ``f = 1 - (1 - e) p``;
  ``cosine``: ``f = e + (1 - e) (1 + cos(pi p)) / 2``.

The first round after warmup trains at the full rate and the last one above ``lr * e`` (each
round's rate is where the schedule stands at its start), so no round trains with rate zero.
"""

from __future__ import annotations

import math
from dataclasses import replace

from fedpeft.config import RunConfig, TrainConfig

__all__ = ["clients_per_round", "round_lr", "round_train"]


def clients_per_round(cfg: RunConfig, available: int) -> int:
    """How many of ``available`` clients a round samples
    (:meth:`~fedpeft.config.FederationConfig.sample_size`)."""
    return cfg.federation.sample_size(available)


def round_train(cfg: RunConfig, server_round: int) -> TrainConfig:
    """The ``[train]`` section that round ``server_round``'s instructions carry."""
    train = cfg.train
    if cfg.federation.centralized and train.epochs == 0:
        # Same total optimizer steps as the federated run it is the reference for.
        federated = clients_per_round(cfg, cfg.federation.num_clients)
        train = replace(train, local_steps=train.local_steps * federated)
    lr = round_lr(train, server_round, cfg.federation.rounds)
    return train if lr == train.lr else replace(train, lr=lr)


def round_lr(train: TrainConfig, server_round: int, rounds: int) -> float:
    """The learning rate of round ``server_round`` (1-based) of ``rounds``."""
    w = train.warmup_rounds
    if server_round <= w:
        return train.lr * server_round / (w + 1)
    if train.lr_schedule == "constant":
        return train.lr
    p = (server_round - w - 1) / max(1, rounds - w)
    e = train.lr_end_factor
    if train.lr_schedule == "linear":
        return train.lr * (1 - (1 - e) * p)
    return train.lr * (e + (1 - e) * (1 + math.cos(math.pi * p)) / 2)
