"""Perturbation directions z(seed, tensor name, element index), identical on every device.

Zeroth-order methods regenerate the same random direction on many machines: a client
perturbs its weights by ``z``, the coordinator and every other client later replay
``theta -= c * z`` from the seed alone. Torch's seeded ``randn`` gives different numbers on CPU
and CUDA (and across GPU generations), which would make replicas silently diverge. Here ``z`` is
a pure function of (seed, tensor name, element index) computed with integer tensor operations
only, so any device produces the same bits:

- a 64-bit key per (seed, name) from blake2b (computed once per tensor, in Python);
- a counter-based hash of (key, word index) giving one 32-bit word per 32 elements
  (Rademacher) or per 2 elements (Gaussian). All arithmetic is on int64 tensors whose values
  stay below 2**63 (32-bit values times 31-bit odd multipliers), so nothing overflows and the
  result is exact on CPU and CUDA alike;
- **Rademacher** (default): each bit gives one sign, expanded through a 256 x 8 byte-to-sign
  table. Mean 0, variance exactly 1, bit-identical everywhere.
- **Gaussian**: each 16-bit half-word indexes a 65,536-entry table of standard-normal quantiles
  ``Phi^-1((i + 0.5) / 65536)`` (computed once in float64 on CPU, rescaled to unit variance,
  stored as float32), so it too is bit-identical on every device. It is a 65,536-level
  discretisation of N(0, 1), symmetric, with tails cut at about +-4.3 sigma.

Any zero-mean direction with identity covariance gives an unbiased two-point (SPSA) gradient
estimate (Spall 1992); Rademacher is the cheapest on CPU.

The hash mixes with the multiplier 0x45d9f3b (a well-known 32-bit integer hash constant,
chosen because it is below 2**31). Words are generated in chunks so no full-model buffer is
ever allocated.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator

import torch

__all__ = ["DISTRIBUTIONS", "apply_", "direction", "directions", "segments", "tensor_key"]

DISTRIBUTIONS = ("rademacher", "gaussian")
_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # odd, < 2**31: (x < 2**32) * _MUL < 2**63, exact in int64
CHUNK = 1 << 22  # elements per generated chunk (16 MiB of float32)


def tensor_key(seed: int, name: str) -> tuple[int, int]:
    """Two 32-bit keys for (seed, tensor name), from blake2b (identical in every process)."""
    digest = hashlib.blake2b(f"{seed}\x1f{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def _mix(x: torch.Tensor) -> torch.Tensor:
    # x holds 32-bit values in int64; every product stays below 2**63.
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    return x ^ (x >> 16)


def _words(key: tuple[int, int], start: int, count: int, device: torch.device) -> torch.Tensor:
    """``count`` 32-bit hash words (as int64) for word indices ``start..start+count``."""
    idx = torch.arange(start, start + count, dtype=torch.int64, device=device)
    x = _mix((idx & _M32) ^ key[0])
    x = _mix((x + (idx >> 32) + key[1]) & _M32)
    return x


@functools.lru_cache(maxsize=8)
def _sign_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 8): bit j of byte b -> +1 if set else -1."""
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1  # (256, 8)
    return (bits * 2 - 1).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=8)
def _normal_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(65536,) unit-variance normal quantiles, computed on CPU in float64, then cast."""
    p = (torch.arange(65536, dtype=torch.float64) + 0.5) / 65536
    q = torch.special.ndtri(p)
    q = q / q.pow(2).mean().sqrt()
    table: torch.Tensor = q.to(torch.float32).to(device=device, dtype=dtype)
    return table


def _rademacher(
    key: tuple[int, int], start: int, n: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    w0, w1 = start // 32, (start + n + 31) // 32
    words = _words(key, w0, w1 - w0, device)  # (W,)
    shifts = torch.tensor([0, 8, 16, 24], device=device)
    byte_idx = ((words.unsqueeze(1) >> shifts) & 0xFF).reshape(-1)  # (W * 4,)
    signs = _sign_table(device, dtype).index_select(0, byte_idx).reshape(-1)  # (W * 32,)
    off = start - w0 * 32
    return signs[off : off + n]


def _gaussian(
    key: tuple[int, int], start: int, n: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    w0, w1 = start // 2, (start + n + 1) // 2
    words = _words(key, w0, w1 - w0, device)  # (W,)
    halves = torch.stack([words & 0xFFFF, words >> 16], dim=1).reshape(-1)  # (W * 2,)
    values = _normal_table(device, dtype).index_select(0, halves)
    off = start - w0 * 2
    return values[off : off + n]


def direction(
    seed: int,
    name: str,
    start: int,
    n: int,
    dist: str = "rademacher",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Elements ``start .. start+n`` of z(seed, name), as a flat tensor on ``device``.

    Raises
    ------
    ValueError
        For an unknown distribution.
    """
    dev = torch.device(device)
    key = tensor_key(seed, name)
    if dist == "rademacher":
        return _rademacher(key, start, n, dev, dtype)
    if dist == "gaussian":
        return _gaussian(key, start, n, dev, dtype)
    raise ValueError(f"unknown perturbation distribution {dist!r}; use one of {DISTRIBUTIONS}")


