"""Seed/scalar training: exact perturb/restore, regeneration counts, coordinator/client
agreement, catching up after missed rounds, and Ferret's unbiased reconstruction."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedpeft.algorithms.zo_state import Coefficients
from fedpeft.config import ModelConfig
from fedpeft.models import load_model
from fedpeft.wire.messages import LoraSpec
from fedpeft.wire.zo import ZoSpec, ZoSync
from fedpeft.zo.local import LocalZo, allocate, fedkseed_local, project, reconstruct
from fedpeft.zo.runtime import ZoRuntime

SPEC = ZoSpec(
    algorithm="fedkseed",
    target="full",
    num_seeds=64,
    pool_seed=11,
    eps=1e-3,
    lr=1e-4,
    local_steps=6,
)


def _handle(dtype: str = "float32"):
    return load_model(ModelConfig(name="tiny", dtype=dtype))


def _params(rt):
    return [p.detach().clone() for p in rt.params]


@pytest.mark.parametrize(
    ("dtype", "master"), [("bfloat16", "auto"), ("float16", "auto"), ("float32", "always")]
)
def test_perturb_then_restore_is_exact(dtype, master):
    rt = ZoRuntime(_handle(dtype), dataclasses.replace(SPEC, master=master))
    before = _params(rt)
    local = LocalZo(rt, rt.spec)
    for k in range(5):
        local.begin(rt.seed(k))
        local.perturb(1e-3)
        local.perturb(-1e-3)
        local.update(0.0)  # fused restore with a zero update
    assert all(torch.equal(a, b) for a, b in zip(before, _params(rt), strict=True))


def test_in_place_float32_drift_is_rounding_only():
    rt = ZoRuntime(_handle(), SPEC)
    before = _params(rt)
    local = LocalZo(rt, rt.spec)
    for k in range(20):
        local.begin(rt.seed(k))
        local.perturb(1e-3)
        local.perturb(-1e-3)
        local.update(0.0)
    drift = max(float((a - b).abs().max()) for a, b in zip(before, _params(rt), strict=True))
    scale = max(float(a.abs().max()) for a in before) + 1e-3
    bound = 20 * 3 * torch.finfo(torch.float32).eps * scale  # one rounding per pass
    print(
        f"float32 in place, 20 perturb/restore cycles: max |drift| = {drift:.2e}",
        f"(bound {bound:.2e})",
    )
    assert drift <= bound  # an exact implementation (drift 0) passes too


def test_fedkseed_scalar_is_the_directional_derivative_along_its_direction(word_batches):
    """One step on one full batch: the scalar g must match autograd's grad . z (the central
    difference's limit), and the step must be theta -= lr * g * z with z in {-1, +1}."""
    handle = _handle()
    spec = dataclasses.replace(SPEC, local_steps=1, eps=1e-3, lr=1e-3)
    rt = ZoRuntime(handle, spec)
    batch_of, n = word_batches(handle)
    before = _params(rt)
    model = handle.base_model
    was = [p.requires_grad for p in rt.params]
    for p in rt.params:
        p.requires_grad_(True)
        p.grad = None
    model.eval()
    model(**batch_of(list(range(n)))).loss.backward()  # the whole batch, as the step sees it
    grads = [p.grad.detach().double().clone() for p in rt.params]
    for p, w in zip(rt.params, was, strict=True):
        p.grad = None
        p.requires_grad_(w)
    res = fedkseed_local(rt, spec, batch_of, n, n, seed=4, restore=False)
    (g,) = res.scalars.tolist()
    assert abs(g) > 1e-3  # a real step, not a zero-gradient corner
    directional = 0.0
    for b, a, grad in zip(before, _params(rt), grads, strict=True):
        z = (a.double() - b.double()) / (-spec.lr * g)  # (numel,) should be +-1
        assert torch.allclose(z.abs(), torch.ones_like(z), atol=1e-2)
        directional += float((grad * z.round()).sum())
    assert g == pytest.approx(directional, rel=0.02)


@pytest.mark.parametrize(("keep_z", "per_step"), [(False, 3), (True, 1)])
def test_regenerations_per_step(keep_z, per_step, word_batches):
    handle = _handle()
    rt = ZoRuntime(handle, dataclasses.replace(SPEC, keep_z=keep_z))
    batch_of, n = word_batches(handle)
    res = fedkseed_local(rt, rt.spec, batch_of, n, 4, seed=3)
    assert res.metrics["regens_per_step"] == per_step
    assert len(res.seeds) == SPEC.local_steps and np.isfinite(res.scalars).all()


def test_keep_z_gives_the_same_update(word_batches):
    runs = []
    for keep in (False, True):
        handle = _handle()
        rt = ZoRuntime(handle, dataclasses.replace(SPEC, keep_z=keep))
        batch_of, n = word_batches(handle)
        res = fedkseed_local(rt, rt.spec, batch_of, n, 4, seed=3, restore=False)
        runs.append((res, _params(rt)))
    assert np.array_equal(runs[0][0].scalars, runs[1][0].scalars)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


