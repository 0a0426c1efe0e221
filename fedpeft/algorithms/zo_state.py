"""The coordinator's side of seed/scalar training: accumulated coefficients and sync deltas.

The global model of every zeroth-order strategy is
``theta = theta_0 - sum_{b,k} coeffs[b, k] * z(seed_k, block b)`` with a fixed pool of K seeds.
:class:`Coefficients` keeps ``coeffs`` (float64 accumulators; the published values every node
holds are their float32 rounding), the version (round) at which each entry last changed, and
the version each client is known to hold. A client's download is the float32 values of the
entries changed since its version as ``(block, seed, value)`` triples. A client with no
confirmed version gets a full sync (every non-zero coefficient), which is all a stateless
client needs to rebuild from theta_0 with at most K regenerations. Either kind is sent as the
dense matrix instead when that is smaller.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpeft.wire.zo import ZoSync, index_dtype

__all__ = ["Coefficients"]


class Coefficients:
    """Accumulated per-(block, seed) coefficients with change versions.

    Parameters
    ----------
    num_blocks : int
        Blocks of the tuned tensors.
    num_seeds : int
        K, the seed pool size.
    """

    def __init__(self, num_blocks: int, num_seeds: int) -> None:
        self.num_blocks = num_blocks
        self.num_seeds = num_seeds
        self.values = np.zeros((num_blocks, num_seeds), np.float64)
        self.changed_at = np.zeros((num_blocks, num_seeds), np.int64)
        self.version = 0
        self.client_versions: dict[str, int] = {}

    @property
    def published(self) -> np.ndarray:
        """The float32 coefficients every synced node holds, (blocks, K)."""
        return self.values.astype(np.float32)

    def commit(self, delta: np.ndarray, version: int) -> int:
        """Add ``delta`` (blocks, K) as of ``version``; returns how many entries changed."""
        before = self.published
        self.values += delta
        changed = self.published != before
        self.changed_at[changed] = version
        self.version = version
        return int(changed.sum())

    def sync_for(self, client_id: str, full: bool = False) -> ZoSync:
        """What ``client_id`` must download to hold the current version.

        Incremental from the client's confirmed version when it has one (and ``full`` is not
        forced); otherwise full. Either way the smaller encoding is chosen: triples of the
        listed entries, or the dense matrix.
        """
        since = -1 if full else self.client_versions.get(client_id, -1)
        idx_t = index_dtype(self.num_seeds)
        published = self.published
        listed = self.changed_at > since if since >= 0 else published != 0
        blocks, seeds = np.nonzero(listed)
        per_entry = (2 if self.num_blocks > 1 else 0) + np.dtype(idx_t).itemsize + 4
        if len(seeds) * per_entry >= published.size * 4:
            return ZoSync(
                max(since, 0), self.version, values=published.reshape(-1), dense=True, full=True
            )
        return ZoSync(
            from_version=max(since, 0),
            to_version=self.version,
            blocks=blocks.astype(np.uint16) if self.num_blocks > 1 else np.zeros(0, np.uint16),
            seeds=seeds.astype(idx_t),
            values=published[blocks, seeds],
            full=since < 0,
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything, for exact resume."""
        return {
            "values": self.values.copy(),
            "changed_at": self.changed_at.copy(),
            "version": self.version,
            "client_versions": dict(self.client_versions),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`, except what clients hold.

        A restored coordinator cannot know what the nodes kept while it was down (a
        simulation's clients restart with it), so every client gets a full sync next time
        (at most K regenerations each) instead of an increment it may not be able to apply.
        """
        self.values = np.array(state["values"], np.float64)
        self.changed_at = np.array(state["changed_at"], np.int64)
        self.version = int(state["version"])
        self.client_versions = {}
