"""A sum of float64 vectors that is exact, so the order they are added in cannot change it.

Streaming aggregation folds replies into the aggregate in whatever order the transport
delivers them. A float sum depends on that order in its last bits; this one does not: every
value ``v`` (``|v| < 2**TOP``) is cut into ``WORDS`` integer words of ``BITS`` bits below
``2**TOP``::

    v = sum_j q_j * 2**(TOP - BITS * (j + 1)) + (a remainder below 2**(TOP - BITS * WORDS))

and each word is summed in an int64 (integer sums are exact, so associative). Every step of
the split is exact in float64 (scaling by a power of two, taking an integer part, subtracting
it), so a value's words depend only on the value. The remainder, below ``2**-56`` with the
constants here, is dropped, the same way for every order. Reading the sum converts the words
back to float64 once.

This is fixed-point summation in several words, the idea behind reproducible summation
libraries (Demmel and Nguyen, "Fast Reproducible Floating-Point Summation", ARITH 2013 bin
values into fixed exponent ranges in the same spirit); written here because the inputs are
torch tensors and a few dozen lines cover what aggregation needs.
"""

from __future__ import annotations

import torch

__all__ = ["BITS", "MAX_TERMS", "TOP", "WORDS", "ExactSum"]

TOP = 64  # every added value must be below 2**TOP in magnitude
BITS = 40  # bits per word: a word is below 2**BITS, so 2**23 of them fit an int64 sum
WORDS = 3  # resolution 2**(TOP - BITS * WORDS) = 2**-56
MAX_TERMS = 2 ** (63 - BITS)  # vectors one sum can take without overflowing a word


class ExactSum:
    """The exact, order-independent sum of float64 vectors of one length.

    Parameters
    ----------
    dim : int
        Length of every vector added.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.terms = 0
        self._words = torch.zeros((WORDS, dim), dtype=torch.int64)  # (WORDS, dim)

    def add(self, x: torch.Tensor) -> None:
        """Add the vector ``x`` (any float dtype, converted to float64 exactly).

        Raises
        ------
        ValueError
            If ``x`` has another length, a value that is not finite or not below ``2**TOP``
            in magnitude, or the sum already holds :data:`MAX_TERMS` vectors.
        """
        x = x.reshape(-1).to(torch.float64)
        if x.numel() != self.dim:
            raise ValueError(f"a vector of {x.numel()} values added to a sum of {self.dim}")
        if self.terms >= MAX_TERMS:
            raise ValueError(f"an exact sum takes at most {MAX_TERMS} vectors")
        if x.numel() and not bool((x.abs() < 2.0**TOP).all()):  # NaN fails this too
            raise ValueError(f"a value is not finite or not below 2**{TOP} in magnitude")
        r = x * 2.0 ** (BITS - TOP)  # (dim,) exact: a power of two; |r| < 2**BITS
        for j in range(WORDS):
            q = torch.trunc(r)  # the integer part: exact
            self._words[j] += q.to(torch.int64)
            r = (r - q) * 2.0**BITS  # the fraction, shifted up: exact
        self.terms += 1

    def value(self) -> torch.Tensor:
        """The sum as float64 ``(dim,)``: the words converted once, in one fixed order."""
        out = torch.zeros(self.dim, dtype=torch.float64)
        for j in range(WORDS):
            out += self._words[j].to(torch.float64) * 2.0 ** (TOP - BITS * (j + 1))
        return out
