"""The seed/scalar family: instructions carry syncs, replies carry (block, seed, scalar)s."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from flwr.app import RecordDict

from fedpeft.changes import carrying_mean, direction_sums
from fedpeft.families.base import FlatLayout, Stamp
from fedpeft.server.validate import MB, Limits, validate_secure_reply, validate_zo_update
from fedpeft.wire.messages import SharedRecords
from fedpeft.wire.zo import (
    ZoInstruction,
    ZoUpdate,
    decode_zo_update,
    encode_zo_instruction,
)

__all__ = ["ZO", "ZoFamily"]


class ZoFamily:
    """Seed/scalar pairs (``train.zo``: :class:`ZoInstruction` -> :class:`ZoUpdate`)."""

    name = "zo"

    def instruction(self, plan: Any, stamp: Stamp) -> ZoInstruction:
        """A :class:`ZoInstruction` from a ``ZoPlan`` (codecs do not apply)."""
        return ZoInstruction(
            stamp.header, plan.spec, stamp.train, plan.sync, stamp.seed, plan.probs,
            secure=stamp.secure, dp_clip=stamp.dp_clip, dp_noise=stamp.dp_noise,
            strategy=stamp.strategy,
        )  # fmt: skip

    def encode(self, ins: ZoInstruction, shared: SharedRecords) -> RecordDict:
        """The compact seed/scalar encoding (nothing to share between clients)."""
        return encode_zo_instruction(ins)

    def payload_down(self, ins: ZoInstruction, content: RecordDict) -> int:
        """The sync's bytes and FedKSeed-Pro's probabilities (4 bytes each)."""
        return ins.sync.nbytes + (ins.probs.size * 4 if ins.probs is not None else 0)

    def auto_reply_limit(self, ins: ZoInstruction, limits: Limits) -> int:
        """1 MB + 16 bytes per pair the spec allows."""
        pairs = ins.spec.num_seeds * max(limits.zo_blocks, 1) + ins.spec.local_steps
        return MB + 16 * pairs

    def decode(
        self, content: RecordDict, ins: ZoInstruction, limits: Limits
    ) -> tuple[ZoUpdate, int]:
        """Decoded and validated (a secure reply: its header only, no pairs)."""
        zo = decode_zo_update(content)
        if ins.secure:
            validate_secure_reply(zo, ins, limits)
            return zo, 0
        validate_zo_update(zo, ins, limits)
        return zo, zo.payload_nbytes

    def choices(self, ins: ZoInstruction) -> dict[str, float]:
        """Nothing: every seed/scalar client tunes the same tensors."""
        return {}

    def flat(
        self,
        instructions: Mapping[str, Any],
        cids: Sequence[str],
        zo_blocks: int,
        scalar_clip: float = 0.0,
    ) -> FlatLayout:
        """One value per (block, seed) direction (each scalar clipped to ``scalar_clip`` first,
        when above 0); rebuilt as every survivor's update (weight 1, no pairs) with the mean on
        the first, a :class:`fedpeft.changes.FoldedZo`: exactly as summed in ``mean``, and as
        pairs carrying the mean times the survivors, so a strategy that reads pairs and takes
        ``sum_k g_k / m`` per direction gets the clients' mean too."""
        num_seeds = instructions[cids[0]].spec.num_seeds

        def rebuild(kept: list[Any], total: np.ndarray, denominator: float) -> list[Any]:
            mean = total / denominator  # (blocks * K,) float64
            out = [replace(u, header=replace(u.header, num_examples=1)) for u in kept]
            out[0] = carrying_mean(out[0], mean, len(kept), zo_blocks, num_seeds)
            return out

        def vector(update: ZoUpdate) -> np.ndarray:
            return direction_sums(update, zo_blocks, num_seeds, scalar_clip)

        def stub(update: ZoUpdate) -> ZoUpdate:
            cut = slice(0, 0)  # no pairs, as a secure reply
            return replace(update, seeds=update.seeds[cut], scalars=update.scalars[cut],
                           blocks=update.blocks[cut])  # fmt: skip

        return FlatLayout(zo_blocks * num_seeds, rebuild, vector, stub)


ZO = ZoFamily()
