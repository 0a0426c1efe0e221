"""Client-side local training of the zeroth-order algorithms.

**FedKSeed** (Qin et al., ICML 2024, arXiv:2312.06353): ``local_steps`` two-point ZO-SGD
steps. Step t picks a pool seed ``k_t`` (uniformly, or with FedKSeed-Pro's probabilities),
perturbs the tuned tensors by ``+eps z`` and ``-eps z``, computes
``g = (L+ - L-) / (2 eps)`` on one batch and applies ``theta -= lr * g * z``. The client
uploads ``(k_t, g_t)``. Deviations from the reference code: directions come from
:mod:`fedpeft.zo.rng` (device independent; Rademacher by default), the restore and the update
are fused into one pass (3 regenerations per step instead of 4, or 1 with ``keep_z``), updates
are in place and chunked, and low-precision parameters are driven from float32 masters so
perturb/restore is exact (the reference keeps fp16 weights and drifts, MeZO issue #42).
A step whose loss is not finite is undone and reported with ``g = 0``.

**Ferret** (Shu et al. 2024, arXiv:2409.06277): ordinary first-order SGD steps on the tuned
tensors, then the update ``delta = theta_old - theta_new`` of each block ``b`` is projected on
``L_b`` pool directions: ``c_{b,j} = <delta_b, z_{b,j}> / L_b``, uploaded as (b, j, c).
``sum_j c_{b,j} z_{b,j}`` is an unbiased estimate of ``delta_b`` because the directions have
identity covariance (``E[z z^T] = I``). The reference draws directions that are nearly uniform on
``[-1/sqrt(d), 1/sqrt(d)]`` (``E[z z^T] = I / (3 d)``) and scales by ``d_b / L_b``, which
reconstructs ``delta / 3``; it then needs a server learning rate of 10. Here the
reconstruction is unbiased, so a server learning rate of 1 is plain FedAvg in expectation.
The budget of directions is split over blocks in proportion to their update norms (largest
remainder), at least one per block.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedpeft.client.memory import MemoryMeter
from fedpeft.seeding import derive_seed, scoped_torch_seed
from fedpeft.wire.zo import ZoSpec
from fedpeft.zo.runtime import ZoRuntime

__all__ = [
    "LocalResult",
    "LocalZo",
    "allocate",
    "fedkseed_local",
    "ferret_local",
    "project",
    "reconstruct",
]

LossFn = Callable[[dict[str, torch.Tensor]], float]


@dataclass
class LocalResult:
    """What local training produced: the triples to upload and a few measurements."""

    seeds: np.ndarray
    scalars: np.ndarray
    blocks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint16))
    metrics: dict[str, float] = field(default_factory=dict)


class LocalZo:
    """Perturb and update a runtime's tuned tensors along one direction at a time.

    Parameters whose dtype is not float32 (or all, with ``master = "always"``) are driven from
    a float32 master copy: ``p = round(M + offset * z)``, so moving back to offset 0 gives back
    exactly ``round(M)``. Float32 parameters without a master are changed in place; there a
    perturb/restore cycle is exact only up to float32 rounding.
    """

    def __init__(self, rt: ZoRuntime, spec: ZoSpec) -> None:
        self.rt = rt
        self.spec = spec
        # Masters start from the synced global (G, exact) when the parameters hold it.
        self.masters: list[torch.Tensor | None] = [
            (g.clone() if torch.equal(p.detach(), g.to(p.dtype)) else p.detach().float().clone())
            if (spec.master == "always" or p.dtype != torch.float32)
            else None
            for p, g in zip(rt.params, rt.snapshot, strict=True)
        ]
        self.offset = 0.0
        self.regenerations = 0
        self._z: list[torch.Tensor] | None = None  # keep_z: float32 buffers, allocated once
        self._seed = 0

    def begin(self, seed: int) -> None:
        """Start a step along z(seed); with ``keep_z`` the direction is generated once here."""
        self._seed = seed
        if not self.spec.keep_z:
            return
        if self._z is None:
            self._z = [
                torch.empty(p.numel(), dtype=torch.float32, device=p.device) for p in self.rt.params
            ]
        for i, s, z in self._generate():
            self._z[i][s : s + z.numel()].copy_(z)
        self.regenerations += 1

    def _generate(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        return self.rt.directions(self._seed)

    def _pieces(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        if self._z is not None:
            return ((i, 0, z) for i, z in enumerate(self._z))
        return self._generate()

    @torch.no_grad()
    def _pass(self, new_offset: float, master_step: float) -> None:
        if self._z is None and not any(m is not None for m in self.masters):
            # every tuned tensor float32, changed in place: one fused pass per large tensor
            alpha = new_offset - self.offset + master_step
            self.rt.add_direction_(self.rt.params, self._seed, alpha)
            self.regenerations += 1
            self.offset = new_offset
            return
        for i, s, z in self._pieces():
            flat, master = self.rt.params[i].view(-1), self.masters[i]
            e = s + z.numel()
            if master is None:
                flat[s:e].add_(z.to(flat.dtype), alpha=new_offset - self.offset + master_step)
            else:
                m = master.view(-1)[s:e]
                if master_step:
                    m.add_(z, alpha=master_step)
                flat[s:e].copy_(m + new_offset * z if new_offset else m)
        if self._z is None:
            self.regenerations += 1
        self.offset = new_offset

    def perturb(self, offset: float) -> None:
        """Move the parameters to ``local point + offset * z``."""
        self._pass(offset, 0.0)

    def update(self, delta: float) -> None:
        """Fused restore + update: parameters to ``local point + delta * z`` (offset back to 0)."""
        self._pass(0.0, delta)


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[list[int]]:
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n, batch_size):
            yield order[i : i + batch_size]


def fedkseed_local(
    rt: ZoRuntime,
    spec: ZoSpec,
    batch_of: Callable[[list[int]], dict[str, torch.Tensor]],
    num_examples: int,
    batch_size: int,
    seed: int,
    probs: np.ndarray | None = None,
    restore: bool = True,
) -> LocalResult:
    """``spec.local_steps`` FedKSeed steps from the current parameters.

    With ``restore`` (the protocol) the synced global values are put back afterwards; without,
    the parameters keep the local trajectory (tests compare it with the coordinator's view).
    """
    gen = np.random.default_rng(seed)
    batches = _batches(num_examples, batch_size, torch.Generator().manual_seed(seed))
    local = LocalZo(rt, spec)
    ks = np.zeros(spec.local_steps, np.int64)
    gs = np.zeros(spec.local_steps, np.float64)
    losses, t0, fwd = [], time.perf_counter(), 0.0
    with rt.model() as model, torch.no_grad():

        def loss(batch: dict[str, torch.Tensor]) -> float:
            return float(model(**batch).loss)

        for t in range(spec.local_steps):
            k = int(
                gen.choice(spec.num_seeds, p=probs)
                if probs is not None
                else gen.integers(spec.num_seeds)
            )
            batch = batch_of(next(batches))
            local.begin(rt.seed(k))
            local.perturb(spec.eps)
            f0 = time.perf_counter()
            lp = loss(batch)
            fwd += time.perf_counter() - f0
            local.perturb(-spec.eps)
            f0 = time.perf_counter()
            lm = loss(batch)
            fwd += time.perf_counter() - f0
            g = (lp - lm) / (2 * spec.eps)
            if not math.isfinite(g):
                g = 0.0
            local.update(-spec.lr * g)
            ks[t], gs[t] = k, g
            losses.append((lp + lm) / 2)
    if restore:
        rt.restore()
    steps = max(spec.local_steps, 1)
    return LocalResult(
        seeds=ks,
        scalars=gs,
        metrics={
            "train_loss": float(np.mean(losses)) if losses else 0.0,
            "steps": float(spec.local_steps),
            "regens_per_step": local.regenerations / steps,
            "step_s": (time.perf_counter() - t0) / steps,
            "forward_s": fwd / (2 * steps),
        },
    )


def allocate(norms: Sequence[float], budget: int, cap: int) -> list[int]:
    """Directions per block: proportional to ``norms`` (largest remainder), >= 1, <= ``cap``."""
    norms_a = np.asarray(norms, np.float64)
    total = norms_a.sum()
    share = norms_a / total * budget if total > 0 else np.full(len(norms_a), budget / len(norms_a))
    out = np.floor(share).astype(np.int64)
    for i in np.argsort(-(share - out), kind="stable")[: max(0, budget - int(out.sum()))]:
        out[i] += 1
    return [int(min(cap, max(1, v))) for v in out]


@torch.no_grad()
def project(
    deltas: Sequence[torch.Tensor], rt: ZoRuntime, budget: int, gen: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ferret's block-wise projection of per-tensor updates; returns (blocks, seeds, coeffs)."""
    norms = [0.0] * rt.num_blocks
    for i, d in enumerate(deltas):
        norms[rt.blocks[i]] += float(d.double().pow(2).sum())
    counts = allocate([math.sqrt(n) for n in norms], budget, rt.spec.num_seeds)
    blocks, seeds, coeffs = [], [], []
    for b, n_dirs in enumerate(counts):
        for k in sorted(gen.choice(rt.spec.num_seeds, size=n_dirs, replace=False).tolist()):
            dot = 0.0
            for i, s, z in rt.pieces(b, k):
                dot += float(torch.dot(deltas[i].view(-1)[s : s + z.numel()], z))
            blocks.append(b)
            seeds.append(k)
            coeffs.append(dot / n_dirs)
    return np.asarray(blocks, np.int64), np.asarray(seeds, np.int64), np.asarray(coeffs, np.float64)


@torch.no_grad()
def reconstruct(
    rt: ZoRuntime, blocks: np.ndarray, seeds: np.ndarray, coeffs: np.ndarray
) -> list[torch.Tensor]:
    """``sum c_{b,j} z_{b,j}`` per tuned tensor (the estimate of the update; tests, analysis)."""
    out = [torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for p in rt.params]
    for b, k, c in zip(blocks.tolist(), seeds.tolist(), coeffs.tolist(), strict=True):
        for i, s, z in rt.pieces(int(b), int(k)):
            out[i][s : s + z.numel()].add_(z, alpha=float(c))
    return [o.view_as(p) for o, p in zip(out, rt.params, strict=True)]


def ferret_local(
    rt: ZoRuntime,
    spec: ZoSpec,
    batch_of: Callable[[list[int]], dict[str, torch.Tensor]],
    num_examples: int,
    lr: float,
    steps: int,
    batch_size: int,
    grad_accum: int,
    budget: int,
    seed: int,
    meter: MemoryMeter | None = None,
) -> LocalResult:
    """First-order SGD from the synced global, then projection; parameters restored after.
    ``meter`` (if given) counts each micro-batch's saved activations, the gradients and the
    SGD state."""
    t0 = time.perf_counter()
    batches = _batches(num_examples, batch_size, torch.Generator().manual_seed(seed))
    was = [p.requires_grad for p in rt.params]
    for p in rt.params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(rt.params, lr=lr)
    losses = []
    with rt.model() as model, torch.enable_grad(), scoped_torch_seed(derive_seed(seed, "dropout")):
        model.train()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            for _ in range(grad_accum):
                with meter.forward() if meter is not None else contextlib.nullcontext():
                    loss = model(**batch_of(next(batches))).loss
                (loss / grad_accum).backward()
                losses.append(float(loss.detach()))
            if meter is not None:
                meter.after_backward(rt.params)
            opt.step()
            if meter is not None:
                meter.after_step(opt)
        model.eval()
    opt.zero_grad(set_to_none=True)
    for p, w in zip(rt.params, was, strict=True):
        p.requires_grad_(w)
    deltas = [g - p.detach().float() for g, p in zip(rt.snapshot, rt.params, strict=True)]
    rt.restore()
    blocks, seeds, coeffs = project(deltas, rt, budget, np.random.default_rng(seed))
    return LocalResult(
        seeds=seeds,
        scalars=coeffs,
        blocks=blocks,
        metrics={
            "train_loss": float(np.mean(losses)) if losses else 0.0,
            "steps": float(steps),
            "projected": float(len(coeffs)),
            "train_s": time.perf_counter() - t0,
        },
    )
