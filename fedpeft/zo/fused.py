"""``theta += alpha * z(seed, name)`` in one pass: hash, sign or quantile, add, fused.

:mod:`fedpeft.zo.rng` builds a direction step by step with separate tensor operations (hash
words, shifts, a table lookup, then the add), each a pass over memory and, on a CPU, a parallel
region with its thread barrier. Here the same arithmetic is one function compiled by
``torch.compile`` (TorchInductor), which fuses the integer and float operations into one loop
over the tensor: a hash word is computed once per 32 elements (Rademacher; Gaussian hashes per
element, a plainer loop that vectorises, where two elements share a word), the elements are
read once and written once. :func:`add_many_` adds several seeds' directions in that one pass
(a sync replaying many coefficients). The bits are :mod:`fedpeft.zo.rng`'s: every word, sign
and table entry is the same integer or float32 value, and ``theta + alpha * z`` is rounded
once, as eager's multiply-add rounds it (exact for Rademacher, where ``alpha * z`` is exact;
built from a round-to-odd float64 sum for Gaussian).
``tests/test_zo_fused.py`` compares every SmolLM2 tensor bit for bit with the reference,
Rademacher and Gaussian, masked and not, one seed and many.

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
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from fedpeft.zo import rng

__all__ = ["GROUP", "MIN_NUMEL", "add_", "add_many_", "available", "disable", "switched"]

log = logging.getLogger(__name__)

MIN_NUMEL = 1 << 15  # tensors below this stay on the reference path
GROUP = 16  # Rademacher seeds added per pass over a tensor (add_many_)
_PER_WORD = {"rademacher": 32, "gaussian": 2}
_state: dict[str, Any] = {"on": os.environ.get("FEDPEFT_ZO_KERNEL", "auto") != "reference"}
_kernels: dict[tuple[str, bool, int], Callable[..., Any]] = {}


def _mix(x: torch.Tensor) -> torch.Tensor:
    # rng._mix, written again inside the compiled graph (the same integer operations)
    x = x ^ (x >> 16)
    x = (x * rng._MUL) & rng._M32
    x = x ^ (x >> 16)
    x = (x * rng._MUL) & rng._M32
    return x ^ (x >> 16)


def _hash(idx: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor) -> torch.Tensor:
    """rng._words' hash of the word indices ``idx`` under the key ``(k0, k1)``."""
    x = _mix((idx & rng._M32) ^ k0)
    return _mix((x + (idx >> 32) + k1) & rng._M32)


