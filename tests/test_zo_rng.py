"""Directions z(seed, name, index): deterministic, device independent, mean 0 and variance 1."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch

from fedpeft.zo.rng import DISTRIBUTIONS, apply_, direction, directions, segments

N = 200_003


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_identical_across_calls_and_chunkings(dist):
    full = direction(7, "layer.weight", 0, N, dist)
    assert torch.equal(full, direction(7, "layer.weight", 0, N, dist))
    for start, n in ((0, 1), (31, 70), (1000, 33), (N - 5, 5)):
        assert torch.equal(direction(7, "layer.weight", start, n, dist), full[start : start + n])
    pieces = torch.cat(
        [
            z
            for _, z in directions(
                7, "layer.weight", N, dist, torch.device("cpu"), torch.float32, chunk=4099
            )
        ]
    )
    assert torch.equal(pieces, full)


def _digest_in_subprocess(dist: str) -> str:
    code = (
        "import hashlib; from fedpeft.zo.rng import direction;"
        f"z = direction(7, 'layer.weight', 0, {N}, '{dist}');"
        "print(hashlib.sha256(z.numpy().tobytes()).hexdigest())"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_identical_across_processes(dist):
    here = hashlib.sha256(direction(7, "layer.weight", 0, N, dist).numpy().tobytes()).hexdigest()
    assert _digest_in_subprocess(dist) == here


@pytest.mark.cuda
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_identical_on_cpu_and_cuda(dist):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine; the test runs where one exists")
    cpu = direction(7, "layer.weight", 0, N, dist, "cpu")
    gpu = direction(7, "layer.weight", 0, N, dist, "cuda").cpu()
    assert torch.equal(cpu, gpu)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_moments(dist):
    z = direction(3, "w", 0, 1_000_000, dist).double()
    assert abs(z.mean()) < 5e-3
    assert abs(z.var() - 1) < 5e-3
    if dist == "rademacher":
        assert set(z.unique().tolist()) == {-1.0, 1.0}
    else:
        assert abs((z**4).mean() - 3) < 0.05  # Gaussian kurtosis
        assert z.abs().max() < 4.5


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_seeds_and_names_give_unrelated_directions(dist):
    a = direction(1, "w", 0, 100_000, dist)
    for other in (direction(2, "w", 0, 100_000, dist), direction(1, "v", 0, 100_000, dist)):
        assert abs(float((a * other).mean())) < 0.02
    assert abs(float((a[1:] * a[:-1]).mean())) < 0.02  # no correlation between neighbours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_is_chunked_add(dtype):
    p = torch.randn(10_007).to(dtype)
    want = p + 0.5 * direction(5, "x", 0, p.numel(), "rademacher", dtype=dtype)
    apply_(p, 5, "x", 0.5, chunk=1000)
    assert torch.equal(p, want)


def test_unknown_distribution():
    with pytest.raises(ValueError, match="unknown perturbation distribution"):
        direction(1, "w", 0, 10, "uniform")


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_grouped_segments_equal_per_tensor_directions(dist):
    names = [f"layer{i}.lora_A" for i in range(40)] + ["embed", "tiny"]
    numels = [64 * (i % 5 + 1) for i in range(40)] + [1_000_003, 3]
    covered = dict.fromkeys(range(len(names)), 0)
    for i, start, z in segments(9, names, numels, dist, torch.device("cpu"), chunk=1 << 18):
        assert torch.equal(z, direction(9, names[i], start, z.numel(), dist))
        covered[i] += z.numel()
    assert [covered[i] for i in range(len(names))] == numels


def _reference_words(seed: int, name: str, indices: range) -> list[int]:
    """The hash words written out in plain Python integers from the module's description:
    a blake2b key per (seed, name), then two rounds of the 0x45d9f3b mixer per word index."""
    digest = hashlib.blake2b(f"{seed}\x1f{name}".encode(), digest_size=8).digest()
    k0, k1 = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")

    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x45D9F3B) % 2**32
        x ^= x >> 16
        x = (x * 0x45D9F3B) % 2**32
        return x ^ (x >> 16)

    return [mix((mix((i % 2**32) ^ k0) + (i >> 32) + k1) % 2**32) for i in indices]


def test_directions_match_a_plain_python_reference_bit_for_bit():
    """Rademacher: bit j of word w is the sign of element 32 w + j (set: +1). Gaussian: the
    low then high 16-bit half of word w index the unit-variance normal quantile table
    Phi^-1((h + 0.5) / 65536) / rms. Both from the description, not from the module."""
    import statistics

    words = _reference_words(11, "model.layers.0.q_proj.weight", range(8))
    signs = [1.0 if (w >> j) & 1 else -1.0 for w in words for j in range(32)]
    got = direction(11, "model.layers.0.q_proj.weight", 0, 256, "rademacher")
    assert got.tolist() == signs
    assert direction(11, "model.layers.0.q_proj.weight", 37, 50).tolist() == signs[37:87]
    normal = statistics.NormalDist()
    q = [normal.inv_cdf((h + 0.5) / 65536) for h in range(65536)]
    rms = (sum(x * x for x in q) / 65536) ** 0.5
    halves = [h for w in words for h in (w & 0xFFFF, w >> 16)]
    want = [q[h] / rms for h in halves]
    got = direction(11, "model.layers.0.q_proj.weight", 0, 16, "gaussian")
    assert got.tolist() == pytest.approx(want, rel=1e-6, abs=1e-7)  # float32 table entries
    assert direction(11, "model.layers.0.q_proj.weight", 5, 7, "gaussian").tolist() == (
        pytest.approx(want[5:12], rel=1e-6, abs=1e-7)
    )
    far = _reference_words(11, "w", range(2**32, 2**32 + 2))  # word indices past 32 bits
    want_far = [1.0 if (w >> j) & 1 else -1.0 for w in far for j in range(32)]
    assert direction(11, "w", 32 * 2**32, 64).tolist() == want_far
