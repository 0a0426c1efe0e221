"""Scenarios run one after another in one process give what fresh processes give, bit for bit.

The process cache shares build-once objects (the base model, tokenized data) between runs of a
notebook or a benchmark script. A full-model seed/scalar run tunes the shared base weights in
place, and label flipping changes an attacker's records: neither may leak into the next run.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from fedpeft.algorithms.zo_state import Coefficients
from fedpeft.cache import ProcessCache
from fedpeft.client.app import base_model
from fedpeft.config.load import load_config
from fedpeft.server.results import TIME_KEYS
from fedpeft.simulation.runner import simulate
from fedpeft.wire.zo import ZoSpec
from fedpeft.zo.runtime import get_runtime

REPO = Path(__file__).resolve().parents[1]
SMALL = ["federation.rounds=2", "data.max_examples_per_client=32", "eval.examples=8",
         "eval.max_new_tokens=4", "federation.num_clients=4"]  # fmt: skip
SCENARIOS = {
    "zo-full": ("simulations/tiny_fedkseed.toml", [*SMALL, "zo.local_steps=4"]),
    "lora": ("simulations/tiny.toml", SMALL),
    "label-flip": ("simulations/tiny.toml", [*SMALL, "attack.kind=label_flip",
                                             "attack.fraction=0.5"]),
}  # fmt: skip


def _contents(path: Path) -> tuple[dict[str, str], dict[str, bytes]]:
    """A safetensors file's metadata and tensor bytes (its header's key order is not fixed:
    the writer serializes a hash map)."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}  # noqa: SIM118
        return dict(f.metadata() or {}), tensors


def _result(out: Path) -> tuple[list[dict], dict[str, bytes]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    found = [*out.glob("adapter/*.safetensors"), *out.glob("zo_state.safetensors")]
    files = {p.name: _contents(p) for p in found}
    timed = [{k: v for k, v in r.items() if k not in TIME_KEYS and not k.endswith("_s_max")}
             for r in rows]  # fmt: skip
    return timed, files


def test_one_process_running_zo_full_then_lora_then_label_flip_equals_fresh_processes(
    tmp_path,
):
    shared = ProcessCache()
    for name, (path, overrides) in SCENARIOS.items():
        simulate(load_config(REPO / path, overrides), tmp_path / "one" / name, quiet=True,
                 cache=shared)  # fmt: skip
    for name, (path, overrides) in SCENARIOS.items():
        out = tmp_path / "fresh" / name
        cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", "--config", path, "--out",
               str(out), "--quiet", *overrides]  # fmt: skip
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stderr[-3000:]
    results = {}
    for name in SCENARIOS:
        one, fresh = _result(tmp_path / "one" / name), _result(tmp_path / "fresh" / name)
        assert one == fresh, name
        results[name] = fresh
    # the label_flip run is not the clean run (its attackers trained on rotated answers)
    assert results["label-flip"][0] != results["lora"][0]
    assert results["label-flip"][1] != results["lora"][1]


def test_a_node_serves_lora_after_a_full_model_zo_run_on_the_true_base():
    """A deployed node's worker serves run after run from one process cache, with no runner to
    clean up after a full-model seed/scalar run: the client app loads the base again itself
    (subtracting the coefficients again is exact only up to rounding), once per switch away
    from that run, never per message of it."""
    cache = ProcessCache()
    run = load_config(REPO / "simulations" / "tiny.toml")
    spec = ZoSpec(algorithm="fedkseed", target="full", num_seeds=8, pool_seed=3, eps=1e-3)
    coeffs = Coefficients(1, spec.num_seeds)
    coeffs.commit(np.array([[0.3, -0.2, 0.1, 0, 0, 0, 0.5, 0]]), 1)

    def weights(handle):
        return {k: v.clone() for k, v in handle.base_model.state_dict().items()}

    def tune(handle):  # a full-model run's round: the shared weights change in place
        get_runtime(handle, spec, cache).sync(coeffs.sync_for("node"))
        assert base_model(run, cache, spec) is handle  # the run's own messages keep them
        assert weights(handle).keys() == loaded.keys()
        assert any(not torch.equal(weights(handle)[k], v) for k, v in loaded.items())

    first = base_model(run, cache)
    loaded = weights(first)
    tune(first)
    lora = base_model(run, cache)  # a LoRA message of the next run
    assert lora is not first and cache.count("model:") == 2
    assert all(torch.equal(weights(lora)[k], v) for k, v in loaded.items())
    assert base_model(run, cache) is lora and cache.count("model:") == 2
    tune(lora)
    other = base_model(run, cache, dataclasses.replace(spec, pool_seed=4))  # another ZO run
    assert other is not lora and cache.count("model:") == 3
    assert all(torch.equal(weights(other)[k], v) for k, v in loaded.items())
