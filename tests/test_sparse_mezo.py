"""Sparse MeZO: the smallest-magnitude mask, learning on the tiny task, and the coordinator's
replay of a client's masked trajectory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fedpeft.algorithms.sparse_mezo import SmallestWeights, SparseMezo
from fedpeft.algorithms.zo_state import Coefficients
from fedpeft.config import ModelConfig
from fedpeft.config.load import load_config
from fedpeft.errors import ProtocolError
from fedpeft.models import load_model
from fedpeft.simulation.runner import simulate
from fedpeft.testing import check_strategy
from fedpeft.wire.zo import ZoSpec
from fedpeft.zo.local import fedkseed_local
from fedpeft.zo.runtime import ZoRuntime, mask_id
from fedpeft.zo.trainer import direction_mask

REPO = Path(__file__).resolve().parents[1]
MASK = SmallestWeights(0.25)
SPEC = ZoSpec(algorithm="fedkseed", target="full", num_seeds=64, pool_seed=11, eps=1e-3,
              lr=1e-4, local_steps=6, mask=mask_id(MASK))  # fmt: skip


def test_the_mask_keeps_the_smallest_quarter_of_each_tensor_and_ties():
    w = torch.tensor([[0.5, -0.1, 2.0, 0.05], [-3.0, 0.2, -0.01, 1.0]])
    assert MASK("w", w).tolist() == [[False, False, False, True], [False, False, True, False]]
    ties = torch.tensor([1.0, -1.0, 1.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    assert MASK("t", ties).sum() == 3  # 2 asked, every entry tied with the second kept
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    kept = SmallestWeights(0.1)("x", x)
    assert kept.sum() == 100 and x.abs()[kept].max() < x.abs()[~kept].min()
    assert torch.equal(MASK("x", x), MASK("other name", x.clone()))  # a function of theta_0
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got 0"):
        SmallestWeights(0.0)


def test_it_is_registered_whole_and_passes_the_public_checks():
    assert direction_mask(SparseMezo) == MASK and SparseMezo.zo_algorithm == "fedkseed"
    check_strategy("sparse-mezo")


def test_coordinator_coefficients_reproduce_a_client_and_move_only_masked_weights(word_batches):
    """As FedKSeed's test: a client keeps its trajectory over 3 rounds, the coordinator's
    coefficients rebuild it on a fresh model (to float rounding); on both, the weights outside
    the mask never moved and a quarter of each tensor at most did."""
    client_handle, server_handle = (load_model(ModelConfig(name="tiny")) for _ in range(2))
    base = {n: p.detach().clone() for n, p in load_model(ModelConfig(name="tiny"))
            .base_model.named_parameters()}  # fmt: skip
    client = ZoRuntime(client_handle, SPEC, MASK)
    batch_of, n = word_batches(client_handle)
    coeffs = Coefficients(1, SPEC.num_seeds)
    for rnd in range(1, 4):
        res = fedkseed_local(client, SPEC, batch_of, n, 4, seed=rnd, restore=False)
        delta = np.zeros((1, SPEC.num_seeds))
        np.add.at(delta[0], res.seeds, SPEC.lr * res.scalars.astype(np.float32))
        coeffs.commit(delta, rnd)
    server = ZoRuntime(server_handle, SPEC, MASK)
    server.set_global(coeffs.published, coeffs.version)
    moved = 0
    for name, a, b in zip(client.names, client.params, server.params, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
        start = base[name]
        allowed = MASK(name, start)
        for p in (a, b):
            assert torch.equal(p.detach()[~allowed], start[~allowed]), name
        moved += int((b.detach() != start).sum())
    assert 0 < moved <= 0.3 * sum(client.numels)
    with pytest.raises(ProtocolError, match="masked by SmallestWeights"):
        ZoRuntime(load_model(ModelConfig(name="tiny")), SPEC)  # a node without the mask


def test_tiny_sparse_mezo_learns(tmp_path):
    cfg = load_config(
        REPO / "simulations" / "tiny_fedkseed.toml",
        ["strategy.name=sparse-mezo", "federation.num_clients=3", "federation.rounds=2",
         "data.max_examples_per_client=40", "eval.examples=16"],
    )  # fmt: skip
    summary = simulate(cfg, tmp_path, quiet=True)
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    with safe_open(str(tmp_path / "zo_state.safetensors"), "pt") as f:
        spec = ZoSpec(**json.loads(f.metadata()["spec"]))
    assert spec.mask == "SmallestWeights(density=0.25)"
