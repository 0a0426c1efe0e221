"""Rank operations on LoRA factors: scale folding, pad/truncate, stacking, SVD from stacks.

Heterogeneous-rank strategies combine client factors of different ranks ``r_k`` and alphas.
A client's layer computes ``W x + s_k B_k A_k x`` with ``s_k = alpha_k / r_k``, so a rank-``r``
slice of someone else's factors means something different at another rank unless the scale
travels with it. The coordinator therefore keeps global factors in **unit scale**: the scale
is folded into ``B`` (``B~ = s B``) and the global spec has ``alpha = rank`` (scale 1). Sending
a rank-``r_k`` slice to a client divides ``B`` by that client's ``s_k`` again
(:func:`for_client`), so the product a client starts from is exactly the slice of the global
product (the FLoRA issue #16 class of bug, where server and clients disagree on alpha/r, cannot
happen here).

Shapes follow peft: ``A (r, in)``, ``B (out, r)``. Everything is computed in float64 and
returned in float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedpeft.errors import AggregationError
from fedpeft.wire.messages import Adapter, LoraFactors, LoraSpec

__all__ = [
    "dense_delta",
    "for_client",
    "pad",
    "product_norm",
    "stack",
    "svd_from_stacks",
    "truncate",
    "unit_scale",
    "unit_spec",
]


def unit_scale(f: LoraFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, s B)`` in float64: the same product with the scale folded into ``B``."""
    return f.a.double(), f.b.double() * f.scale  # (r, in), (out, r)


def unit_spec(spec: LoraSpec, rank: int) -> LoraSpec:
    """The spec of a unit-scale global adapter of ``rank`` (``alpha = rank``)."""
    return LoraSpec(
        rank=rank, alpha=float(rank), target_modules=spec.target_modules, dropout=spec.dropout
    )


