"""Wire types of zeroth-order (seed/scalar) training and their compact Flower encoding.

Clients and coordinator exchange only seed indices and scalars:

- **Instruction** (down): the :class:`ZoSpec`, the training hyper-parameters, a :class:`ZoSync`
  with the coefficients that changed since the version the client last synced to, or all of
  them (as non-zero entries or a dense matrix, whichever is smaller) and, for FedKSeed-Pro,
  the seed sampling probabilities.
- **Update** (up): for each local step or projection, a (block, seed index, scalar) triple.

Index arrays travel as ``uint16`` when the pool has at most 65,536 seeds (``uint32`` above),
scalars as ``float32`` (``float16`` optional), all as raw little-endian bytes in a
``ConfigRecord``: no ``np.save`` headers. ``payload_nbytes`` counts exactly those bytes; the
coordinator separately counts the framed Flower message.

The model a coordinator and every synced client hold is
``theta = theta_0 - sum_{b,k} coeffs[b, k] * z(pool_seed_k, tensors of block b)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedpeft.config import TrainConfig
from fedpeft.errors import ProtocolError
from fedpeft.wire.messages import (
    HEADER,
    METRICS,
    TRAIN,
    Header,
    LoraSpec,
    _decode_header,
    _decode_lora_spec,
    _decode_train,
    _encode_header,
)
from fedpeft.wire.types import get_field, get_flag, get_float, get_record, get_text

__all__ = [
    "ZoInstruction",
    "ZoSpec",
    "ZoSync",
    "ZoUpdate",
    "decode_zo_instruction",
    "decode_zo_update",
    "encode_zo_instruction",
    "encode_zo_update",
    "index_dtype",
]

ZO: Final = "fedpeft.zo"
ZO_SYNC: Final = "fedpeft.zo.sync"
ZO_DATA: Final = "fedpeft.zo.data"
KIND_ZO_INSTRUCTION: Final = "zo_instruction"
KIND_ZO_UPDATE: Final = "zo_update"
ALGORITHMS: Final = ("fedkseed", "ferret")
_SCALARS: Final = {"float32": np.float32, "float16": np.float16}


def index_dtype(num_seeds: int) -> type[np.unsignedinteger[Any]]:
    """``uint16`` when seed indices fit (K <= 65,536), else ``uint32``."""
    return np.uint16 if num_seeds <= 65536 else np.uint32


@dataclass(frozen=True, slots=True)
class ZoSpec:
    """Everything a client needs to regenerate directions and train like the coordinator."""

    algorithm: str  # fedkseed | ferret
    target: str  # full | lora
    num_seeds: int  # K
    pool_seed: int
    dist: str = "rademacher"
    eps: float = 5e-4
    lr: float = 3e-7
    local_steps: int = 200
    keep_z: bool = False
    master: str = "auto"
    scalar_dtype: str = "float32"
    block_numel: int = 0
    directions: int = 0
    sync: str = "incremental"
    mask: str = ""  # the variant's direction mask (its repr; "": unmasked), see zo.runtime
    lora: LoraSpec | None = None

    def config_hash(self) -> str:
        """Hash of what makes two nodes' directions and parameters agree."""
        d = {
            "target": self.target,
            "K": self.num_seeds,
            "pool": self.pool_seed,
            "dist": self.dist,
            "blocks": self.block_numel,
            "algorithm": self.algorithm,
            "lora": self.lora.config_hash() if self.lora else None,
        }
        if self.mask:  # (unmasked specs keep the hash they had before masks existed)
            d["mask"] = self.mask
        return hashlib.blake2b(json.dumps(d, sort_keys=True).encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class ZoSync:
    """The coefficients a client must hold at ``to_version``, as absolute float32 values.

    Incremental (``full=False``): the entries changed since ``from_version``, as
    ``blocks``/``seeds``/``values`` triples; the client must hold ``from_version`` or later.
    Full (``full=True``): every coefficient, unlisted entries being zero; with ``dense`` the
    values are the whole (blocks x K) matrix in order instead of triples. A client in any
    state (or none) can apply a full sync.
    """

    from_version: int
    to_version: int
    blocks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint16))
    seeds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint16))
    values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    dense: bool = False
    full: bool = False

    @property
    def nbytes(self) -> int:
        """Payload bytes of the sync."""
        return int(self.blocks.nbytes + self.seeds.nbytes + self.values.nbytes)


