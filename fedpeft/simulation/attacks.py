"""Simulated Byzantine clients (``[attack]``), to test defences; simulation only.

The attackers are ``round(fraction * num_clients)`` clients drawn once from the run seed
(:func:`attackers`). Model-poisoning attacks rewrite their replies in :class:`AttackGrid`, a
``Grid`` wrapper between the coordinator and the clients, so every attacked update goes
through the coordinator's decoding and validation exactly as a real one would. The attackers
collude and see the honest updates of the round (the strongest usual assumption).

A LoRA update's *change* is ``(A - A_0, B - B_0)``, ``A_0``, ``B_0`` the factors it was sent.

- ``sign_flip``: change ``* -scale`` (seed/scalar: scalars ``* -scale``).
- ``scale``: change ``* scale`` (seed/scalar: scalars ``* scale``).
- ``noise``: a Gaussian change of std ``noise_std`` instead (seed/scalar: Gaussian scalars).
- ``alie``: "A Little Is Enough" (Baruch et al., NeurIPS 2019): every attacker sends
  ``mean - z * std`` of the honest changes per coordinate, ``z = Phi^-1((n - s) / n)``,
  ``s = floor(n / 2 + 1) - f`` for ``n`` updates and ``f`` attackers in the round, unless
  ``alie_z`` is set. LoRA only.
- ``nonfinite``: one value becomes NaN.
- ``inflate_examples``: the attacker reports ``examples`` training examples at discovery and
  in every update (with its honest update).
- ``label_flip``: data poisoning: the attacker trains on its records with the response fields
  rotated by one (each prompt gets another record's answer). Applied where client data is
  built (:func:`flip_labels`), not here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import replace
from statistics import NormalDist
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from fedpeft._flwr import GridWrapper
from fedpeft.changes import flat_change, with_change
from fedpeft.config import AttackConfig, RunConfig
from fedpeft.errors import ConfigError
from fedpeft.seeding import np_rng, torch_generator
from fedpeft.wire.messages import (
    HEADER,
    decode_client_info,
    decode_instruction,
    decode_update,
    encode_update,
)
from fedpeft.wire.zo import ZoUpdate, decode_zo_update, encode_zo_update

__all__ = ["AttackGrid", "alie_z", "attackers", "flip_labels"]


def attackers(cfg: RunConfig) -> set[str]:
    """Client ids of the attackers (the same every round; empty without an attack)."""
    att, n = cfg.attack, cfg.federation.num_clients
    if att.kind == "none" or cfg.federation.centralized:
        return set()
    count = round(att.fraction * n)
    picked = np_rng(cfg.federation.seed, "attackers").permutation(n)[:count]
    return {str(int(i)) for i in picked}


def flip_labels(records: list[dict[str, Any]], fields: Iterable[str]) -> list[dict[str, Any]]:
    """``records`` with ``fields`` rotated by one record (label flipping)."""
    names = sorted(fields)
    n = len(records)
    return [{**r, **{k: records[(i + 1) % n][k] for k in names}} for i, r in enumerate(records)]


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s ``z_max`` for ``n`` updates of which ``f`` are the attackers'."""
    s = math.floor(n / 2 + 1) - f
    return NormalDist().inv_cdf(min(max((n - s) / n, 1e-6), 1 - 1e-6))


