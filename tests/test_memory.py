"""A client round's peak training memory: the meter's parts against hand-counted bytes, and
the numbers a real round reports."""

from __future__ import annotations

import json

import torch
from torch import nn

from fedpeft.cache import ProcessCache
from fedpeft.client.memory import MIB, MemoryMeter
from fedpeft.simulation.runner import simulate

F32 = 4


class _LowRank(nn.Module):
    """A frozen weight W (a buffer) and trainable factors A, B: y = x A^T B^T + x W^T."""

    def __init__(self, d_in: int, d_out: int, r: int) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(d_out, d_in))
        self.lora_A = nn.ParameterDict({"mine": nn.Parameter(torch.randn(r, d_in))})
        self.lora_B = nn.ParameterDict({"mine": nn.Parameter(torch.randn(d_out, r))})
        self.lora_A["other"] = nn.Parameter(torch.randn(r, d_in))  # another client's adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.lora_A["mine"].T  # saves x (A is a weight)
        y = h @ self.lora_B["mine"].T + x @ self.w.T  # saves h; W needs no grad: nothing
        return y.pow(2).sum()  # saves y


def test_cpu_parts_are_the_bytes_training_holds():
    n, d_in, d_out, r = 5, 12, 7, 3
    model = _LowRank(d_in, d_out, r)
    meter = MemoryMeter(model, "mine", torch.device("cpu"))
    params = [model.lora_A["mine"], model.lora_B["mine"]]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for batch in (n, 2 * n):  # the larger micro-batch sets the activations
        with meter.forward():
            loss = model(torch.randn(batch, d_in))
        loss.backward()
        meter.after_backward(params)
        opt.step()
        meter.after_step(opt)
        opt.zero_grad(set_to_none=True)
    factors = r * d_in + d_out * r
    assert meter.weights == F32 * (d_out * d_in + factors)  # "other" is not this device's
    assert meter.activations == F32 * 2 * n * (d_in + r + d_out)  # x, h, y
    assert meter.gradients == F32 * factors
    assert meter.optimizer == F32 * (2 * factors + 2)  # two moments each, two step counters
    got = meter.report()
    parts = (meter.weights + meter.activations + meter.gradients + meter.optimizer) / MIB
    assert got["peak_mem_mb"] == parts and got["mem_activations_mb"] == meter.activations / MIB


def test_every_round_row_names_each_clients_peak(tmp_path, tiny_config):
    cfg = tiny_config("federation.rounds=1", "federation.num_clients=2")
    simulate(cfg, tmp_path, quiet=True, cache=ProcessCache())
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])
    peaks = row["client_peak_mem_mb"]
    assert sorted(peaks) == ["0", "1"] and row["peak_mem_mb_max"] == max(peaks.values())
    # the tiny model's float32 weights alone are a floor; activations and AdamW add to them
    from fedpeft.models import get_model

    handle = get_model(cfg.model, ProcessCache())
    weights = sum(p.numel() for p in handle.base_model.parameters()) * F32 / MIB
    assert all(weights < v for v in peaks.values()), (weights, peaks)


def test_a_simulated_device_whose_peak_exceeds_its_memory_fails_the_round(tmp_path, tiny_config):
    devices = tmp_path / "devices.json"
    link = {"speed": 1.0, "up_mbps": 100.0, "down_mbps": 100.0}
    devices.write_text(json.dumps({"0": {**link, "memory_mb": 1.0},  # below any model's weights
                                   "1": {**link, "memory_mb": 4096.0}}))  # fmt: skip
    cfg = tiny_config("federation.rounds=2", "federation.num_clients=2",
                      "federation.min_clients=1", f"devices.file={str(devices)!r}")  # fmt: skip
    simulate(cfg, tmp_path / "run", quiet=True, cache=ProcessCache())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        assert row["client_ids"] == ["1"] and list(row["failures"]) == ["0"]
        assert row["failures"]["0"].startswith("memory: out of memory: measured peak"), row
        assert "0" not in row["sim_client_s"]  # it stopped at once: it held no round up