@dataclass(frozen=True)
class ZoInstruction:
    """A zeroth-order training instruction for one client and round."""

    family: ClassVar[str] = "zo"  # its update family (fedpeft.families)
    header: Header
    spec: ZoSpec
    train: TrainConfig
    sync: ZoSync
    seed: int
    probs: np.ndarray | None = None  # FedKSeed-Pro seed sampling probabilities, (K,)
    mode: str = "zo"
    secure: bool = False  # keep the scalars for secure aggregation; reply with no pairs
    dp_clip: float = 0.0  # secure + DP: clip the kept direction vector to this L2 norm
    dp_noise: float = 0.0  # secure + DP: std of the Gaussian noise this client adds
    strategy: str = ""  # the algorithm the coordinator runs (strategy.name); "": not stamped

    @property
    def message_type(self) -> str:
        """Flower message type (``train.zo``)."""
        return f"train.{self.mode}"


@dataclass(frozen=True)
class ZoUpdate:
    """What a zeroth-order client sends back: (block, seed index, scalar) triples."""

    family: ClassVar[str] = "zo"
    header: Header
    seeds: np.ndarray  # (n,) uint16/uint32 indices into the pool
    scalars: np.ndarray  # (n,) float32 (or float16)
    blocks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint16))  # (n,) or empty
    synced_version: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def payload_nbytes(self) -> int:
        """Bytes of the indices and scalars themselves."""
        return int(self.seeds.nbytes + self.scalars.nbytes + self.blocks.nbytes)


# ----------------------------------------------------------------------------- helpers


def _bytes(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"))).tobytes()


def _array(
    rec: Mapping[str, Any], key: str, dtype_key: str, where: str, allowed: tuple[str, ...]
) -> np.ndarray:
    raw = get_field(rec, key, bytes, where)
    name = get_field(rec, dtype_key, str, where)
    if name not in allowed:
        raise ProtocolError(f"{where}.{dtype_key} is {name!r}, expected one of {allowed}")
    dt = np.dtype(name).newbyteorder("<")
    if len(raw) % dt.itemsize:
        raise ProtocolError(f"{where}.{key} has {len(raw)} bytes, not a multiple of {dt.itemsize}")
    return np.frombuffer(raw, dtype=dt).astype(np.dtype(name))


def _spec_record(spec: ZoSpec) -> dict[str, Any]:
    d = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "lora"}
    if spec.lora is not None:
        d.update(
            lora_rank=spec.lora.rank,
            lora_alpha=float(spec.lora.alpha),
            lora_targets=list(spec.lora.target_modules),
            lora_dropout=float(spec.lora.dropout),
        )
    return d


def _spec_from(rec: Mapping[str, Any]) -> ZoSpec:
    lora = None
    if "lora_rank" in rec:
        lora = _decode_lora_spec(
            rec, ZO, ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout")
        )
    types = {"int": int, "float": float, "str": str, "bool": bool}
    kwargs: dict[str, Any] = {"lora": lora}
    for f in dataclasses.fields(ZoSpec):
        if f.name != "lora":
            kwargs[f.name] = get_field(rec, f.name, types[str(f.type)], ZO)
    spec = ZoSpec(**kwargs)
    if (
        spec.algorithm not in ALGORITHMS
        or spec.target not in ("full", "lora")
        or spec.num_seeds < 1
    ):
        raise ProtocolError(f"invalid zo spec: {spec}")
    if spec.scalar_dtype not in _SCALARS or not (math.isfinite(spec.eps) and spec.eps > 0):
        raise ProtocolError(f"invalid zo spec: {spec}")
    return spec


# ----------------------------------------------------------------------------- messages


def encode_zo_instruction(ins: ZoInstruction) -> RecordDict:
    """Encode a :class:`ZoInstruction` as a Flower ``RecordDict``."""
    sync = ins.sync
    sync_rec: dict[str, Any] = {
        "from_version": sync.from_version,
        "to_version": sync.to_version,
        "dense": sync.dense,
        "full": sync.full or sync.dense,
        "blocks": _bytes(sync.blocks),
        "blocks_dtype": str(sync.blocks.dtype),
        "seeds": _bytes(sync.seeds),
        "seeds_dtype": str(sync.seeds.dtype),
        "values": _bytes(sync.values),
        "values_dtype": str(sync.values.dtype),
    }
    zo = {
        **_spec_record(ins.spec), "seed": ins.seed, "mode": ins.mode, "secure": ins.secure,
        "strategy": ins.strategy,
        "dp_clip": float(ins.dp_clip), "dp_noise": float(ins.dp_noise),
    }  # fmt: skip
    if ins.probs is not None:
        zo["probs"] = _bytes(ins.probs.astype(np.float32))
    return RecordDict(
        {
            HEADER: _encode_header(ins.header, KIND_ZO_INSTRUCTION),
            ZO: ConfigRecord(zo),
            ZO_SYNC: ConfigRecord(sync_rec),
            TRAIN: ConfigRecord(dataclasses.asdict(ins.train)),
        }
    )


