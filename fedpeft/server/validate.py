"""Check a client's update against the instruction it was sent, before aggregation.

A bad update is rejected alone, with a reason naming the field and the values; the round
goes on with the others. Checked: the header (protocol, run id, round, base-model fingerprint,
adapter-config hash, client id, num_examples), the module set, every factor's shape and rank,
alpha, dtype, that all values are finite, and that a factor the instruction froze came back
unchanged. A pruning client's kept structure must lie inside the one it was told to start
from, and its factors must have that structure's shapes.
"""

from __future__ import annotations

import numpy as np
import torch

from fedpeft.errors import ProtocolError
from fedpeft.wire import Header, LoraUpdate, TrainInstruction
from fedpeft.wire_zo import ZoInstruction, ZoUpdate

__all__ = ["validate_update", "validate_zo_update"]

MAX_NUM_EXAMPLES = 10**9


def _check_header(got: Header, want: Header, adapter_hash: str, what: str) -> None:
    for name in ("run_id", "server_round", "model_fingerprint", "client_id"):
        if getattr(got, name) != getattr(want, name):
            raise ProtocolError(
                f"header {name} is {getattr(got, name)!r}, expected {getattr(want, name)!r}"
            )
    if got.adapter_hash != adapter_hash:
        raise ProtocolError(
            f"header adapter_hash is {got.adapter_hash!r}, expected {adapter_hash!r} ({what})"
        )
    if not 1 <= got.num_examples <= MAX_NUM_EXAMPLES:
        raise ProtocolError(f"num_examples is {got.num_examples}, expected 1..{MAX_NUM_EXAMPLES}")


def validate_update(update: LoraUpdate, ins: TrainInstruction) -> None:
    """Raise ``ProtocolError`` with the first problem found, or return ``None``.

    Parameters
    ----------
    update : LoraUpdate
        What the client sent.
    ins : TrainInstruction
        What the client was asked to do.
    """
    _check_header(
        update.header,
        ins.header,
        ins.lora.config_hash(),
        f"rank {ins.lora.rank}, alpha {ins.lora.alpha}",
    )
    if set(update.factors) != set(ins.adapter):
        missing = sorted(set(ins.adapter) - set(update.factors))[:3]
        extra = sorted(set(update.factors) - set(ins.adapter))[:3]
        raise ProtocolError(
            f"adapter modules differ from the instruction: missing {missing}, extra {extra}"
        )
    r = ins.lora.rank
    sizes = _pruned_sizes(update, ins)
    for m, f in update.factors.items():
        ref = ins.adapter[m]
        out_k, in_k = sizes.get(m, (int(ref.b.shape[0]), int(ref.a.shape[1])))
        want_a, want_b = (r, in_k), (out_k, r)
        if tuple(f.a.shape) != want_a or tuple(f.b.shape) != want_b:
            raise ProtocolError(
                f"{m}: got A{tuple(f.a.shape)} B{tuple(f.b.shape)}, "
                f"expected A{want_a} B{want_b} (rank {r})"
            )
        if f.alpha != ins.lora.alpha:
            raise ProtocolError(f"{m}: alpha {f.alpha}, expected {ins.lora.alpha}")
        for part, t in (("A", f.a), ("B", f.b)):
            if part not in ins.parts and not torch.equal(t, getattr(ref, part.lower())):
                raise ProtocolError(
                    f"{m}::{part} changed, but the instruction trains only {ins.parts}"
                )
            if not t.is_floating_point():
                raise ProtocolError(f"{m}::{part} has dtype {t.dtype}, expected a floating dtype")
            if not bool(torch.isfinite(t).all()):
                raise ProtocolError(f"{m}::{part} contains NaN or infinite values")


def _pruned_sizes(update: LoraUpdate, ins: TrainInstruction) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every module a pruning client's final structure touches."""
    plan = ins.prune
    if plan is None:
        if update.keep is not None:
            raise ProtocolError("update carries a pruned structure, but none was asked for")
        return {}
    if update.keep is None:
        raise ProtocolError("update carries no kept structure, but the instruction prunes")
    start, keeps = plan.start(), plan.layout.decode(update.keep)
    for i, (k0, k) in enumerate(zip(start, keeps, strict=True)):
        if not (set(k.attn) <= set(k0.attn) and set(k.ffn) <= set(k0.ffn)):
            raise ProtocolError(f"kept structure of layer {i} restores groups pruned before")
    out: dict[str, tuple[int, int]] = {}
    for m, ref in ins.adapter.items():
        rows, cols = plan.layout.factor_index(m, keeps)
        out_k = len(rows) if rows is not None else int(ref.b.shape[0])
        in_k = len(cols) if cols is not None else int(ref.a.shape[1])
        out[m] = (out_k, in_k)
    return out


def validate_zo_update(update: ZoUpdate, ins: ZoInstruction, num_blocks: int) -> None:
    """Raise ``ProtocolError`` unless a seed/scalar update fits its instruction.

    Checked besides the header: every seed index inside the pool, finite scalars, the synced
    version, and per algorithm the shape of the upload (FedKSeed: exactly ``local_steps``
    pairs, no blocks; Ferret: block indices in range, each (block, seed) at most once).
    """
    spec = ins.spec
    _check_header(update.header, ins.header, spec.config_hash(), f"{spec.algorithm} zo spec")
    if update.synced_version != ins.sync.to_version:
        raise ProtocolError(
            f"client synced to version {update.synced_version}, expected {ins.sync.to_version}"
        )
    if len(update.seeds) and int(update.seeds.max()) >= spec.num_seeds:
        raise ProtocolError(
            f"seed index {int(update.seeds.max())} is outside the pool 0..{spec.num_seeds - 1}"
        )
    if not np.isfinite(update.scalars.astype(np.float64)).all():
        raise ProtocolError("scalars contain NaN or infinite values")
    if spec.algorithm == "fedkseed":
        if len(update.seeds) != spec.local_steps or len(update.blocks):
            raise ProtocolError(
                f"fedkseed upload has {len(update.seeds)} pairs and {len(update.blocks)} block "
                f"indices, expected {spec.local_steps} pairs and none"
            )
        return
    if len(update.blocks) != len(update.seeds):
        raise ProtocolError(
            f"ferret upload has {len(update.blocks)} blocks for {len(update.seeds)} seeds"
        )
    if len(update.blocks) and int(update.blocks.max()) >= num_blocks:
        raise ProtocolError(f"block index {int(update.blocks.max())} outside 0..{num_blocks - 1}")
    pairs = update.blocks.astype(np.int64) * spec.num_seeds + update.seeds.astype(np.int64)
    if len(np.unique(pairs)) != len(pairs):
        raise ProtocolError("ferret upload repeats a (block, seed) pair")
