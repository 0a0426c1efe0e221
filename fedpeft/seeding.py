"""Explicit, stable randomness: every draw comes from a generator named by its purpose.

Seeds are derived from (run seed, purpose, round, client, ...) with blake2b, never Python's
``hash()`` (salted per process), so every process and machine derives the same seed.
Library code never touches the global RNGs except through :func:`scoped_torch_seed`, which
seeds and restores them around code that reads them internally (peft's LoRA dropout).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["derive_seed", "np_rng", "scoped_torch_seed", "torch_generator"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, identical in every process.

    Parameters
    ----------
    *parts : object
        For example ``(run_seed, "data-order", server_round, client_id)``.

    Returns
    -------
    int
        In ``[0, 2**63)``.
    """
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def np_rng(*parts: object) -> np.random.Generator:
    """A numpy generator seeded by :func:`derive_seed` of ``parts``."""
    return np.random.default_rng(derive_seed(*parts))


def torch_generator(*parts: object) -> torch.Generator:
    """A CPU torch generator seeded by :func:`derive_seed` of ``parts``."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(*parts))


@contextlib.contextmanager
def scoped_torch_seed(seed: int) -> Iterator[None]:
    """Seed torch's global RNGs for a block and restore their previous state afterwards.

    For code that draws from the global generator internally (dropout layers, weight
    initializers in transformers); everything fedpeft draws itself uses explicit generators.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
