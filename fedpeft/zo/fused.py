"""``theta += alpha * z(seed, name)`` in one pass: hash, sign or quantile, add, fused.

:mod:`fedpeft.zo.rng` builds a direction step by step with separate tensor operations (hash
words, shifts, a table lookup, then the add), each a pass over memory and, on a CPU, a parallel
region with its thread barrier. Here the same arithmetic is one function compiled by
``torch.compile`` (TorchInductor), which fuses the integer and float operations into one loop
over the tensor: a hash word is computed once per 32 elements (Rademacher) or 2 (Gaussian),
the elements are read once and written once. The bits are :mod:`fedpeft.zo.rng`'s: every word,
sign and table entry is the same integer or float32 value, and ``theta + alpha * z`` is one
float32 multiply-add either way (``tests/test_zo_fused.py`` compares every SmolLM2 tensor bit
for bit with the reference, Rademacher and Gaussian, masked and not).

Only whole hash words go through the kernel; the few elements before the first and after the
last whole word of a slice go through the reference. A tensor below :data:`MIN_NUMEL`
elements stays on the reference path (one vectorised pass already covers runs of small
tensors, and a compile is not worth it). Where compilation is unavailable (no C++ compiler
for Inductor, an unsupported device) the first failure is logged once and every later call
takes the reference path; ``FEDPEFT_ZO_KERNEL=reference`` chooses the reference from the
start (a node-local switch: both paths give the same bits).

Why ``torch.compile`` rather than a hand-written C++ or Triton kernel: it is the route torch
maintains for exactly this (fusing pointwise integer and float work, with OpenMP on CPU and
Triton on CUDA), it needs no build step of ours, and the reference it is checked against is
the same Python expression.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fedpeft.zo import rng

__all__ = ["MIN_NUMEL", "add_", "available", "disable", "switched"]

log = logging.getLogger(__name__)

MIN_NUMEL = 1 << 15  # tensors below this stay on the reference path
_PER_WORD = {"rademacher": 32, "gaussian": 2}
_state: dict[str, Any] = {"on": os.environ.get("FEDPEFT_ZO_KERNEL", "auto") != "reference"}
_kernels: dict[tuple[str, bool], Callable[..., Any]] = {}


def _mix(x: torch.Tensor) -> torch.Tensor:
    # rng._mix, written again inside the compiled graph (the same integer operations)
    x = x ^ (x >> 16)
    x = (x * rng._MUL) & rng._M32
    x = x ^ (x >> 16)
    x = (x * rng._MUL) & rng._M32
    return x ^ (x >> 16)


def _words(k0: torch.Tensor, k1: torch.Tensor, w0: torch.Tensor, count: int) -> torch.Tensor:
    idx = torch.arange(count, dtype=torch.int64, device=k0.device) + w0
    x = _mix((idx & rng._M32) ^ k0)
    return _mix((x + (idx >> 32) + k1) & rng._M32)


def _rademacher(
    rows: torch.Tensor,  # (W, 32) view of the slice
    k0: torch.Tensor,
    k1: torch.Tensor,
    w0: torch.Tensor,
    alpha: torch.Tensor,
    mask: torch.Tensor | None,
) -> None:
    words = _words(k0, k1, w0, rows.shape[0])  # (W,)
    bits = (words.unsqueeze(1) >> torch.arange(32, device=rows.device)) & 1  # (W, 32)
    z = (bits * 2 - 1).to(rows.dtype)
    rows.add_((z if mask is None else z * mask) * alpha)  # (W, 32)


def _gaussian(
    k0: torch.Tensor,
    k1: torch.Tensor,
    w0: torch.Tensor,
    count: int,
    mask: torch.Tensor | None,  # (count, 2) or None
    table: torch.Tensor,
) -> torch.Tensor:
    words = _words(k0, k1, w0, count)  # (count,)
    halves = (words.unsqueeze(1) >> torch.tensor([0, 16], device=k0.device)) & 0xFFFF
    z = table[halves]  # (count, 2)
    return z if mask is None else z * mask


def _kernel(dist: str, masked: bool) -> Callable[..., Any]:
    key = (dist, masked)
    if key not in _kernels:
        fn: Callable[..., Any] = _rademacher if dist == "rademacher" else _gaussian
        _kernels[key] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _kernels[key]


def available() -> bool:
    """Whether the fused path is on (not switched off, and no compilation has failed)."""
    return bool(_state["on"])


def disable(reason: str) -> None:
    """Switch the fused path off for this process (every call then takes the reference)."""
    if _state["on"]:
        log.warning("fused zo kernel off, using the reference generator: %s", reason)
    _state["on"] = False


@contextlib.contextmanager
def switched(on: bool) -> Iterator[None]:
    """The fused path on or off inside the block (benchmarks and tests compare the two)."""
    before = _state["on"]
    _state["on"] = on
    try:
        yield
    finally:
        _state["on"] = before


def _reference(flat: torch.Tensor, seed: int, name: str, start: int, alpha: float, dist: str,
               mask: torch.Tensor | None) -> None:  # fmt: skip
    """The reference generator's add, chunk by chunk as :func:`fedpeft.zo.rng.apply_` (no
    buffer of the whole slice)."""
    for s in range(0, flat.numel(), rng.CHUNK):
        part = flat[s : s + rng.CHUNK]
        z = rng.direction(seed, name, start + s, part.numel(), dist, flat.device, flat.dtype)
        part.add_(z if mask is None else z * mask[s : s + part.numel()], alpha=alpha)


def add_(
    flat: torch.Tensor,
    seed: int,
    name: str,
    alpha: float,
    dist: str = "rademacher",
    start: int = 0,
    mask: torch.Tensor | None = None,
) -> None:
    """``flat += alpha * z(seed, name)[start : start + len(flat)]`` (times ``mask``), in place.

    ``flat`` is a contiguous 1-D float tensor (a tuned tensor or a slice of one); ``mask`` a
    float 0/1 tensor of the same length or ``None``. The result has the bits of
    ``flat.add_(rng.direction(...) * mask, alpha=alpha)``.

    Raises
    ------
    ValueError
        For an unknown distribution.
    """
    if dist not in _PER_WORD:
        raise ValueError(f"unknown perturbation distribution {dist!r}; use {rng.DISTRIBUTIONS}")
    n = flat.numel()
    per = _PER_WORD[dist]
    head = (-start) % per  # elements before the first whole word
    body = (n - head) // per * per if n > head else 0
    if not available() or body < MIN_NUMEL or not flat.is_contiguous():
        _reference(flat, seed, name, start, alpha, dist, mask)
        return
    if head:
        _reference(
            flat[:head], seed, name, start, alpha, dist, None if mask is None else mask[:head]
        )
    k0, k1 = rng.tensor_key(seed, name)
    dev = flat.device
    scalars = [
        torch.tensor(v, dtype=torch.int64, device=dev) for v in (k0, k1, (start + head) // per)
    ]
    rows = flat[head : head + body].view(-1, per)
    rows_mask = None if mask is None else mask[head : head + body].view(-1, per)
    done = 0  # rows already moved (a failure falls back for the rest only)
    try:
        if dist == "rademacher":  # z * alpha is exact (z in {-1, 0, 1}): one rounding, as eager
            a = torch.tensor(alpha, dtype=flat.dtype, device=dev)
            _kernel(dist, mask is not None)(rows, *scalars, a, rows_mask)
            done = rows.shape[0]
        else:  # z made in one fused pass, added by eager add_ (its multiply-add rounds once)
            table = rng._normal_table(dev, flat.dtype)
            step = rng.CHUNK // per
            while done < rows.shape[0]:
                part = rows[done : done + step]
                m = None if rows_mask is None else rows_mask[done : done + step]
                z = _kernel(dist, m is not None)(
                    scalars[0], scalars[1], scalars[2] + done, part.shape[0], m, table
                )
                part.add_(z, alpha=alpha)
                done += part.shape[0]
    except Exception as err:  # noqa: BLE001 - a compile failure: the reference, for good
        disable(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        rest = slice(head + done * per, head + body)
        _reference(flat[rest], seed, name, start + head + done * per, alpha, dist,
                   None if mask is None else mask[rest])  # fmt: skip
    if head + body < n:
        tail = slice(head + body, n)
        _reference(flat[tail], seed, name, start + head + body, alpha, dist,
                   None if mask is None else mask[tail])  # fmt: skip