@pytest.mark.parametrize("target", ["full", "lora"])
def test_coordinator_coefficients_reproduce_a_client_that_trained_every_round(target, word_batches):
    spec = dataclasses.replace(
        SPEC,
        target=target,
        lora=LoraSpec(4, 8.0, ("q_proj", "v_proj")) if target == "lora" else None,
    )
    client_handle, server_handle = _handle(), _handle()
    client = ZoRuntime(client_handle, spec)
    batch_of, n = word_batches(client_handle)
    coeffs = Coefficients(1, spec.num_seeds)
    for rnd in range(1, 4):
        res = fedkseed_local(
            client, spec, batch_of, n, 4, seed=rnd, restore=False
        )  # keeps its trajectory
        delta = np.zeros((1, spec.num_seeds))
        np.add.at(delta[0], res.seeds, spec.lr * res.scalars.astype(np.float32))
        coeffs.commit(delta, rnd)
    server = ZoRuntime(server_handle, spec)
    server.set_global(coeffs.published, coeffs.version)
    for a, b in zip(_params(client), _params(server), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            _params(server), [g for g in ZoRuntime(_handle(), spec).snapshot], strict=True
        )
    )


def test_stale_client_catches_up_in_at_most_k_regenerations():
    k = 256
    spec = dataclasses.replace(SPEC, num_seeds=k)
    coeffs = Coefficients(1, k)
    rng = np.random.default_rng(0)
    eager, stale, fresh = (ZoRuntime(_handle(), spec) for _ in range(3))
    coeffs.client_versions.update({"eager": 0, "stale": 0})
    eager_regens = 0.0
    for rnd in range(1, 21):  # 20 rounds of 4 random seed updates each: 80 steps of history
        delta = np.zeros((1, k))
        np.add.at(delta[0], rng.integers(0, k, 4), rng.normal(size=4) * 1e-3)
        coeffs.commit(delta, rnd)
        eager_regens += eager.sync(coeffs.sync_for("eager"))
        coeffs.client_versions["eager"] = rnd
    sync = coeffs.sync_for("stale")
    assert not sync.full and sync.from_version == 0
    stale_regens = stale.sync(sync)
    fresh_regens = fresh.sync(coeffs.sync_for("never-seen"))  # stateless: full, from theta_0
    print(
        f"80 steps of history; regenerations: stale {stale_regens}, stateless {fresh_regens},",
        f"eager total {eager_regens}",
    )
    assert stale_regens <= k and fresh_regens <= k
    assert stale_regens == len(sync.seeds) <= 80
    for a, b, c in zip(_params(eager), _params(stale), _params(fresh), strict=True):
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)


def test_sparse_sync_after_lost_state_is_refused():
    rt = ZoRuntime(_handle(), SPEC)
    from fedpeft.errors import ProtocolError

    with pytest.raises(ProtocolError, match="full sync is needed"):
        rt.sync(
            ZoSync(
                from_version=3,
                to_version=4,
                seeds=np.array([1], np.uint16),
                values=np.array([0.1], np.float32),
            )
        )


def test_allocation_is_proportional_with_one_each():
    assert allocate([1, 1, 2], 8, 64) == [2, 2, 4]
    assert allocate([0, 5, 0], 4, 64) == [1, 4, 1]
    assert sum(allocate([3, 1, 1, 1], 10, 64)) == 10


def test_ferret_reconstruction_is_unbiased_and_sharpens_with_more_directions():
    spec = ZoSpec(
        algorithm="ferret", target="lora", num_seeds=256, pool_seed=0, block_numel=10**9,
        lora=LoraSpec(1, 1.0, ("q_proj",)),
    )  # fmt: skip
    handle = _handle()
    rt = ZoRuntime(handle, spec)  # 4 small tensors (d = 256) in one block
    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(p.shape, generator=gen) for p in rt.params]
    truth = torch.cat([d.reshape(-1) for d in deltas])
    errors, along = [], []
    for budget in (4, 16, 64):
        recons = []
        for draw in range(4800 // budget):  # expectation over pools: a new pool seed per draw
            rt = ZoRuntime(handle, dataclasses.replace(spec, pool_seed=draw + 10_000 * budget))
            b, s, c = project(deltas, rt, budget, np.random.default_rng(draw))
            assert len(c) == budget
            recons.append(torch.cat([r.reshape(-1) for r in reconstruct(rt, b, s, c)]))
        errors.append(float(np.mean([float((r - truth).norm() / truth.norm()) for r in recons])))
        # the component along delta of each reconstruction: mean 1 if unbiased
        proj = np.array([float(torch.dot(r, truth) / torch.dot(truth, truth)) for r in recons])
        along.append((float(proj.mean()), float(proj.std() / np.sqrt(len(proj)))))
    print(
        "d=256; mean relative error of one reconstruction, 4/16/64 directions:",
        [round(e, 2) for e in errors],
    )
    print(
        "<reconstruction, delta>/|delta|^2, mean and standard error:",
        [(round(m, 3), round(se, 3)) for m, se in along],
    )
    assert errors[0] > errors[1] > errors[2]
    assert all(abs(m - 1) < 4 * se for m, se in along)
