"""Simulated devices, screened reply by reply (``[devices]`` profiles).

Each valid update gets ``client_s`` in its metrics: its simulated seconds on its device
(compute time times the device's slowdown plus its bytes over the device's links), or
without a profile the compute time the client reported (``train_s``), so a strategy that
learns from client speed (FedSpine's bandit) reads the same field either way. With profiles,
an update whose measured peak memory is above its device's budget fails (``memory``: the
device would have stopped at its first step, so it holds no round up), and one whose simulated
time is past ``devices.deadline_s`` fails (``deadline``).

Every check needs only the reply itself, so the exchange screens each update as it is decoded,
before it is folded into a streaming sum (:mod:`fedpeft.server.fold`), and a batch round
screens the same way. :meth:`DeviceScreen.row` gives the round's simulated time once every
reply is in: the slowest device's, capped at the deadline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from fedpeft.devices import DeviceProfile
from fedpeft.errors import ProtocolError

__all__ = ["DeviceScreen"]


class DeviceScreen:
    """One round's screening of updates against their simulated devices.

    Parameters
    ----------
    profiles : Mapping[str, DeviceProfile]
        The simulated device of each client id (empty: no ``[devices]``).
    deadline_s : float
        ``devices.deadline_s`` (0: none).
    """

    def __init__(self, profiles: Mapping[str, DeviceProfile], deadline_s: float) -> None:
        self.profiles = profiles
        self.deadline_s = deadline_s
        self.times: dict[str, float] = {}  # simulated seconds of the profiled devices that ran

    def __call__(self, cid: str, update: Any, bytes_down: int, bytes_up: int) -> Any:
        """``update`` with ``client_s`` in its metrics.

        Raises
        ------
        ProtocolError
            ``memory``: its measured peak is above the device's budget; ``deadline``: its
            simulated time is past the deadline.
        """
        train_s = float(update.metrics.get("train_s", 0.0))
        prof = self.profiles.get(cid)
        seconds = train_s if prof is None else prof.seconds(train_s, bytes_down, bytes_up)
        update = replace(update, metrics={**update.metrics, "client_s": seconds})
        if prof is None:
            return update
        peak = update.metrics.get("peak_mem_mb")
        if peak is not None and peak > prof.memory_mb:
            raise ProtocolError(
                f"out of memory: measured peak {peak:.0f} MiB > the device's "
                f"{prof.memory_mb:.0f} MiB (devices)",
                "memory",
            )
        self.times[cid] = seconds
        if self.deadline_s > 0 and seconds > self.deadline_s:
            raise ProtocolError(
                f"missed the deadline: {seconds:.1f} s > {self.deadline_s} s", "deadline"
            )
        return update

    def round_s(self) -> float:
        """The round's simulated time: the slowest device that ran, capped at the deadline."""
        slowest = max(self.times.values(), default=0.0)
        return min(slowest, self.deadline_s) if self.deadline_s > 0 else slowest

    def row(self, sim_wall_s: float) -> dict[str, Any]:
        """The round row's device fields (none without profiles)."""
        if not self.profiles:
            return {}
        return {
            "sim_round_s": self.round_s(),
            "sim_wall_s": sim_wall_s,
            "sim_client_s": {c: round(t, 3) for c, t in sorted(self.times.items())},
        }
