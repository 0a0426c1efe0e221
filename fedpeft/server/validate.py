"""Check a client's update against the instruction it was sent, before aggregation.

A bad update is rejected alone with a :class:`~fedpeft.errors.ProtocolError` whose ``code`` is
one of :data:`~fedpeft.errors.REJECT_CODES` and whose reason names the field and the values;
the round goes on with the others. Checked: the reply's size (before decoding), the header
(protocol, run id, round, base-model fingerprint, adapter-config hash, client id,
num_examples within 1..what the client reported at discovery), the module set, every
factor's shape and rank, alpha, dtype, finite values, the L2 norm of the change to the
factors it was sent, and that a factor the instruction froze came back unchanged. A pruning
client's kept structure must lie inside the one it was told to start from, and its factors
must have that structure's shapes. Seed/scalar uploads: indices inside the pool, finite and
bounded scalars, the synced version and the upload's shape per algorithm.

Weights are bounded separately (:func:`cap_weights`): a client that reports many examples
cannot capture the average, because every weight is capped at a multiple of the median.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fedpeft.config import ValidationConfig
from fedpeft.errors import ProtocolError
from fedpeft.wire.messages import Header, LoraUpdate, TrainInstruction
from fedpeft.wire.zo import ZoInstruction, ZoUpdate

__all__ = [
    "MAX_NUM_EXAMPLES",
    "Limits",
    "cap_update",
    "cap_weights",
    "validate_secure_reply",
    "validate_update",
    "validate_zo_update",
    "weight_cap",
]

MAX_NUM_EXAMPLES = 10**9
MB = 1_000_000


@dataclass(frozen=True)
class Limits:
    """What one client's update is held to, besides its instruction.

    Attributes
    ----------
    rules : ValidationConfig
        The run's ``[validation]`` limits.
    max_examples : int
        The most examples this client may claim (what it reported at discovery).
    zo_blocks : int
        Seed/scalar strategies: blocks of the tuned tensors.
    """

    rules: ValidationConfig = ValidationConfig()
    max_examples: int = MAX_NUM_EXAMPLES
    zo_blocks: int = 1


def _check_header(got: Header, want: Header, adapter_hash: str, what: str, limit: int) -> None:
    if got.run_id != want.run_id or got.server_round != want.server_round:
        raise ProtocolError(
            f"update is for run {got.run_id!r} round {got.server_round}, this is run "
            f"{want.run_id!r} round {want.server_round}",
            "replay",
        )
    for name in ("model_fingerprint", "client_id"):
        if getattr(got, name) != getattr(want, name):
            raise ProtocolError(
                f"header {name} is {getattr(got, name)!r}, expected {getattr(want, name)!r}",
                "header",
            )
    if got.adapter_hash != adapter_hash:
        raise ProtocolError(
            f"header adapter_hash is {got.adapter_hash!r}, expected {adapter_hash!r} ({what})",
            "header",
        )
    top = min(limit, MAX_NUM_EXAMPLES)
    if not 1 <= got.num_examples <= top:
        raise ProtocolError(
            f"num_examples is {got.num_examples}, expected 1..{top} (what the client reported "
            "at discovery)",
            "num_examples",
        )


def _check_lora_header(update: LoraUpdate, ins: TrainInstruction, limits: Limits) -> None:
    spec = ins.lora
    what = f"rank {spec.rank}, alpha {spec.alpha}"
    _check_header(update.header, ins.header, spec.config_hash(), what, limits.max_examples)


def _check_zo_header(update: ZoUpdate, ins: ZoInstruction, limits: Limits) -> None:
    """The header, and that the client synced to the version it was sent (else a replay)."""
    what = f"{ins.spec.algorithm} zo spec"
    _check_header(update.header, ins.header, ins.spec.config_hash(), what, limits.max_examples)
    if update.synced_version != ins.sync.to_version:
        raise ProtocolError(
            f"client synced to version {update.synced_version}, expected {ins.sync.to_version}",
            "replay",
        )


def validate_update(update: LoraUpdate, ins: TrainInstruction, limits: Limits = Limits()) -> None:
    """Raise ``ProtocolError`` with the first problem found, or return ``None``.

    Parameters
    ----------
    update : LoraUpdate
        What the client sent.
    ins : TrainInstruction
        What the client was asked to do.
    limits : Limits
        The run's bounds and this client's example count.
    """
    _check_lora_header(update, ins, limits)
    if set(update.factors) != set(ins.adapter):
        missing = sorted(set(ins.adapter) - set(update.factors))[:3]
        extra = sorted(set(update.factors) - set(ins.adapter))[:3]
        raise ProtocolError(
            f"adapter modules differ from the instruction: missing {missing}, extra {extra}",
            "structure",
        )
    r = ins.lora.rank
    index = _pruned_index(update, ins)
    sq_norm = 0.0
    for m, f in update.factors.items():
        ref_a, ref_b = _reference(ins, m, index.get(m))
        want_a, want_b = (r, int(ref_a.shape[1])), (int(ref_b.shape[0]), r)
        if tuple(f.a.shape) != want_a or tuple(f.b.shape) != want_b:
            raise ProtocolError(
                f"{m}: got A{tuple(f.a.shape)} B{tuple(f.b.shape)}, "
                f"expected A{want_a} B{want_b} (rank {r})",
                "structure",
            )
        if f.alpha != ins.lora.alpha:
            raise ProtocolError(f"{m}: alpha {f.alpha}, expected {ins.lora.alpha}", "structure")
        for part, t, ref in (("A", f.a, ref_a), ("B", f.b, ref_b)):
            if not t.is_floating_point():
                raise ProtocolError(
                    f"{m}::{part} has dtype {t.dtype}, expected a floating dtype", "dtype"
                )
            sq = float((t.double() - _at_rank(ref, part, r)).pow(2).sum())
            # a NaN or infinity anywhere makes the sum so; only then look value by value
            if not math.isfinite(sq) and not bool(torch.isfinite(t).all()):
                raise ProtocolError(f"{m}::{part} contains NaN or infinite values", "nonfinite")
            if part not in ins.parts and not torch.equal(t, ref):
                raise ProtocolError(
                    f"{m}::{part} changed, but the instruction trains only {ins.parts}", "frozen"
                )
            sq_norm += sq
    bound = limits.rules.max_update_norm
    norm = math.sqrt(sq_norm)
    if bound > 0 and norm > bound:
        raise ProtocolError(
            f"update changes the factors by L2 norm {norm:.4g}, above validation.max_update_norm "
            f"= {bound:g}",
            "norm",
        )


def _at_rank(ref: torch.Tensor, part: str, r: int) -> torch.Tensor:
    """``ref`` truncated or zero-padded to rank ``r`` (A: rows, B: columns), as float64."""
    if (ref.shape[0] if part == "A" else ref.shape[1]) == r:
        return ref.double()  # already at rank r
    t = ref.double() if part == "A" else ref.double().T  # (r_ref, n)
    out = torch.zeros((r, t.shape[1]), dtype=torch.float64)
    k = min(r, t.shape[0])
    out[:k] = t[:k]
    return out if part == "A" else out.T


def _reference(
    ins: TrainInstruction, module: str, index: tuple[Any, Any] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors ``module`` was sent, cut to a pruned client's final structure."""
    ref = ins.adapter[module]
    a, b = ref.a, ref.b  # (r, in), (out, r)
    if index is not None:
        rows, cols = index
        if rows is not None:
            b = b[torch.as_tensor(rows, dtype=torch.long)]
        if cols is not None:
            a = a[:, torch.as_tensor(cols, dtype=torch.long)]
    return a, b


