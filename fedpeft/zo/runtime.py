"""The tuned tensors of a zeroth-order run on one process's model, and how they are synced.

A :class:`ZoRuntime` owns, for one base model and one :class:`~fedpeft.wire.zo.ZoSpec`:

- the tuned tensors: every floating parameter of the base model (``target = "full"``, named
  as in the unwrapped model, tied weights once) or the LoRA factors of one adapter
  (``target = "lora"``, named ``<module>::A`` / ``<module>::B``, starting from the run's
  deterministic initial adapter);
- their grouping into blocks (one block for FedKSeed; packed blocks of about ``block_numel``
  elements for Ferret);
- a float32 snapshot ``G`` of the tuned tensors at the synced global state, and the
  coefficients ``coeffs[b, k]`` that produced it: ``G = theta_0 - sum coeffs[b, k] z_{b,k}``.

Syncing to new coefficients regenerates only the directions whose coefficients changed (at
most K full-model regenerations, however many rounds were missed) and is counted. After a
client's local training the parameters are restored from ``G`` by a plain copy, exactly.
Memory: one float32 copy of the tuned tensors (``G``).

A seed/scalar variant may restrict its directions with a :class:`DirectionMask` (Sparse MeZO,
Liu et al. 2024, perturbs only a subset of the weights): the runtime computes each tuned
tensor's 0/1 mask once from theta_0 and every direction it hands out -- for local steps,
projections and syncs alike -- is ``z * mask``, so every node replays the same masked
directions. The spec names the mask (``ZoSpec.mask``, its ``repr``); a runtime built with
another mask refuses the spec.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, Protocol

import numpy as np
import torch

from fedpeft.cache import PROCESS_CACHE, ProcessCache
from fedpeft.errors import ProtocolError
from fedpeft.lora.handle import ModelHandle, init_factors
from fedpeft.seeding import derive_seed
from fedpeft.wire.zo import ZoSpec, ZoSync
from fedpeft.zo import fused, rng

__all__ = [
    "DirectionMask",
    "ZoRuntime",
    "discard_changed_models",
    "full_tensors",
    "get_runtime",
    "make_blocks",
    "mask_id",
]


class DirectionMask(Protocol):
    """Which coordinates of a tuned tensor a variant perturbs (a seed/scalar algorithm hook).

    Called once per tuned tensor with its name and its initial value theta_0; returns a bool
    tensor of the same shape (True: perturbed) or ``None`` (the whole tensor). It must be a
    pure function of its arguments (every node computes it) and its ``repr`` must name its
    parameters (a frozen dataclass does both): the repr travels in ``ZoSpec.mask``.
    """

    def __call__(self, name: str, initial: torch.Tensor) -> torch.Tensor | None: ...


def mask_id(mask: DirectionMask | None) -> str:
    """What ``ZoSpec.mask`` holds for ``mask`` (``""``: unmasked directions)."""
    return "" if mask is None else repr(mask)


def full_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every floating parameter of a (possibly peft-wrapped) model, under its unwrapped name.

    LoRA parameters are left out; a tied weight appears once (``named_parameters`` dedups).
    """
    out: list[tuple[str, torch.Tensor]] = []
    for name, p in model.named_parameters():
        if "lora_" in name or not p.is_floating_point():
            continue
        out.append((name.replace(".base_layer", ""), p))
    return out


def make_blocks(numels: list[int], block_numel: int) -> list[int]:
    """Block id of each tensor: consecutive tensors packed until a block holds ``block_numel``
    elements (0: the median tensor size, as Ferret does)."""
    target = block_numel if block_numel > 0 else max(1, int(statistics.median(numels)))
    ids, block, size = [], 0, 0
    for n in numels:
        if size >= target:
            block, size = block + 1, 0
        ids.append(block)
        size += n
    return ids