def _fma(x: torch.Tensor, a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """float32 ``x + a * z`` rounded once, as eager ``x.add_(z, alpha=a)`` rounds it (a fused
    multiply-add; Inductor's CPU code does not contract, so it is built here exactly).

    In float64 the product is exact (24 + 24 bits) and the sum is rounded to odd (TwoSum gives
    its error; an inexact even result moves one unit toward the exact value); rounding a
    round-to-odd value with 53 >= 24 + 2 bits to float32 gives the correctly rounded sum
    (Boldo & Melquiond 2008), so no double rounding."""
    xd = x.to(torch.float64)
    p = a.to(torch.float64) * z.to(torch.float64)
    s = xd + p
    back = s - xd
    err = (xd - (s - back)) + (p - back)
    bits = s.view(torch.int64)
    toward = torch.where((s > 0) == (err > 0), 1, -1)
    bits = torch.where((err != 0) & ((bits & 1) == 0), bits + toward, bits)
    return bits.view(torch.float64).to(torch.float32)


def _rademacher(
    rows: torch.Tensor,  # (W, 32) view of the slice
    keys: torch.Tensor,  # (n, 2) int64
    w0: torch.Tensor,
    alphas: torch.Tensor,  # (n,) in rows' dtype
    mask: torch.Tensor | None,  # (W, 32) or None
    n: int,
) -> None:
    # z * alpha is exact (z in {-1, 0, 1}): each seed's add rounds once, as eager's does
    shifts = torch.arange(32, device=rows.device)
    idx = torch.arange(rows.shape[0], device=rows.device) + w0  # (W,) word indices
    x = rows
    for s in range(n):  # unrolled: the n seeds' adds in order, one read and one write
        words = _hash(idx, keys[s, 0], keys[s, 1])
        z = (((words.unsqueeze(1) >> shifts) & 1) * 2 - 1).to(rows.dtype)
        x = x + (z if mask is None else z * mask) * alphas[s]
    rows.copy_(x)


def _gaussian(
    flat: torch.Tensor,  # the slice, starting at a whole word
    keys: torch.Tensor,
    w0: torch.Tensor,
    alphas: torch.Tensor,
    mask: torch.Tensor | None,
    table: torch.Tensor,
    n: int,
) -> None:
    # one loop over elements (a (W, 2) layout does not vectorise): element i's half-word
    i = torch.arange(flat.shape[0], device=flat.device)
    idx, shift = (i >> 1) + w0, (i & 1) * 16
    x = flat
    for s in range(n):
        z = table[(_hash(idx, keys[s, 0], keys[s, 1]) >> shift) & 0xFFFF]
        x = _fma(x, alphas[s], z if mask is None else z * mask)
    flat.copy_(x)


def _kernel(dist: str, masked: bool, n: int) -> Callable[..., Any]:
    key = (dist, masked, n)
    if key not in _kernels:
        # a function of its own per variant (a copy of the code object, ``n`` as its default):
        # dynamo keeps one cache per code object, so variants do not count against each
        # other's recompile limit, and ``n`` is a constant the loop unrolls over
        fn = _rademacher if dist == "rademacher" else _gaussian
        name = f"{fn.__name__}_{'masked' if masked else 'whole'}_{n}"
        code = fn.__code__.replace(co_name=name, co_qualname=name)
        variant = types.FunctionType(code, fn.__globals__, name, (n,))
        _kernels[key] = torch.compile(variant, dynamic=True, fullgraph=True)
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
    add_many_(flat, [seed], name, [alpha], dist, start, mask)


def add_many_(
    flat: torch.Tensor,
    seeds: Sequence[int],
    name: str,
    alphas: Sequence[float],
    dist: str = "rademacher",
    start: int = 0,
    mask: torch.Tensor | None = None,
) -> None:
    """:func:`add_` for each ``(seed, alpha)`` in order, with the same bits, in fewer passes.

    Rademacher directions are cheap to generate, so one pass over the tensor is bound by
    reading and writing it: here :data:`GROUP` seeds are added per pass, each element read
    once, the seeds' adds done in order in registers, written once. Gaussian directions cost
    a hash per two elements and a table lookup, which bounds the pass before memory does; they
    go one seed per pass (grouping them measured no faster).

    Raises
    ------
    ValueError
        For an unknown distribution, or ``seeds`` and ``alphas`` of different lengths.
    """
    if dist not in _PER_WORD:
        raise ValueError(f"unknown perturbation distribution {dist!r}; use {rng.DISTRIBUTIONS}")
    if len(seeds) != len(alphas):
        raise ValueError(f"{len(seeds)} seeds but {len(alphas)} coefficients")
    n = flat.numel()
    per = _PER_WORD[dist]
    head = (-start) % per  # elements before the first whole word
    body = (n - head) // per * per if n > head else 0
    pairs = list(zip(seeds, alphas, strict=True))

    def reference(part: slice, todo: list[tuple[int, float]]) -> None:
        lo = part.start or 0
        for seed, alpha in todo:
            _reference(flat[part], seed, name, start + lo, alpha, dist,
                       None if mask is None else mask[part])  # fmt: skip

    if not available() or body < MIN_NUMEL or not flat.is_contiguous():
        reference(slice(0, n), pairs)
        return
    if head:
        reference(slice(0, head), pairs)
    dev = flat.device
    w0 = torch.tensor((start + head) // per, dtype=torch.int64, device=dev)
    part = flat[head : head + body]
    part_mask = None if mask is None else mask[head : head + body]
    if dist == "rademacher":
        part, part_mask = part.view(-1, per), None if part_mask is None else part_mask.view(-1, per)
        extra: tuple[torch.Tensor, ...] = ()
    else:
        extra = (rng._normal_table(dev, flat.dtype),)
    group = GROUP if dist == "rademacher" else 1
    done = 0  # seeds already added to the body (a failure falls back for the rest only)
    try:
        with torch.no_grad():  # grad mode is one of a compiled graph's guards: keep it one
            while done < len(pairs):
                todo = (
                    pairs[done : done + group]
                    if len(pairs) - done >= group
                    else pairs[done : done + 1]
                )
                keys = torch.tensor([rng.tensor_key(sd, name) for sd, _ in todo], dtype=torch.int64,
                                    device=dev)  # fmt: skip
                alphas_t = torch.tensor([a for _, a in todo], dtype=flat.dtype, device=dev)
                kernel = _kernel(dist, mask is not None, len(todo))
                if dist == "rademacher":
                    kernel(part, keys, w0, alphas_t, part_mask)
                else:
                    kernel(part, keys, w0, alphas_t, part_mask, *extra)
                done += len(todo)
    except Exception as err:  # noqa: BLE001 - a compile failure: the reference, for good
        disable(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        reference(slice(head, head + body), pairs[done:])
    if head + body < n:
        reference(slice(head + body, n), pairs)
