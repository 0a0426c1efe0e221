"""FedProx (strategies/fedprox.py), the out-of-tree example with a client half: its proximal
term by hand, mu = 0 is FedAvg bit for bit, a large mu keeps the model near where it started,
and the same client half runs whether the plug-in is a file, a dotted path or an entry point."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.cache import ProcessCache
from fedpeft.simulation.runner import simulate
from fedpeft.testing import check_strategy
from fedpeft.wire.messages import Header, LoraSpec, TrainInstruction

REPO = Path(__file__).resolve().parents[1]
FILE = REPO / "strategies" / "fedprox.py"
ROUND = ("federation.rounds=1", "train.local_steps=4")


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _run(tiny_config, out: Path, *overrides: str) -> dict[str, torch.Tensor]:
    simulate(tiny_config(*ROUND, *overrides), out, quiet=True, cache=ProcessCache())
    return _adapter(out)


def test_the_proximal_term_is_half_mu_times_the_squared_distance(tiny_handle, tiny_config):
    sys.path.insert(0, str(FILE.parent))
    try:
        import fedprox  # the file as a plug-in author runs it
    finally:
        sys.path.remove(str(FILE.parent))
    cfg = tiny_config()
    spec = LoraSpec(4, 8.0, ("q_proj", "v_proj"))
    name = tiny_handle.ensure_adapter(spec)
    ins = TrainInstruction(Header("r", 1, "fp", "h", 1, "0"), spec, cfg.train,
                           tiny_handle.get_factors(name), 0, options={"mu": 0.5})  # fmt: skip
    term = fedprox.proximal_term(tiny_handle, name, ins)
    assert float(term().detach()) == 0.0  # at the start w = w_t
    params = tiny_handle.trainable_parameters(name, "AB")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(0.01 * (i + 1))  # move every factor by a known amount
    want = 0.5 / 2 * sum(p.numel() * (0.01 * (i + 1)) ** 2 for i, p in enumerate(params))
    assert float(term().detach()) == pytest.approx(want, rel=1e-5)
    tiny_handle.set_factors(name, ins.adapter)  # the shared handle as it was


def test_mu_zero_is_fedavg_bit_for_bit(tiny_config, tmp_path):
    fedavg = _run(tiny_config, tmp_path / "fedavg")
    prox = _run(tiny_config, tmp_path / "prox", f"strategy.name='{FILE}:FedProx'",
                "strategy.options.mu=0.0")  # fmt: skip
    assert fedavg.keys() == prox.keys() and all(torch.equal(fedavg[k], prox[k]) for k in fedavg)


def test_a_large_mu_keeps_the_clients_near_the_global_they_were_sent(tiny_config, tmp_path):
    start = _run(tiny_config, tmp_path / "start", "train.trainer=noop")  # round 1 untrained
    free = _run(tiny_config, tmp_path / "free", f"strategy.name='{FILE}:FedProx'",
                "strategy.options.mu=0.0")  # fmt: skip
    held = _run(tiny_config, tmp_path / "held", f"strategy.name='{FILE}:FedProx'",
                "strategy.options.mu=100.0")  # fmt: skip

    def moved(x):
        return sum(float((x[k] - start[k]).norm()) for k in start)

    assert 0 < moved(held) < 0.5 * moved(free)


def test_file_dotted_path_and_entry_point_run_the_same_client_half(
    tiny_config, tmp_path, monkeypatch, install_plugin
):
    by_file = _run(tiny_config, tmp_path / "file", f"strategy.name='{FILE}:FedProx'",
                   "strategy.options.mu=10.0")  # fmt: skip
    monkeypatch.syspath_prepend(str(REPO))  # the strategies/ folder as a namespace package
    dotted = _run(tiny_config, tmp_path / "dotted", "strategy.name='strategies.fedprox:FedProx'",
                  "strategy.options.mu=10.0")  # fmt: skip
    install_plugin(FILE, "ep_fedprox", "ep-fedprox = ep_fedprox:FedProx")
    entry = _run(tiny_config, tmp_path / "entry", "strategy.name=ep-fedprox",
                 "strategy.options.mu=10.0")  # fmt: skip
    fedavg = _run(tiny_config, tmp_path / "fedavg")
    for other in (dotted, entry):
        assert all(torch.equal(by_file[k], other[k]) for k in by_file)
    assert not all(torch.equal(by_file[k], fedavg[k]) for k in by_file)  # the term acted


def test_fedprox_passes_the_public_conformance_checks():
    check_strategy(f"{FILE}:FedProx", {"mu": 0.1})
