"""Aggregation of updates from structurally pruned clients: each coordinate over its keepers.

A client that pruned heads or channels trains smaller LoRA factors: ``B`` of a ``q_proj``
loses the rows of removed heads, ``A`` of an ``o_proj`` or ``down_proj`` loses the columns
of removed inputs. With the kept row and column indices beside each update, the coordinator
scatters every client's slice into the full-size factor and divides, per coordinate, by the
total weight of the clients that kept it::

    X[i, j] = sum_{k keeps (i, j)} p_k X_k[i', j'] / sum_{k keeps (i, j)} p_k

A coordinate nobody kept this round keeps its previous global value. :func:`slice_for`
cuts the global factor down to what one client needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Slice", "masked_average", "slice_for"]


@dataclass(frozen=True)
class Slice:
    """One client's piece of a factor: ``values[(rows), (cols)]`` of the full tensor.

    ``rows`` / ``cols`` are the kept indices (sorted) or ``None`` for all of them.
    """

    values: torch.Tensor
    rows: tuple[int, ...] | None
    cols: tuple[int, ...] | None
    weight: float


def _index(idx: tuple[int, ...] | None, n: int) -> torch.Tensor:
    return torch.arange(n) if idx is None else torch.tensor(idx, dtype=torch.long)


def masked_average(
    pieces: Sequence[Slice], previous: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-coordinate weighted mean over the clients that kept each coordinate.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        The new full-size factor (float32) and the number of clients that covered each
        coordinate (coordinates with 0 keep ``previous``).

    Raises
    ------
    ValueError
        If a piece's values do not match its kept indices or fall outside ``previous``.
    """
    n_rows, n_cols = previous.shape
    total = torch.zeros(n_rows, n_cols, dtype=torch.float64)
    weight = torch.zeros(n_rows, n_cols, dtype=torch.float64)
    count = torch.zeros(n_rows, n_cols, dtype=torch.int64)
    for p in pieces:
        r, c = _index(p.rows, n_rows), _index(p.cols, n_cols)
        if tuple(p.values.shape) != (len(r), len(c)):
            raise ValueError(
                f"a slice of shape {tuple(p.values.shape)} does not match its {len(r)} kept rows "
                f"and {len(c)} kept columns"
            )
        if (len(r) and int(r.max()) >= n_rows) or (len(c) and int(c.max()) >= n_cols):
            raise ValueError(f"kept indices fall outside the ({n_rows}, {n_cols}) factor")
        rr, cc = torch.meshgrid(r, c, indexing="ij")
        total[rr, cc] += p.weight * p.values.double()
        weight[rr, cc] += p.weight
        count[rr, cc] += 1
    covered = weight > 0
    out = previous.double().clone()
    out[covered] = total[covered] / weight[covered]
    return out.float(), count


def slice_for(
    full: torch.Tensor, rows: tuple[int, ...] | None, cols: tuple[int, ...] | None
) -> torch.Tensor:
    """The part of a full-size factor a client with these kept indices trains."""
    out = full
    if rows is not None:
        out = out.index_select(0, torch.tensor(rows, dtype=torch.long))
    if cols is not None:
        out = out.index_select(1, torch.tensor(cols, dtype=torch.long))
    return out.clone()