def decode_zo_instruction(content: RecordDict) -> ZoInstruction:
    """Decode what :func:`encode_zo_instruction` produced.

    Raises
    ------
    ProtocolError
        On any missing, mistyped or inconsistent field.
    """
    header = _decode_header(content, KIND_ZO_INSTRUCTION)
    zo = get_record(content, ZO, ConfigRecord)
    spec = _spec_from(zo)
    rec = get_record(content, ZO_SYNC, ConfigRecord)
    idx = ("uint16", "uint32")
    sync = ZoSync(
        from_version=get_field(rec, "from_version", int, ZO_SYNC),
        to_version=get_field(rec, "to_version", int, ZO_SYNC),
        blocks=_array(rec, "blocks", "blocks_dtype", ZO_SYNC, idx),
        seeds=_array(rec, "seeds", "seeds_dtype", ZO_SYNC, idx),
        values=_array(rec, "values", "values_dtype", ZO_SYNC, ("float32", "float64")),
        dense=get_field(rec, "dense", bool, ZO_SYNC),
        full=get_field(rec, "full", bool, ZO_SYNC),
    )
    if not sync.dense and (
        len(sync.seeds) != len(sync.values) or len(sync.blocks) not in (0, len(sync.seeds))
    ):
        raise ProtocolError("zo sync blocks/seeds/values differ in length")
    probs = None
    if "probs" in zo:
        probs = np.frombuffer(get_field(zo, "probs", bytes, ZO), dtype="<f4").astype(np.float32)
        if probs.shape != (spec.num_seeds,) or not np.isfinite(probs).all() or (probs < 0).any():
            raise ProtocolError(f"zo probs must be {spec.num_seeds} finite non-negative floats")
    train = _decode_train(content)
    return ZoInstruction(
        header=header,
        spec=spec,
        train=train,
        sync=sync,
        seed=get_field(zo, "seed", int, ZO),
        probs=probs,
        mode=get_field(zo, "mode", str, ZO),
        secure=get_flag(zo, "secure", ZO),
        dp_clip=get_float(zo, "dp_clip", ZO),
        dp_noise=get_float(zo, "dp_noise", ZO),
        strategy=get_text(zo, "strategy", ZO),
    )


def encode_zo_update(update: ZoUpdate) -> RecordDict:
    """Encode a :class:`ZoUpdate` (raw little-endian index and scalar bytes)."""
    data: dict[str, Any] = {
        "seeds": _bytes(update.seeds),
        "seeds_dtype": str(update.seeds.dtype),
        "scalars": _bytes(update.scalars),
        "scalars_dtype": str(update.scalars.dtype),
        "blocks": _bytes(update.blocks),
        "blocks_dtype": str(update.blocks.dtype),
        "synced_version": update.synced_version,
    }
    return RecordDict(
        {
            HEADER: _encode_header(update.header, KIND_ZO_UPDATE),
            ZO_DATA: ConfigRecord(data),
            METRICS: MetricRecord({k: float(v) for k, v in update.metrics.items()}),
        }
    )


def decode_zo_update(content: RecordDict) -> ZoUpdate:
    """Decode what :func:`encode_zo_update` produced.

    Raises
    ------
    ProtocolError
        On any missing, mistyped or inconsistent field.
    """
    header = _decode_header(content, KIND_ZO_UPDATE)
    rec = get_record(content, ZO_DATA, ConfigRecord)
    idx = ("uint16", "uint32")
    seeds = _array(rec, "seeds", "seeds_dtype", ZO_DATA, idx)
    scalars = _array(rec, "scalars", "scalars_dtype", ZO_DATA, tuple(_SCALARS))
    blocks = _array(rec, "blocks", "blocks_dtype", ZO_DATA, idx)
    if len(seeds) != len(scalars) or (len(blocks) and len(blocks) != len(seeds)):
        raise ProtocolError(
            f"zo update has {len(seeds)} seeds, {len(scalars)} scalars, {len(blocks)} blocks"
        )
    metrics = get_record(content, METRICS, MetricRecord)
    return ZoUpdate(
        header=header,
        seeds=seeds,
        scalars=scalars,
        blocks=blocks,
        synced_version=get_field(rec, "synced_version", int, ZO_DATA),
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
    )
