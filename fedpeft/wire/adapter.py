"""LoRA adapters in Flower records: exact tensors, codecs, partial and delta encodings.

An adapter is two records: an ``ArrayRecord`` of tensors and a ``ConfigRecord`` of metadata.

- ``"<module>::A"`` / ``"<module>::B"``: the tensor itself (codec ``none``; dtype kept,
  bfloat16 as its raw 16-bit pattern), or ``"<module>::B|<field>"`` arrays of a lossy codec
  (:mod:`fedpeft.wire.codecs`) with ``"shape:<key>"`` beside the dtype. A lossy codec gets ``B``
  transposed, ``(r, out)``, so both factors are coded with one row (and one int8 scale) per
  rank component.
- metadata: ``"dtype:<key>"``, ``"alpha:<module>"``, and for the whole adapter ``codec``,
  ``parts`` (``AB``, ``A`` or ``B``: which factors travel) and ``delta`` (values are
  ``tensor - reference``).

A partial or delta adapter needs the receiver's reference (the instruction it answers) to
decode: the missing factor is the reference's, and the reference is added back to a delta.
Decoding never unpickles and raises :class:`~fedpeft.errors.ProtocolError` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedpeft.errors import ProtocolError
from fedpeft.wire.codecs import CodecSpec, ErrorFeedback, decode_tensor, encode_tensor
from fedpeft.wire.npy import array_of, ndarray_of
from fedpeft.wire.types import Adapter, LoraFactors, get_field, get_record

__all__ = [
    "PARTS",
    "SharedRecords",
    "adapter_nbytes",
    "decode_adapter",
    "encode_adapter",
    "records_nbytes",
]

PARTS: Final = ("AB", "A", "B")
DTYPES: Final = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
SharedRecords = dict[Any, Any]  # broadcast records by (object id, encoding)


def adapter_nbytes(adapter: Adapter) -> int:
    """Payload bytes of an adapter's tensors as held (unencoded)."""
    return sum(
        f.a.numel() * f.a.element_size() + f.b.numel() * f.b.element_size()
        for f in adapter.values()
    )