def pad(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero-pad ``t`` along ``dim`` (0 for ``A``, 1 for ``B``) up to ``rank``."""
    have = t.shape[dim]
    if have > rank:
        raise AggregationError(f"cannot pad rank {have} down to {rank}")
    if have == rank:
        return t
    shape = list(t.shape)
    shape[dim] = rank - have
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def truncate(f: LoraFactors, rank: int) -> LoraFactors:
    """The first ``rank`` components of a unit-scale factor pair (scale kept at 1)."""
    if rank > f.rank:
        raise AggregationError(f"cannot truncate rank {f.rank} to a larger rank {rank}")
    return LoraFactors(a=f.a[:rank].clone(), b=f.b[:, :rank].clone(), alpha=float(rank))


def for_client(global_: Adapter, spec: LoraSpec) -> dict[str, LoraFactors]:
    """Unit-scale global factors as a client of ``spec`` must load them.

    Takes the first ``spec.rank`` components and divides ``B`` by the client's scale
    ``alpha / r``, so ``(alpha / r) B_k A_k`` equals the truncated global product.
    """
    s = spec.alpha / spec.rank
    out: dict[str, LoraFactors] = {}
    for m in sorted(global_):
        g = global_[m]
        if g.rank < spec.rank:
            raise AggregationError(
                f"{m}: the global adapter has rank {g.rank}, the client needs {spec.rank}"
            )
        a, b = g.a.double()[: spec.rank], g.b.double()[:, : spec.rank] * g.scale / s
        out[m] = LoraFactors(a=a.float(), b=b.float(), alpha=spec.alpha)
    return out


def stack(
    factors: Sequence[LoraFactors], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA's stacking (Wang et al. 2024): one factor pair whose product is the weighted sum.

    ``B = [s_1 B_1 | ... | s_K B_K]`` (out, R) and ``A = [p_1 A_1; ...; p_K A_K]`` (R, in) with
    ``R = sum r_k``, so ``B A = sum_k p_k s_k B_k A_k`` exactly, for any mix of ranks.
    """
    bs, as_ = [], []
    for f, p in zip(factors, weights, strict=True):
        a, b = unit_scale(f)
        as_.append(a * p)  # (r_k, in)
        bs.append(b)  # (out, r_k)
    return torch.cat(as_, dim=0), torch.cat(bs, dim=1)  # (R, in), (out, R)


def dense_delta(factors: Sequence[LoraFactors], weights: Sequence[float]) -> torch.Tensor:
    """The ideal combined update ``sum_k p_k s_k B_k A_k`` as a dense (out, in) float64 matrix."""
    out: torch.Tensor | None = None
    for f, p in zip(factors, weights, strict=True):
        a, b = unit_scale(f)
        term = p * (b @ a)  # (out, r) @ (r, in) -> (out, in)
        out = term if out is None else out + term
    if out is None:
        raise AggregationError("no factors to combine")
    return out


def svd_from_stacks(
    a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U S V^T`` of ``B A`` without forming the (out, in) matrix.

    ``B = Q_b R_b`` and ``A^T = Q_a R_a`` (reduced QR), so ``B A = Q_b (R_b R_a^T) Q_a^T``;
    the SVD of the small (R, R) core ``R_b R_a^T = U' S V'^T`` gives ``U = Q_b U'`` and
    ``V = Q_a V'``. Cost O((out + in) R^2 + R^3) instead of O(out in min(out, in)).

    Returns
    -------
    tuple
        ``U (out, R)``, ``S (R,)`` (descending), ``V (in, R)``, float64.
    """
    qb, rb = torch.linalg.qr(b.double())  # (out, R), (R, R)
    qa, ra = torch.linalg.qr(a.double().T)  # (in, R), (R, R)
    core = rb @ ra.T  # (R, R) @ (R, R) -> (R, R)
    u, s, vh = torch.linalg.svd(core)
    return qb @ u, s, qa @ vh.T  # (out, R), (R,), (in, R)


def product_norm(f: LoraFactors) -> float:
    """``||s B A||_F`` from the small Gram matrices: ``sqrt(tr((B^T B)(A A^T))) * s``."""
    a, b = unit_scale(f)
    gram = (b.T @ b) @ (a @ a.T)  # (r, r) @ (r, r) -> (r, r)
    return float(torch.sqrt(torch.clamp(torch.trace(gram), min=0.0)))


def check_modules(adapters: Mapping[str, Adapter], strategy: str) -> list[str]:
    """The common sorted module list of every client's adapter, or ``AggregationError``."""
    if not adapters:
        raise AggregationError(f"strategy {strategy!r} got no updates to aggregate")
    items = sorted(adapters.items())
    ref_id, ref = items[0]
    for cid, ad in items[1:]:
        if set(ad) != set(ref):
            diff = sorted(set(ad) ^ set(ref))[:3]
            raise AggregationError(
                f"client {cid} adapted other modules than client {ref_id} (differing: {diff}); "
                f"strategy {strategy!r} needs the same modules from every client"
            )
        for m, f in ad.items():
            if f.a.shape[1] != ref[m].a.shape[1] or f.b.shape[0] != ref[m].b.shape[0]:
                raise AggregationError(
                    f"client {cid} sent {m!r} as ({f.b.shape[0]} x {f.a.shape[1]}), client "
                    f"{ref_id} as ({ref[m].b.shape[0]} x {ref[m].a.shape[1]})"
                )
    return sorted(ref)


def rank_energy(adapter: Mapping[str, LoraFactors], keep: int = 32) -> tuple[list[float], float]:
    """How the update ``Delta W = s B A`` spreads over its rank components.

    Per module the singular values of ``s B A`` (:func:`svd_from_stacks`); component ``i``'s
    energy is ``sum_m sigma_{m,i}^2`` (modules of lower rank add nothing past their rank).
    Returns the first ``keep`` components' shares of the total energy (singular values
    descend, so the shares do) and the effective rank ``exp(entropy of the shares)`` over all
    components: ``R`` when every component carries the same energy, 1 when one carries all
    ("rank collapse", raFLoRA 2026).
    """
    width = max((f.rank for f in adapter.values()), default=0)
    energy = torch.zeros(width, dtype=torch.float64)  # (R,)
    for f in adapter.values():
        a, b = unit_scale(f)  # (r, in), (out, r): the scale folded into B
        _, sv, _ = svd_from_stacks(a, b)  # (r,)
        energy[: sv.numel()] += sv.pow(2)
    total = float(energy.sum())
    if total <= 0:
        return [0.0] * min(keep, width), 0.0
    shares = energy / total  # (R,)
    nonzero = shares[shares > 0]
    effective = float(torch.exp(-(nonzero * nonzero.log()).sum()))
    return [float(x) for x in shares[:keep]], effective