def _pruned_index(update: LoraUpdate, ins: TrainInstruction) -> dict[str, tuple[Any, Any]]:
    """Kept (B rows, A columns) of every module a pruning client's final structure touches."""
    plan = ins.prune
    if plan is None:
        if update.keep is not None:
            raise ProtocolError(
                "update carries a pruned structure, but none was asked for", "structure"
            )
        return {}
    if update.keep is None:
        raise ProtocolError(
            "update carries no kept structure, but the instruction prunes", "structure"
        )
    start, keeps = plan.start(), plan.layout.decode(update.keep)
    for i, (k0, k) in enumerate(zip(start, keeps, strict=True)):
        if not (set(k.attn) <= set(k0.attn) and set(k.ffn) <= set(k0.ffn)):
            raise ProtocolError(
                f"kept structure of layer {i} restores groups pruned before", "structure"
            )
    start_index = {m: plan.layout.factor_index(m, start) for m in ins.adapter}
    out: dict[str, tuple[Any, Any]] = {}
    for m in ins.adapter:
        rows, cols = plan.layout.factor_index(m, keeps)
        rows0, cols0 = start_index[m]
        # positions of the final structure's rows inside the (already cut) instruction factors
        out[m] = (_positions(rows, rows0), _positions(cols, cols0))
    return out


def _positions(kept: Any, start: Any) -> list[int] | None:
    # kept and start index the same module under two structures: both None (a module pruning
    # does not touch) or both index lists (factor_index lists every kept feature)
    if kept is None:
        return None
    where = {int(v): i for i, v in enumerate(start)}
    return [where[int(v)] for v in kept]