def records_nbytes(arrays: ArrayRecord) -> int:
    """Payload bytes of an encoded adapter: the raw bytes of every array that travels."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays.values())


def _tensor_to_array(t: torch.Tensor) -> tuple[Array, str]:
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ProtocolError(f"cannot send tensors of dtype {t.dtype}; use one of {sorted(DTYPES)}")
    if t.dtype == torch.bfloat16:
        # numpy has no bfloat16: send the raw bit pattern, bit-exact.
        return array_of(t.view(torch.int16).numpy()), name
    return array_of(t.numpy()), name


def _to_numpy(arr: Array, key: str) -> np.ndarray:
    try:
        return ndarray_of(arr)
    except Exception as err:  # malformed bytes: any numpy/format error
        raise ProtocolError(f"tensor {key!r} could not be decoded: {err}") from None


def _array_to_tensor(arr: Array, dtype_name: str, key: str) -> torch.Tensor:
    if dtype_name not in DTYPES:
        raise ProtocolError(f"tensor {key!r} has unknown dtype {dtype_name!r}")
    nd = _to_numpy(arr, key)
    want = np.int16 if dtype_name == "bfloat16" else np.dtype(dtype_name)
    if nd.dtype != want:
        raise ProtocolError(
            f"tensor {key!r} is {nd.dtype}, expected {np.dtype(want)} for {dtype_name}", "dtype"
        )
    t = torch.from_numpy(np.ascontiguousarray(nd).copy())
    return t.view(torch.bfloat16) if dtype_name == "bfloat16" else t


def encode_adapter(
    adapter: Adapter,
    *,
    codec: CodecSpec | None = None,
    parts: str = "AB",
    reference: Adapter | None = None,
    feedback: ErrorFeedback | None = None,
    shared: SharedRecords | None = None,
) -> tuple[ArrayRecord, ConfigRecord]:
    """The two records of ``adapter``.

    Parameters
    ----------
    adapter : Adapter
        What to send.
    codec : CodecSpec | None
        Lossy codec (``None`` or ``none``: exact tensors).
    parts : str
        ``AB``, or only ``A`` / ``B`` (the receiver holds the other factor).
    reference : Adapter | None
        With a lossy codec, send ``adapter - reference`` (the update, which codecs are made
        for); the receiver adds its copy of ``reference`` back.
    feedback : ErrorFeedback | None
        With a sparse codec, the sender's residual (updated in place).
    shared : SharedRecords | None
        Cache of already encoded adapters keyed by object id and encoding (broadcasts).
    """
    codec = codec or CodecSpec()
    if parts not in PARTS:
        raise ProtocolError(f"parts must be one of {PARTS}, got {parts!r}")
    cache_key = (id(adapter), codec, parts)
    if shared is not None and cache_key in shared:
        return cast(tuple[ArrayRecord, ConfigRecord], shared[cache_key])
    delta = codec.name != "none" and reference is not None
    arrays: dict[str, Array] = {}
    meta: dict[str, Any] = {"codec": codec.name, "parts": parts, "delta": delta}
    if codec.name != "none":
        meta["ratio"], meta["alpha"] = float(codec.ratio), float(codec.alpha)
    for module in sorted(adapter):
        f = adapter[module]
        for part, tensor in (("A", f.a), ("B", f.b)):
            if part not in parts:
                continue
            key = f"{module}::{part}"
            meta[f"dtype:{key}"] = str(tensor.dtype).removeprefix("torch.")
            if codec.name == "none":
                arrays[key], _ = _tensor_to_array(tensor)
                continue
            x = tensor.float()
            if delta:
                assert reference is not None
                ref = reference[module]
                x = x - (ref.a if part == "A" else ref.b).float()
            if part == "B":
                x = x.T.contiguous()  # (r, out): rows are rank components, as for A
            if feedback is not None and codec.sparse:
                x = feedback.apply(key, x)
            fields = encode_tensor(x, codec)
            if feedback is not None and codec.sparse:
                rows, cols = x.shape
                feedback.record(key, x, decode_tensor(fields, codec, (rows, cols), key))
            for name, value in fields.items():
                arrays[f"{key}|{name}"] = array_of(value)
            meta[f"shape:{key}"] = [int(s) for s in x.shape]
        meta[f"alpha:{module}"] = float(f.alpha)
    out = (ArrayRecord(arrays), ConfigRecord(meta))
    if shared is not None:
        shared[cache_key] = out
    return out


def _codec_of(meta: Mapping[str, Any], where: str) -> CodecSpec:
    name = get_field(meta, "codec", str, where) if "codec" in meta else "none"
    if name == "none":
        return CodecSpec()
    return CodecSpec(
        name=name,
        ratio=get_field(meta, "ratio", float, where),
        alpha=get_field(meta, "alpha", float, where),
    )


def _shape(meta: Mapping[str, Any], key: str, where: str) -> tuple[int, int]:
    shape = meta.get(f"shape:{key}")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) for s in shape)):
        raise ProtocolError(f"{where}.shape:{key} must be [rows, cols], got {shape!r}")
    return int(shape[0]), int(shape[1])


def _group(arrays: ArrayRecord) -> dict[str, dict[str, dict[str, Array]]]:
    """module -> part -> field ('' for an exact tensor) -> array."""
    out: dict[str, dict[str, dict[str, Array]]] = {}
    for key in arrays:
        base, _, field = key.partition("|")
        module, sep, part = base.rpartition("::")
        if not sep or part not in ("A", "B") or not module:
            raise ProtocolError(f"tensor key {key!r} is not '<module>::A' or '<module>::B'")
        out.setdefault(module, {}).setdefault(part, {})[field] = arrays[key]
    return out


def decode_adapter(
    content: RecordDict, tensors: str, meta_name: str, reference: Adapter | None = None
) -> dict[str, LoraFactors]:
    """Decode the adapter stored in records ``tensors`` / ``meta_name`` of ``content``.

    ``reference`` supplies the factor a partial adapter leaves out and is added back to a
    delta-encoded one; it must be given when the records say they need it.
    """
    arrays = get_record(content, tensors, ArrayRecord)
    meta = get_record(content, meta_name, ConfigRecord)
    codec = _codec_of(meta, meta_name)
    parts = get_field(meta, "parts", str, meta_name) if "parts" in meta else "AB"
    delta = bool(meta.get("delta", False))
    if parts not in PARTS:
        raise ProtocolError(f"{meta_name}.parts must be one of {PARTS}, got {parts!r}")
    if (delta or parts != "AB") and reference is None:
        raise ProtocolError(
            f"{tensors} is partial ({parts}) or a delta; decoding needs the instruction's adapter"
        )
    grouped = _group(arrays)
    if reference is not None and parts != "AB" and set(grouped) != set(reference):
        raise ProtocolError(
            f"{tensors} modules {sorted(grouped)[:3]}... differ from the instruction's"
        )
    out: dict[str, LoraFactors] = {}
    for module in sorted(grouped):
        got = grouped[module]
        if set(got) != set(parts):
            raise ProtocolError(
                f"module {module!r} is missing its LoRA factor(s): carries {sorted(got)}, "
                f"expected {list(parts)}"
            )
        factors: dict[str, torch.Tensor] = {}
        for part in "AB":
            key = f"{module}::{part}"
            if part not in parts:
                assert reference is not None
                ref = reference[module]
                factors[part] = (ref.a if part == "A" else ref.b).clone()
                continue
            dtype_name = get_field(meta, f"dtype:{key}", str, meta_name)
            if dtype_name not in DTYPES:
                raise ProtocolError(f"tensor {key!r} has unknown dtype {dtype_name!r}")
            if codec.name == "none":
                if set(got[part]) != {""}:
                    raise ProtocolError(f"tensor {key!r} has codec fields but codec is none")
                factors[part] = _array_to_tensor(got[part][""], dtype_name, key)
                continue
            fields = {name: _to_numpy(arr, key) for name, arr in got[part].items()}
            x = decode_tensor(fields, codec, _shape(meta, key, meta_name), key)
            if part == "B":
                x = x.T  # sent as (r, out)
            if delta:
                assert reference is not None
                if module not in reference:
                    raise ProtocolError(f"delta for {module!r}, which the instruction lacks")
                ref_t = reference[module].a if part == "A" else reference[module].b
                if tuple(ref_t.shape) != tuple(x.shape):
                    raise ProtocolError(
                        f"{key}: delta {tuple(x.shape)} vs instruction {tuple(ref_t.shape)}"
                    )
                x = x + ref_t.float()
            factors[part] = x.to(DTYPES[dtype_name])
        alpha = get_field(meta, f"alpha:{module}", float, meta_name)
        out[module] = LoraFactors(a=factors["A"], b=factors["B"], alpha=alpha)
    return out