def directions(
    seed: int,
    name: str,
    numel: int,
    dist: str,
    device: torch.device,
    dtype: torch.dtype,
    chunk: int = CHUNK,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(offset, z[offset:offset+len])`` chunks covering a tensor of ``numel`` elements."""
    for start in range(0, numel, chunk):
        yield start, direction(seed, name, start, min(chunk, numel - start), dist, device, dtype)


def _multi_words(
    keys: list[tuple[int, int]], counts: list[int], device: torch.device
) -> torch.Tensor:
    """Words 0..count_t of every tensor t, concatenated (the same values as ``_words``)."""
    n = torch.tensor(counts, dtype=torch.int64, device=device)
    k1 = torch.tensor([k[0] for k in keys], dtype=torch.int64, device=device).repeat_interleave(n)
    k2 = torch.tensor([k[1] for k in keys], dtype=torch.int64, device=device).repeat_interleave(n)
    starts = (torch.cumsum(n, 0) - n).repeat_interleave(n)
    idx = torch.arange(int(n.sum()), dtype=torch.int64, device=device) - starts
    x = _mix((idx & _M32) ^ k1)
    return _mix((x + (idx >> 32) + k2) & _M32)


def _group(
    seed: int,
    names: list[str],
    numels: list[int],
    dist: str,
    device: torch.device,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """Directions of several small tensors generated by one vectorised pass."""
    per_word = 32 if dist == "rademacher" else 2
    counts = [(n + per_word - 1) // per_word for n in numels]
    words = _multi_words([tensor_key(seed, name) for name in names], counts, device)
    if dist == "rademacher":
        shifts = torch.tensor([0, 8, 16, 24], device=device)
        byte_idx = ((words.unsqueeze(1) >> shifts) & 0xFF).reshape(-1)
        values = _sign_table(device, dtype).index_select(0, byte_idx).reshape(-1)
    elif dist == "gaussian":
        halves = torch.stack([words & 0xFFFF, words >> 16], dim=1).reshape(-1)
        values = _normal_table(device, dtype).index_select(0, halves)
    else:
        raise ValueError(f"unknown perturbation distribution {dist!r}; use one of {DISTRIBUTIONS}")
    out, start = [], 0
    for n, c in zip(numels, counts, strict=True):
        out.append(values[start : start + n])
        start += c * per_word
    return out


def segments(
    seed: int,
    names: list[str],
    numels: list[int],
    dist: str,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    chunk: int = CHUNK,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(tensor index, offset, z piece)`` covering z(seed, name) of every listed tensor.

    Large tensors come in chunks of ``chunk`` elements; runs of small tensors (LoRA factors,
    norms) are generated together in one vectorised pass, which is what makes a LoRA-sized
    regeneration cheap. Every piece equals the matching slice of :func:`direction`.
    """
    group: list[int] = []

    def flush() -> Iterator[tuple[int, int, torch.Tensor]]:
        if group:
            zs = _group(
                seed, [names[i] for i in group], [numels[i] for i in group], dist, device, dtype
            )
            yield from ((i, 0, z) for i, z in zip(group, zs, strict=True))
            group.clear()

    pending = 0
    for i, n in enumerate(numels):
        if n >= chunk // 8:
            yield from flush()
            pending = 0
            for start, z in directions(seed, names[i], n, dist, device, dtype, chunk):
                yield i, start, z
            continue
        group.append(i)
        pending += n
        if pending >= chunk:
            yield from flush()
            pending = 0
    yield from flush()


def apply_(
    param: torch.Tensor,
    seed: int,
    name: str,
    alpha: float,
    dist: str = "rademacher",
    chunk: int = CHUNK,
) -> None:
    """``param += alpha * z(seed, name)`` in place, chunk by chunk (no full-size z buffer)."""
    flat = param.view(-1)
    for start, z in directions(seed, name, flat.numel(), dist, flat.device, flat.dtype, chunk):
        flat[start : start + z.numel()].add_(z, alpha=alpha)
