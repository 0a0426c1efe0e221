"""Simulated device heterogeneity: profiles, simulated round time, deadlines."""

from __future__ import annotations

import json

import pytest

from fedpeft.devices import TIERS, DeviceProfile, assign_profiles
from fedpeft.errors import ConfigError, ProtocolError
from fedpeft.server.screen import DeviceScreen
from fedpeft.simulation.runner import simulate
from fedpeft.wire.messages import Header, LoraUpdate


def test_time_formula():
    p = DeviceProfile("d", speed=2.0, up_mbps=8.0, down_mbps=16.0, memory_mb=1.0)
    # 3 s compute x 2 + 2 MB down at 16 Mbit/s (1 s) + 1 MB up at 8 Mbit/s (1 s)
    assert p.seconds(3.0, 2_000_000, 1_000_000) == pytest.approx(8.0)


def test_tiers_round_robin_and_file(tmp_path):
    got = assign_profiles(["2", "0", "1"], ["tx2", "agx"])
    assert got == {"0": TIERS["tx2"], "1": TIERS["agx"], "2": TIERS["tx2"]}
    f = tmp_path / "dev.json"
    f.write_text(json.dumps({"0": "xavier-nx", "1": {"speed": 5, "up_mbps": 1, "down_mbps": 2,
                                                        "memory_mb": 512}}))  # fmt: skip
    got = assign_profiles(["0", "1"], [], str(f))
    assert got["0"] is TIERS["xavier-nx"] and got["1"].speed == 5.0
    with pytest.raises(ConfigError, match="no profile for clients"):
        assign_profiles(["0", "1", "2"], [], str(f))
    with pytest.raises(ConfigError, match="unknown"):
        assign_profiles(["0"], ["pentium"])
    with pytest.raises(ConfigError, match="positive"):
        DeviceProfile("x", speed=0.0, up_mbps=1, down_mbps=1, memory_mb=1)


def _lora_update(cid: str, **metrics: float) -> LoraUpdate:
    return LoraUpdate(Header("r", 1, "f", "h", 4, cid), {}, metrics={"train_s": 2.0, **metrics})


def test_screen_times_the_profiled_clients_and_fails_memory_and_deadline_per_reply():
    """Each reply is screened alone (as it arrives, before a streaming sum takes it)."""
    agx = TIERS["agx"]  # speed 1, 50 Mbit/s up, 200 down, 32 GiB
    screen = DeviceScreen({"0": agx, "1": agx, "2": agx}, deadline_s=3.0)
    kept = screen("0", _lora_update("0"), 25_000_000, 0)  # 2 s + 200 Mbit at 200 Mbit/s
    assert kept.metrics["client_s"] == pytest.approx(3.0)  # at the deadline: kept
    free = screen("9", _lora_update("9"), 10**9, 10**9)  # no profile: its own compute time
    assert free.metrics["client_s"] == 2.0
    with pytest.raises(ProtocolError, match="out of memory: measured peak 40000 MiB") as err:
        screen("1", _lora_update("1", peak_mem_mb=40_000.0), 0, 0)
    assert err.value.code == "memory"
    with pytest.raises(ProtocolError, match="missed the deadline: 4.0 s > 3.0 s") as err:
        screen("2", _lora_update("2"), 0, 12_500_000)  # 2 s + 2 s up
    assert err.value.code == "deadline"
    # the late device held the round up to the deadline; the one out of memory did not
    assert set(screen.times) == {"0", "2"} and screen.round_s() == 3.0
    assert screen.row(7.0)["sim_client_s"] == {"0": 3.0, "2": 4.0}
    assert DeviceScreen({}, 0.0).row(0.0) == {}


def test_rounds_record_simulated_time_and_deadlines_drop_slow_clients(
    tiny_config, tmp_path, cache, monkeypatch
):
    """Measured compute is replaced by a fixed 0.1 s per client, so the simulated times and
    the deadline's verdict are exact whatever the machine's load."""
    real = DeviceProfile.seconds

    def fixed_compute(self, train_s, bytes_down, bytes_up):
        return real(self, 0.1, bytes_down, bytes_up)

    monkeypatch.setattr(DeviceProfile, "seconds", fixed_compute)
    fast = {"speed": 1.0, "up_mbps": 1000.0, "down_mbps": 1000.0, "memory_mb": 1024.0}
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps({"0": fast, "1": {**fast, "speed": 5000.0}, "2": fast}))
    cfg = tiny_config(f"devices.file={json.dumps(str(devices))}")
    simulate(cfg, tmp_path / "all", quiet=True, cache=cache)
    rows = [json.loads(x) for x in (tmp_path / "all" / "metrics.jsonl").read_text().splitlines()]
    r1 = rows[1]
    for c, speed in (("0", 1.0), ("1", 5000.0), ("2", 1.0)):
        bytes_s = (r1["bytes_down_per_client"] + r1["bytes_up_per_client"]) * 8 / 1e9
        assert r1["sim_client_s"][c] == pytest.approx(0.1 * speed + bytes_s, rel=0.01)
    assert r1["sim_round_s"] == pytest.approx(500.0, rel=0.01)
    assert rows[2]["sim_wall_s"] == pytest.approx(r1["sim_round_s"] + rows[2]["sim_round_s"])
    cfg = tiny_config(f"devices.file={json.dumps(str(devices))}", "devices.deadline_s=10")
    simulate(cfg, tmp_path / "deadline", quiet=True, cache=cache)
    rows = [
        json.loads(x) for x in (tmp_path / "deadline" / "metrics.jsonl").read_text().splitlines()
    ]
    assert "missed the deadline" in rows[1]["failures"]["1"] and rows[1]["clients"] == 2
    assert rows[1]["client_ids"] == ["0", "2"] and rows[1]["sim_round_s"] == 10.0