class AttackGrid(GridWrapper):
    """A ``Grid`` whose attacker clients' replies are poisoned (see the module docstring).

    Parameters
    ----------
    grid : Grid
        The real transport (in-process or Ray).
    cfg : RunConfig
        The scenario; ``cfg.attack`` says what the attackers do.
    """

    def __init__(self, grid: Grid, cfg: RunConfig) -> None:
        super().__init__(grid)
        self.cfg = cfg
        self.attack: AttackConfig = cfg.attack
        self.bad = attackers(cfg)
        self.client_of: dict[int, str] = {}
        self.round = 0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver ``messages``; poison the attackers' replies."""
        sent = list(messages)
        replies = list(self.grid.send_and_receive(sent, timeout=timeout))
        kinds = {m.metadata.message_type for m in sent}
        if self.attack.kind in ("none", "label_flip") or not self.bad:
            return replies
        if kinds == {"query.info"}:
            self._info(replies)
        elif kinds == {"train.lora"}:
            self.round += 1
            self._lora(sent, replies)
        elif kinds == {"train.zo"}:
            self.round += 1
            self._zo(replies)
        return replies

    def _mine(self, reply: Message) -> bool:
        return not reply.has_error() and self.client_of.get(reply.metadata.src_node_id) in self.bad

    def _info(self, replies: Sequence[Message]) -> None:
        for reply in replies:
            if reply.has_error():
                continue
            info = decode_client_info(reply.content, node_id=reply.metadata.src_node_id)
            self.client_of[info.node_id] = info.client_id
            if self._mine(reply) and self.attack.kind == "inflate_examples":
                header = cast(ConfigRecord, reply.content[HEADER])
                header["num_examples"] = int(self.attack.examples)

    def _lora(self, sent: Sequence[Message], replies: Sequence[Message]) -> None:
        instructions = {m.metadata.dst_node_id: decode_instruction(m.content) for m in sent}
        refs = {node: ins.adapter for node, ins in instructions.items()}
        ok = [r for r in replies if not r.has_error()]
        # the instruction fills a factor that was not trained (FFA-LoRA, RoLoRA send one)
        updates = {id(r): decode_update(r.content, refs[r.metadata.src_node_id]) for r in ok}
        changes = {
            id(r): flat_change(updates[id(r)].factors, refs[r.metadata.src_node_id]) for r in ok
        }
        honest = [changes[id(r)] for r in ok if not self._mine(r)]
        mine = [r for r in ok if self._mine(r)]
        for r in mine:
            sent_factors = refs[r.metadata.src_node_id]
            change = self._poison(changes[id(r)], honest, len(ok), len(mine), r)
            update = with_change(updates[id(r)], sent_factors, change)
            if self.attack.kind == "inflate_examples":
                update = replace(
                    update, header=replace(update.header, num_examples=self.attack.examples)
                )
            r.content = encode_update(update, instructions[r.metadata.src_node_id])

    def _poison(
        self, change: torch.Tensor, honest: list[torch.Tensor], n: int, f: int, reply: Message
    ) -> torch.Tensor:
        att, kind = self.attack, self.attack.kind
        if kind == "sign_flip":
            return -att.scale * change
        if kind == "scale":
            return att.scale * change
        if kind == "noise":
            gen = torch_generator(
                self.cfg.federation.seed, "attack", self.round, reply.metadata.src_node_id
            )
            return torch.randn(change.shape, generator=gen, dtype=torch.float64) * att.noise_std
        if kind == "nonfinite":
            out = change.clone()
            out[0] = float("nan")
            return out
        if kind == "alie":
            if len(honest) < 2:
                return change
            stack = torch.stack(honest)  # (honest, d)
            z = att.alie_z or alie_z(n, f)
            return stack.mean(0) - z * stack.std(0)
        return change  # inflate_examples: the honest change, with a large weight

    def _zo(self, replies: Sequence[Message]) -> None:
        att, kind = self.attack, self.attack.kind
        if kind == "alie":
            raise ConfigError("attack.kind = 'alie' is implemented for LoRA updates only")
        for r in replies:
            if not self._mine(r):
                continue
            u: ZoUpdate = decode_zo_update(r.content)
            g = u.scalars.astype(np.float64)
            if kind == "sign_flip":
                g = -att.scale * g
            elif kind == "scale":
                g = att.scale * g
            elif kind == "noise":
                rng = np_rng(self.cfg.federation.seed, "attack", self.round, r.metadata.src_node_id)
                g = rng.normal(0.0, att.noise_std, g.shape)
            elif kind == "nonfinite":
                g = g.copy()
                g[0] = np.nan
            header = u.header
            if kind == "inflate_examples":
                header = replace(header, num_examples=att.examples)
            r.content = encode_zo_update(
                replace(u, header=header, scalars=g.astype(u.scalars.dtype))
            )
