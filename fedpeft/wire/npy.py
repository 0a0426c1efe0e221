"""Flower ``Array`` <-> numpy, byte for byte as Flower does it, without re-parsing headers.

Flower stores an ``Array``'s data in numpy's ``.npy`` format (``np.save`` /
``np.load(allow_pickle=False)``). For a small LoRA factor most of that time goes to writing
and parsing the text header (numpy parses it with ``ast.literal_eval``), and a round sends the
same few shapes thousands of times. Here the header of each (dtype, shape) is made by
``np.save`` itself once and reused, and a received header is parsed by numpy's own
``read_array_header_*`` once per distinct header; the data then is the raw bytes after it.
The bytes are exactly Flower's (a test compares them), and anything unusual (Fortran order,
an object dtype, a length that does not match the header) goes through Flower's own path, so
errors stay numpy's.
"""

from __future__ import annotations

import functools
import io
import struct

import numpy as np
from flwr.app import Array

__all__ = ["array_of", "ndarray_of"]

MAGIC = b"\x93NUMPY"
NUMPY_STYPE = "numpy.ndarray"  # flwr.app.array.SType.NUMPY in flwr 1.41


@functools.lru_cache(maxsize=4096)
def _header_for(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype), allow_pickle=False)
    full = buf.getvalue()
    return full[: len(full) - int(np.prod(shape)) * dtype.itemsize]


def array_of(nd: np.ndarray) -> Array:
    """``Array(nd)``, the same bytes, with the header made once per (dtype, shape)."""
    if not (nd.flags.c_contiguous and nd.dtype.isnative) or nd.dtype.hasobject:
        return Array(nd)  # Flower's own path for anything unusual
    header = _header_for(nd.dtype, tuple(nd.shape))
    return Array(
        dtype=str(nd.dtype), shape=tuple(nd.shape), stype=NUMPY_STYPE, data=header + nd.tobytes()
    )


@functools.lru_cache(maxsize=4096)
def _parsed(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool] | None:
    """(dtype, shape, fortran order) of a ``.npy`` header, parsed by numpy; ``None`` when
    numpy refuses it or it holds Python objects."""
    fh = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(fh)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(fh)
    except Exception:  # numpy's own path reports the problem
        return None
    if dtype.hasobject or fh.tell() != len(header):
        return None
    return dtype, tuple(shape), bool(fortran)


def ndarray_of(arr: Array) -> np.ndarray:
    """``arr.numpy()`` (read-only), parsing each distinct header once.

    Raises what ``arr.numpy()`` raises for anything this fast path does not take.
    """
    data = arr.data
    if arr.stype != NUMPY_STYPE or len(data) < 12 or data[:6] != MAGIC:
        return arr.numpy()
    if data[6] == 1:
        end = 10 + struct.unpack("<H", data[8:10])[0]
    else:
        end = 12 + struct.unpack("<I", data[8:12])[0]
    parsed = _parsed(bytes(data[:end])) if end <= len(data) else None
    if parsed is None:
        return arr.numpy()
    dtype, shape, fortran = parsed
    count = int(np.prod(shape))
    if fortran or len(data) - end != count * dtype.itemsize:
        return arr.numpy()
    return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape)
