"""Simulated device heterogeneity: per-client compute speed, bandwidth and memory.

Every client of a simulation runs on this machine; a :class:`DeviceProfile` says how much
slower (``speed``, a multiplier on the measured local compute time) and how well connected it
would be. The simulated time of a client's round is

    t_k = train_s_k * speed_k + bytes_down_k / down_bw_k + bytes_up_k / up_bw_k

and a round takes ``max_k t_k``, or ``deadline_s`` when one is set: clients past it are dropped
from the round (recorded as ``missed the deadline``). ``sim_round_s`` and the running
``sim_wall_s`` go into the round's metrics.

The built-in tiers are *shaped like* NVIDIA Jetson boards (a TX2, a Xavier NX, an AGX Orin
class device) relative to each other; the numbers are assumptions for simulation, not
measurements of those boards: give your own with ``[devices] file``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from fedpeft.errors import ConfigError

__all__ = ["TIERS", "DeviceProfile", "assign_profiles"]


@dataclass(frozen=True)
class DeviceProfile:
    """How a simulated device differs from the machine running the simulation."""

    name: str
    speed: float  # local compute time multiplier (2.0: twice as slow as this machine)
    up_mbps: float  # upload bandwidth, megabits per second
    down_mbps: float  # download bandwidth, megabits per second
    memory_mb: float  # memory available for training

    def __post_init__(self) -> None:
        bad = [
            f"{k}={v}"
            for k, v in asdict(self).items()
            if k != "name" and not (isinstance(v, (int, float)) and v > 0)
        ]
        if bad:
            raise ConfigError(f"device profile {self.name!r} needs positive numbers, got {bad}")

    def seconds(self, train_s: float, bytes_down: int, bytes_up: int) -> float:
        """Simulated seconds of one client-round on this device."""
        return (
            train_s * self.speed
            + bytes_down * 8 / (self.down_mbps * 1e6)
            + bytes_up * 8 / (self.up_mbps * 1e6)
        )


TIERS: dict[str, DeviceProfile] = {
    "tx2": DeviceProfile("tx2", speed=6.0, up_mbps=10.0, down_mbps=40.0, memory_mb=4096.0),
    "xavier-nx": DeviceProfile("xavier-nx", 3.0, up_mbps=20.0, down_mbps=80.0, memory_mb=8192.0),
    "agx": DeviceProfile("agx", speed=1.0, up_mbps=50.0, down_mbps=200.0, memory_mb=32768.0),
}


def _from_file(path: str) -> dict[str, DeviceProfile]:
    """``{client_id: tier name or {speed, up_mbps, down_mbps, memory_mb}}`` from a JSON file."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"devices.file {path!r}: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"devices.file {path!r} must hold a JSON object of client id -> profile")
    out: dict[str, DeviceProfile] = {}
    for cid, spec in raw.items():
        if isinstance(spec, str):
            if spec not in TIERS:
                raise ConfigError(f"devices.file: client {cid} has unknown tier {spec!r}")
            out[str(cid)] = TIERS[spec]
        elif isinstance(spec, dict):
            try:
                out[str(cid)] = DeviceProfile(name=str(spec.get("name", cid)), **{
                    k: float(v) for k, v in spec.items() if k != "name"
                })  # fmt: skip
            except TypeError as err:
                raise ConfigError(f"devices.file: client {cid}: {err}") from None
        else:
            raise ConfigError(f"devices.file: client {cid} must be a tier name or an object")
    return out


def assign_profiles(
    client_ids: Sequence[str], tiers: Sequence[str], file: str = ""
) -> dict[str, DeviceProfile]:
    """A profile per client: from ``file`` when given, else ``tiers`` round-robin by id order.

    Raises
    ------
    ConfigError
        For an unknown tier name, a bad file, or a client the file leaves out.
    """
    if file:
        profiles = _from_file(file)
        missing = sorted(set(client_ids) - set(profiles))
        if missing:
            raise ConfigError(f"devices.file has no profile for clients {missing[:5]}")
        return {c: profiles[c] for c in client_ids}
    unknown = sorted(set(tiers) - set(TIERS))
    if unknown:
        raise ConfigError(f"devices.tiers: unknown {unknown}; known: {sorted(TIERS)}")
    if not tiers:
        return {}
    return {c: TIERS[tiers[i % len(tiers)]] for i, c in enumerate(sorted(client_ids))}