class ZoRuntime:
    """Tuned tensors, their synced snapshot and coefficients (see the module docstring).

    Parameters
    ----------
    handle : ModelHandle
        The process's shared model.
    spec : ZoSpec
        What is tuned and how directions are drawn.
    mask : DirectionMask | None
        The variant's direction mask; must be the one ``spec.mask`` names.
    """

    def __init__(
        self, handle: ModelHandle, spec: ZoSpec, mask: DirectionMask | None = None
    ) -> None:
        if mask_id(mask) != spec.mask:
            raise ProtocolError(
                f"the coordinator's seed/scalar directions are masked by {spec.mask or 'nothing'}"
                f", this node's algorithm by {mask_id(mask) or 'nothing'}; run the same "
                "algorithm (strategy.name) on both sides"
            )
        self.handle = handle
        self.spec = spec
        self._adapter: str | None = None
        self._origin: dict[str, Any] = {}
        if spec.target == "lora":
            if spec.lora is None:
                raise ProtocolError("zo target 'lora' needs a LoRA spec")
            self._adapter = handle.ensure_adapter(spec.lora)
            self._origin = init_factors(
                handle.module_shapes(self._adapter), spec.lora, spec.pool_seed
            )
            handle.set_factors(self._adapter, self._origin)
            pairs = []
            for module, layer in handle.lora_layers(self._adapter):
                pairs += [(f"{module}::A", layer.lora_A[self._adapter].weight)]
                pairs += [(f"{module}::B", layer.lora_B[self._adapter].weight)]
        else:
            pairs = full_tensors(handle.base_model)
        self.names = [n for n, _ in pairs]
        self.params = [p for _, p in pairs]
        self.blocks = (
            make_blocks([p.numel() for p in self.params], spec.block_numel)
            if spec.algorithm == "ferret"
            else [0] * len(pairs)
        )
        self.num_blocks = max(self.blocks) + 1
        self.numels = [p.numel() for p in self.params]
        self.numel = sum(self.numels)
        self._members = [
            [i for i, b in enumerate(self.blocks) if b == blk] for blk in range(self.num_blocks)
        ]
        self.block_numel = np.bincount(
            self.blocks, weights=[p.numel() for p in self.params]
        ).astype(np.int64)
        with torch.no_grad():
            self.snapshot = [p.detach().float().clone() for p in self.params]
        self.masks = [
            _flat_mask(mask, n, g) for n, g in zip(self.names, self.snapshot, strict=True)
        ]
        self.coeffs = np.zeros((self.num_blocks, spec.num_seeds), np.float32)
        self.version = 0
        self._seeds = [derive_seed(spec.pool_seed, "zo-pool", k) for k in range(spec.num_seeds)]

    @property
    def adapter(self) -> str:
        """The LoRA adapter whose factors are tuned (``""`` when the target is the base)."""
        return self._adapter or ""

    def state_tensors(self) -> list[torch.Tensor]:
        """Tensors the runtime holds besides the model (the synced snapshot, direction masks)."""
        return [*self.snapshot, *(m for m in self.masks if isinstance(m, torch.Tensor))]

    def seed(self, k: int) -> int:
        """The 63-bit seed of pool entry ``k``."""
        return self._seeds[k]

    def tensors(self, block: int | None = None) -> Iterator[tuple[int, str, torch.Tensor]]:
        """``(index, name, param)`` of the tuned tensors (of one block)."""
        for i, (name, p) in enumerate(zip(self.names, self.params, strict=True)):
            if block is None or self.blocks[i] == block:
                yield i, name, p

    @contextlib.contextmanager
    def model(self) -> Iterator[Any]:
        """The model whose forward uses the tuned tensors (eval mode, no grad tracking)."""
        if self._adapter is not None:
            m = self.handle.peft_model(self._adapter)
            m.eval()
            yield m
            return
        with self.handle.adapters_disabled():
            self.handle.base_model.eval()
            yield self.handle.base_model

    def directions(
        self, seed: int, block: int | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(tensor index, offset, z piece)`` of direction ``z(seed)`` over the tuned tensors
        (of one ``block``), masked by the variant's :class:`DirectionMask` if it has one."""
        members = list(range(len(self.params))) if block is None else self._members[block]
        return self._masked(seed, members)

    def _masked(self, seed: int, members: list[int]) -> Iterator[tuple[int, int, torch.Tensor]]:
        """:meth:`directions` over the tuned tensors ``members``."""
        if not members:
            return
        device = self.snapshot[members[0]].device
        names, numels = [self.names[i] for i in members], [self.numels[i] for i in members]
        for j, s, z in rng.segments(seed, names, numels, self.spec.dist, device):
            i = members[j]
            mask = self.masks[i]
            yield i, s, (z if mask is None else z * mask[s : s + z.numel()])

    def add_direction_(
        self, targets: list[torch.Tensor], seed: int, alpha: float, block: int | None = None
    ) -> None:
        """``targets[i] += alpha * z(seed)`` for every tuned tensor ``i`` (of one ``block``),
        masked as :meth:`directions` masks; ``targets`` are float32 tensors shaped as the
        tuned ones (the parameters or the snapshot). Large tensors go through the fused kernel
        (:mod:`fedpeft.zo.fused`, one pass each), the rest through :meth:`directions`; the
        bits are those of adding :meth:`directions`' pieces one by one."""
        self.add_directions_(targets, [seed], [alpha], block)

    def add_directions_(
        self,
        targets: list[torch.Tensor],
        seeds: list[int],
        alphas: list[float],
        block: int | None = None,
    ) -> None:
        """:meth:`add_direction_` for each ``(seed, alpha)`` in order, same bits; the fused
        kernel adds several seeds per pass over a large tensor (:func:`fused.add_many_`)."""
        members = range(len(self.params)) if block is None else self._members[block]
        small = []
        for i in members:
            if self.numels[i] >= fused.MIN_NUMEL and fused.available():
                flat = targets[i].view(-1)
                fused.add_many_(flat, seeds, self.names[i], alphas, self.spec.dist, 0,
                                self.masks[i])  # fmt: skip
            else:
                small.append(i)
        for seed, alpha in zip(seeds, alphas, strict=True):
            for i, s, z in self._masked(seed, small):
                targets[i].view(-1)[s : s + z.numel()].add_(z, alpha=alpha)

    def pieces(self, block: int, k: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(tensor index, offset, z piece)`` of pool direction ``k`` over ``block``."""
        return self.directions(self.seed(k), block)

    # ------------------------------------------------------------------ syncing
    def restore(self) -> None:
        """Put the synced global values back into the parameters (exact copy)."""
        with torch.no_grad():
            for p, g in zip(self.params, self.snapshot, strict=True):
                p.copy_(g)

    def _apply_coeff_changes(self, new: np.ndarray) -> float:
        """Move ``G`` from ``self.coeffs`` to ``new``; return full-model regenerations used."""
        diff = new.astype(np.float64) - self.coeffs.astype(np.float64)
        regens = 0.0
        with torch.no_grad():
            for b in range(self.num_blocks):  # each tensor in one block: seeds in pool order
                ks = np.nonzero(diff[b])[0]
                if len(ks):
                    seeds = [self.seed(int(k)) for k in ks]
                    self.add_directions_(self.snapshot, seeds, [-float(d) for d in diff[b, ks]], b)
                    regens += len(ks) * float(self.block_numel[b]) / self.numel
        self.coeffs = new.astype(np.float32)
        return regens

    def sync(self, sync: ZoSync) -> float:
        """Bring the tuned tensors to ``sync.to_version``; returns regenerations used.

        Raises
        ------
        ProtocolError
            If the sync is incremental and starts after this runtime's version (state was
            lost: the coordinator must send a full sync), or indexes outside the pool.
        """
        if self.version == sync.to_version and not sync.full:
            self.restore()
            return 0.0
        if not sync.full and self.version < sync.from_version:
            raise ProtocolError(
                f"this node holds zo version {self.version} but the sync starts at "
                f"{sync.from_version}; a full sync is needed"
            )
        new = np.zeros_like(self.coeffs) if sync.full else self.coeffs.copy()
        if sync.dense:
            if sync.values.size != new.size:
                raise ProtocolError(
                    f"dense zo sync has {sync.values.size} values, expected {new.size}"
                )
            new = sync.values.reshape(new.shape).astype(np.float32)
        elif len(sync.seeds):
            blocks = (
                sync.blocks.astype(np.int64)
                if len(sync.blocks)
                else np.zeros(len(sync.seeds), np.int64)
            )
            if sync.seeds.max() >= new.shape[1] or blocks.max() >= new.shape[0]:
                raise ProtocolError("zo sync indexes outside the seed pool or block range")
            new[blocks, sync.seeds.astype(np.int64)] = sync.values
        if not new.any() and self._adapter is not None:
            self.rewind()  # back to the exact initial adapter (a new run in this process)
            self.version = sync.to_version
            return 0.0
        regens = self._apply_coeff_changes(new)
        self.version = sync.to_version
        self.restore()
        return regens

    def set_global(self, coeffs: np.ndarray, version: int) -> float:
        """Sync to a dense coefficient matrix (the coordinator's evaluator)."""
        if version == self.version:
            self.restore()
            return 0.0
        return self.sync(
            ZoSync(
                from_version=0, to_version=version, values=coeffs.reshape(-1), dense=True, full=True
            )
        )

    def rewind(self) -> None:
        """Return the tuned tensors to theta_0 (before another run reuses this model).

        Exact for the LoRA target (the initial adapter is recomputed); for the full model the
        coefficients are subtracted again, exact up to float32 rounding.
        """
        if self._adapter is not None:
            self.handle.set_factors(self._adapter, self._origin)
            with torch.no_grad():
                self.snapshot = [p.detach().float().clone() for p in self.params]
            self.coeffs = np.zeros_like(self.coeffs)
        else:
            self._apply_coeff_changes(np.zeros_like(self.coeffs))
        self.version = 0
        self.restore()


def _flat_mask(mask: DirectionMask | None, name: str, initial: torch.Tensor) -> torch.Tensor | None:
    """``mask(name, theta_0)`` flattened to float32 0/1 (None: the whole tensor)."""
    if mask is None:
        return None
    got = mask(name, initial)
    if got is None:
        return None
    if got.shape != initial.shape:
        raise ProtocolError(
            f"direction mask {mask!r} gave shape {tuple(got.shape)} for {name}, "
            f"expected {tuple(initial.shape)}"
        )
    return got.reshape(-1).to(device=initial.device, dtype=torch.float32)


def get_runtime(
    handle: ModelHandle,
    spec: ZoSpec,
    cache: ProcessCache = PROCESS_CACHE,
    mask: DirectionMask | None = None,
) -> ZoRuntime:
    """The process's runtime for ``spec`` on ``handle`` (``mask``: the variant's), built once.

    A full-model runtime changes the shared base weights; if another full-model runtime was
    active on the same model (another run in this process), it is rewound to theta_0 first.
    """
    key = f"zo:{id(handle)}:" + json.dumps(asdict(spec), sort_keys=True, default=str)

    def build() -> ZoRuntime:
        active = getattr(handle, "zo_active", None)
        if active is not None and active.spec.target == "full":
            active.rewind()
        rt = ZoRuntime(handle, spec, mask)
        handle.zo_active = rt
        return rt

    rt = cache.get(key, build)
    if spec.target == "full" and getattr(handle, "zo_active", None) is not rt:
        rt.restore()  # the weights are shared: put this runtime's synced values back
        handle.zo_active = rt
    return rt


def discard_changed_models(cache: ProcessCache = PROCESS_CACHE) -> int:
    """Forget every base model whose weights a full-model runtime changed, with its runtimes.

    A full-model run tunes the shared base weights in place; rewinding them by subtracting the
    coefficients again is exact only up to float32 rounding. Dropping the model instead makes
    the next run in this process load the true base, bit for bit. Returns the entries dropped.
    """
    changed = {id(rt.handle) for _, rt in cache.items("zo:") if rt.spec.target == "full"}
    if not changed:
        return 0

    def stale(key: str, value: Any) -> bool:
        return id(value) in changed or (key.startswith("zo:") and int(key.split(":")[1]) in changed)

    return cache.discard(stale)