def validate_zo_update(update: ZoUpdate, ins: ZoInstruction, limits: Limits = Limits()) -> None:
    """Raise ``ProtocolError`` unless a seed/scalar update fits its instruction.

    Checked besides the header: every seed index inside the pool, finite scalars no larger
    than ``validation.max_scalar``, the synced version, and per algorithm the shape of the
    upload (FedKSeed: exactly ``local_steps`` pairs, no blocks; Ferret: block indices in
    range, each (block, seed) at most once).
    """
    spec, num_blocks = ins.spec, limits.zo_blocks
    _check_zo_header(update, ins, limits)
    if len(update.seeds) and int(update.seeds.max()) >= spec.num_seeds:
        raise ProtocolError(
            f"seed index {int(update.seeds.max())} is outside the pool 0..{spec.num_seeds - 1}",
            "seed_range",
        )
    scalars = update.scalars.astype(np.float64)
    if not np.isfinite(scalars).all():
        raise ProtocolError("scalars contain NaN or infinite values", "nonfinite")
    bound = limits.rules.max_scalar
    if bound > 0 and len(scalars) and float(np.abs(scalars).max()) > bound:
        raise ProtocolError(
            f"scalar {float(np.abs(scalars).max()):.4g} is above validation.max_scalar = {bound:g}",
            "norm",
        )
    if spec.algorithm == "fedkseed":
        if len(update.seeds) != spec.local_steps or len(update.blocks):
            raise ProtocolError(
                f"fedkseed upload has {len(update.seeds)} pairs and {len(update.blocks)} block "
                f"indices, expected {spec.local_steps} pairs and none",
                "structure",
            )
        return
    if len(update.blocks) != len(update.seeds):
        raise ProtocolError(
            f"ferret upload has {len(update.blocks)} blocks for {len(update.seeds)} seeds",
            "structure",
        )
    if len(update.blocks) and int(update.blocks.max()) >= num_blocks:
        raise ProtocolError(
            f"block index {int(update.blocks.max())} outside 0..{num_blocks - 1}", "seed_range"
        )
    pairs = update.blocks.astype(np.int64) * spec.num_seeds + update.seeds.astype(np.int64)
    if len(np.unique(pairs)) != len(pairs):
        raise ProtocolError("ferret upload repeats a (block, seed) pair", "seed_range")


def _secure_zo(update: ZoUpdate, ins: ZoInstruction, limits: Limits) -> None:
    _check_zo_header(update, ins, limits)
    if len(update.seeds) or len(update.scalars):
        raise ProtocolError("a secure-aggregation reply must carry no pairs", "structure")


def _secure_lora(update: LoraUpdate, ins: TrainInstruction, limits: Limits) -> None:
    _check_lora_header(update, ins, limits)
    if update.factors:
        raise ProtocolError("a secure-aggregation reply must carry no tensors", "structure")


_SECURE: dict[str, Callable[[Any, Any, Limits], None]] = {"zo": _secure_zo, "lora": _secure_lora}


def validate_secure_reply(
    update: LoraUpdate | ZoUpdate, ins: TrainInstruction | ZoInstruction, limits: Limits = Limits()
) -> None:
    """A reply to a ``secure`` instruction: the header only, no tensors and no pairs.

    Its values reach the coordinator only as part of the secure sum, so only the header
    (run, round, fingerprint, adapter hash, client, num_examples) and, for seed/scalar
    training, the synced version can be checked here.
    """
    if update.family != ins.family:
        raise ProtocolError("reply kind does not match the instruction", "decode")
    _SECURE[ins.family](update, ins, limits)


def weight_cap(counts: Sequence[int], ratio: float) -> int | None:
    """The largest weight an update gets: ``ratio`` times the median of ``counts``, at least 1;
    ``None`` when ``ratio`` is 0 (no cap) or there are no counts."""
    if ratio <= 0 or not counts:
        return None
    return max(1, math.floor(ratio * float(np.median(list(counts)))))


def cap_update(update: Any, cap: int | None) -> tuple[Any, bool]:
    """``update`` with its ``num_examples`` cut to ``cap``, and whether it was cut."""
    if cap is None or update.header.num_examples <= cap:
        return update, False
    return replace(update, header=replace(update.header, num_examples=cap)), True


def cap_weights(updates: Sequence[Any], ratio: float) -> tuple[list[Any], int]:
    """Cap every update's ``num_examples`` at ``ratio`` times the median; returns how many.

    The median is over the given updates (after validation), so fewer than half of them
    cannot move it far; ``ratio = 0`` leaves the weights alone.
    """
    cap = weight_cap([u.header.num_examples for u in updates], ratio)
    out, capped = [], 0
    for u in updates:
        u, cut = cap_update(u, cap)
        out.append(u)
        capped += cut
    return out, capped
