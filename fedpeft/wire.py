"""Typed, versioned messages between coordinator and clients, and their Flower encoding.

Every message carries a :class:`Header` (protocol version, run id, round, base-model
fingerprint, adapter-config hash, num_examples, client id). Tensors keep their dtype: Flower's
``Array`` cannot hold bfloat16, so a bf16 tensor travels as its raw 16-bit pattern (``int16``)
with the original dtype recorded beside it, and comes back bit-identical.

Record layout of a message's ``RecordDict`` (the names are constants below, used nowhere else):

- ``fedpeft.header`` (ConfigRecord): the header fields, plus ``kind``.
- ``fedpeft.tensors`` (ArrayRecord): ``"<module>::A"`` (r, in) and ``"<module>::B"`` (out, r).
- ``fedpeft.meta`` (ConfigRecord): ``"dtype:<tensor key>"`` and ``"alpha:<module>"``.
- ``fedpeft.lora`` / ``fedpeft.train`` (ConfigRecord): the adapter spec and training
  hyper-parameters of an instruction.
- ``fedpeft.metrics`` (MetricRecord): what a client measured.

Decoding never unpickles (Flower's ``Array`` uses ``np.load(allow_pickle=False)``) and turns
every inconsistency into a :class:`~fedpeft.errors.ProtocolError` naming the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpeft.config import TrainConfig
from fedpeft.errors import ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "Adapter",
    "ClientInfo",
    "EvalReport",
    "Header",
    "LoraFactors",
    "LoraSpec",
    "LoraUpdate",
    "SharedRecords",
    "TrainInstruction",
    "adapter_nbytes",
    "decode_client_info",
    "decode_eval_report",
    "decode_instruction",
    "decode_update",
    "encode_client_info",
    "encode_eval_report",
    "encode_instruction",
    "encode_query",
    "encode_update",
]

PROTOCOL_VERSION: Final = 1

HEADER: Final = "fedpeft.header"
TENSORS: Final = "fedpeft.tensors"
META: Final = "fedpeft.meta"
LORA: Final = "fedpeft.lora"
TRAIN: Final = "fedpeft.train"
METRICS: Final = "fedpeft.metrics"
INFO: Final = "fedpeft.info"

KIND_INSTRUCTION: Final = "train_instruction"
KIND_LORA_UPDATE: Final = "lora_update"
KIND_CLIENT_INFO: Final = "client_info"
KIND_EVAL_REPORT: Final = "eval_report"
KIND_QUERY: Final = "query"

_DTYPES: Final = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass(frozen=True, slots=True)
class Header:
    """Fields every message carries.

    ``num_examples`` is the sender's aggregation weight in an update, the number of
    examples behind the global adapter in an instruction, and the client's training-set
    size in a client-info reply.
    """

    run_id: str
    server_round: int
    model_fingerprint: str
    adapter_hash: str
    num_examples: int
    client_id: str
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class LoraFactors:
    """One adapted linear layer: ``delta_W = (alpha / r) * B @ A``.

    Attributes
    ----------
    a : torch.Tensor
        ``(r, in_features)``.
    b : torch.Tensor
        ``(out_features, r)``.
    alpha : float
        LoRA alpha; the scale is ``alpha / r``.
    """

    a: torch.Tensor
    b: torch.Tensor
    alpha: float

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() != 2:
            raise ProtocolError(
                f"LoRA factors must be 2-D, got A{tuple(self.a.shape)} and B{tuple(self.b.shape)}"
            )
        if self.a.shape[0] != self.b.shape[1]:
            raise ProtocolError(
                f"LoRA rank mismatch: A is {tuple(self.a.shape)} (r, in) but B is "
                f"{tuple(self.b.shape)} (out, r)"
            )
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ProtocolError(f"LoRA alpha must be finite and > 0, got {self.alpha}")

    @property
    def rank(self) -> int:
        """The rank r."""
        return int(self.a.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / r``."""
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The dense update in float32: ``(alpha/r) * (out, r) @ (r, in) -> (out, in)``."""
        return self.scale * (self.b.float() @ self.a.float())


Adapter = Mapping[str, LoraFactors]  # module name -> factors


@dataclass(frozen=True, slots=True)
class LoraSpec:
    """The structure of an adapter: what a client must build to train it."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    dropout: float = 0.0

    def config_hash(self) -> str:
        """Hash of the structural fields (rank, alpha, targets); dropout is excluded."""
        blob = json.dumps(
            {"rank": self.rank, "alpha": float(self.alpha), "targets": sorted(self.target_modules)},
            sort_keys=True,
        )
        return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class TrainInstruction:
    """What the coordinator asks one client to do in one round.

    Sent as ``train.<mode>`` to train the adapter, or as ``evaluate.<mode>`` to evaluate it on
    the client's held-out records (then ``with_metric`` asks for the task metric too).
    """

    header: Header
    lora: LoraSpec
    train: TrainConfig
    adapter: Adapter
    seed: int
    mode: str = "lora"
    with_metric: bool = False

    @property
    def message_type(self) -> str:
        """Flower message type, routed to ``@app.train(mode)`` on the client."""
        return f"train.{self.mode}"


@dataclass(frozen=True, slots=True)
class LoraUpdate:
    """A client's trained LoRA factors for one round."""

    header: Header
    factors: Adapter
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """What a client tells the coordinator about itself when asked (``query.info``)."""

    header: Header
    device: str
    properties: Mapping[str, float] = field(default_factory=dict)
    node_id: int = 0  # filled in by the coordinator from the reply's metadata

    @property
    def client_id(self) -> str:
        """The client's stable id (its data partition)."""
        return self.header.client_id

    @property
    def num_examples(self) -> int:
        """Training examples the client holds."""
        return self.header.num_examples


@dataclass(frozen=True, slots=True)
class EvalReport:
    """A client's evaluation of the adapter it was sent (``evaluate.lora``).

    ``metrics`` has ``eval_loss`` (mean over ``eval_tokens`` target tokens) and, when the
    task has one, ``eval_<metric>``; ``header.num_examples`` is the number of records used.
    """

    header: Header
    metrics: Mapping[str, float] = field(default_factory=dict)


def adapter_nbytes(adapter: Adapter) -> int:
    """Payload bytes of an adapter's tensors (what the factors themselves weigh)."""
    return sum(
        f.a.numel() * f.a.element_size() + f.b.numel() * f.b.element_size()
        for f in adapter.values()
    )


# ----------------------------------------------------------------------------- header


def _encode_header(header: Header, kind: str) -> ConfigRecord:
    fields = dataclasses.asdict(header)
    fields["kind"] = kind
    return ConfigRecord(fields)


def _get(rec: Mapping[str, Any], key: str, tp: type[Any], where: str) -> Any:
    if key not in rec:
        raise ProtocolError(f"{where} has no field {key!r}")
    value = rec[key]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ProtocolError(f"{where}.{key} must be {tp.__name__}, got {value!r}")
    return value


def _record(content: RecordDict, name: str, tp: type[Any]) -> Any:
    if name not in content:
        raise ProtocolError(f"message has no {name!r} record (records: {sorted(content)})")
    rec = content[name]
    if not isinstance(rec, tp):
        raise ProtocolError(f"record {name!r} must be a {tp.__name__}, got {type(rec).__name__}")
    return rec


def _decode_header(content: RecordDict, kind: str) -> Header:
    rec = _record(content, HEADER, ConfigRecord)
    protocol = _get(rec, "protocol", int, HEADER)
    if protocol != PROTOCOL_VERSION:
        side = "this node" if protocol > PROTOCOL_VERSION else "the sender"
        raise ProtocolError(
            f"message speaks fedpeft protocol {protocol}, this node speaks {PROTOCOL_VERSION}; "
            f"upgrade fedpeft on {side}"
        )
    got_kind = _get(rec, "kind", str, HEADER)
    if got_kind != kind:
        raise ProtocolError(f"expected a {kind!r} message, got {got_kind!r}")
    server_round = _get(rec, "server_round", int, HEADER)
    num_examples = _get(rec, "num_examples", int, HEADER)
    if server_round < 0 or num_examples < 0:
        raise ProtocolError(
            f"header server_round ({server_round}) and num_examples ({num_examples}) must be >= 0"
        )
    return Header(
        run_id=_get(rec, "run_id", str, HEADER),
        server_round=server_round,
        model_fingerprint=_get(rec, "model_fingerprint", str, HEADER),
        adapter_hash=_get(rec, "adapter_hash", str, HEADER),
        num_examples=num_examples,
        client_id=_get(rec, "client_id", str, HEADER),
        protocol=protocol,
    )


# ----------------------------------------------------------------------------- tensors


def _tensor_to_array(t: torch.Tensor) -> tuple[Array, str]:
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ProtocolError(f"cannot send tensors of dtype {t.dtype}; use one of {sorted(_DTYPES)}")
    if t.dtype == torch.bfloat16:
        # numpy has no bfloat16: send the raw bit pattern, bit-exact.
        return Array(t.view(torch.int16).numpy()), name
    return Array(t.numpy()), name


def _array_to_tensor(arr: Array, dtype_name: str, key: str) -> torch.Tensor:
    if dtype_name not in _DTYPES:
        raise ProtocolError(f"tensor {key!r} has unknown dtype {dtype_name!r}")
    try:
        nd = arr.numpy()
    except Exception as err:  # malformed bytes: any numpy/format error
        raise ProtocolError(f"tensor {key!r} could not be decoded: {err}") from None
    want = np.int16 if dtype_name == "bfloat16" else np.dtype(dtype_name)
    if nd.dtype != want:
        raise ProtocolError(
            f"tensor {key!r} is {nd.dtype}, expected {np.dtype(want)} for {dtype_name}"
        )
    t = torch.from_numpy(np.ascontiguousarray(nd).copy())
    return t.view(torch.bfloat16) if dtype_name == "bfloat16" else t


SharedRecords = dict[int, tuple[ArrayRecord, ConfigRecord]]


def _encode_adapter(
    adapter: Adapter, content: dict[str, Any], shared: SharedRecords | None = None
) -> None:
    if shared is not None and id(adapter) in shared:
        content[TENSORS], content[META] = shared[id(adapter)]
        return
    arrays: dict[str, Array] = {}
    meta: dict[str, Any] = {}
    for module in sorted(adapter):
        f = adapter[module]
        for part, tensor in (("A", f.a), ("B", f.b)):
            key = f"{module}::{part}"
            arrays[key], meta[f"dtype:{key}"] = _tensor_to_array(tensor)
        meta[f"alpha:{module}"] = float(f.alpha)
    content[TENSORS] = ArrayRecord(arrays)
    content[META] = ConfigRecord(meta)
    if shared is not None:
        shared[id(adapter)] = (content[TENSORS], content[META])


def _decode_adapter(content: RecordDict) -> dict[str, LoraFactors]:
    arrays = _record(content, TENSORS, ArrayRecord)
    meta = _record(content, META, ConfigRecord)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key in arrays:
        module, sep, part = key.rpartition("::")
        if not sep or part not in ("A", "B") or not module:
            raise ProtocolError(f"tensor key {key!r} is not '<module>::A' or '<module>::B'")
        dtype_name = _get(meta, f"dtype:{key}", str, META)
        parts.setdefault(module, {})[part] = _array_to_tensor(arrays[key], dtype_name, key)
    out: dict[str, LoraFactors] = {}
    for module in sorted(parts):
        if set(parts[module]) != {"A", "B"}:
            raise ProtocolError(
                f"module {module!r} is missing its LoRA factor(s); got {sorted(parts[module])}"
            )
        alpha = _get(meta, f"alpha:{module}", float, META)
        out[module] = LoraFactors(a=parts[module]["A"], b=parts[module]["B"], alpha=alpha)
    return out


# ----------------------------------------------------------------------------- messages


def _decode_lora_spec(
    rec: Mapping[str, Any], where: str, keys: tuple[str, str, str, str]
) -> LoraSpec:
    """A :class:`LoraSpec` from the fields named by ``keys`` (rank, alpha, targets, dropout)."""
    rank, alpha, targets_key, dropout = keys
    targets = rec.get(targets_key)
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ProtocolError(
            f"{where}.{targets_key} must be a non-empty list of str, got {targets!r}"
        )
    return LoraSpec(
        rank=_get(rec, rank, int, where),
        alpha=_get(rec, alpha, float, where),
        target_modules=tuple(targets),
        dropout=_get(rec, dropout, float, where),
    )


def _decode_train(content: RecordDict) -> TrainConfig:
    """The training hyper-parameters of an instruction; unknown fields ask for an upgrade."""
    train_rec = _record(content, TRAIN, ConfigRecord)
    unknown = sorted(set(train_rec) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ProtocolError(f"{TRAIN} has unknown fields {unknown}; upgrade fedpeft on this node")
    try:
        return TrainConfig(**dict(train_rec))
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"{TRAIN} is invalid: {err}") from None


def encode_instruction(ins: TrainInstruction, shared: SharedRecords | None = None) -> RecordDict:
    """Encode a :class:`TrainInstruction` as a Flower ``RecordDict``.

    Pass the same ``shared`` dict when encoding many instructions that carry the very same
    adapter object (a broadcast): its tensors are encoded once and the records reused, so a
    round to N clients holds one copy of the global adapter in memory, not N. (Flower's
    object store deduplicates them on the wire by content hash either way.) Keys are object
    ids, so keep the adapters alive while ``shared`` is in use.
    """
    content: dict[str, Any] = {HEADER: _encode_header(ins.header, KIND_INSTRUCTION)}
    content[LORA] = ConfigRecord(
        {
            "rank": ins.lora.rank,
            "alpha": float(ins.lora.alpha),
            "dropout": float(ins.lora.dropout),
            "target_modules": list(ins.lora.target_modules),
            "seed": ins.seed,
            "mode": ins.mode,
            "with_metric": ins.with_metric,
        }
    )
    content[TRAIN] = ConfigRecord(dataclasses.asdict(ins.train))
    _encode_adapter(ins.adapter, content, shared)
    return RecordDict(content)


def decode_instruction(content: RecordDict) -> TrainInstruction:
    """Decode what :func:`encode_instruction` produced.

    Raises
    ------
    ProtocolError
        If any record or field is missing, mistyped or inconsistent.
    """
    header = _decode_header(content, KIND_INSTRUCTION)
    lora = _record(content, LORA, ConfigRecord)
    spec = _decode_lora_spec(lora, LORA, ("rank", "alpha", "target_modules", "dropout"))
    train = _decode_train(content)
    return TrainInstruction(
        header=header,
        lora=spec,
        train=train,
        adapter=_decode_adapter(content),
        seed=_get(lora, "seed", int, LORA),
        mode=_get(lora, "mode", str, LORA),
        with_metric=_get(lora, "with_metric", bool, LORA),
    )


def encode_update(update: LoraUpdate) -> RecordDict:
    """Encode a :class:`LoraUpdate` as a Flower ``RecordDict``."""
    content: dict[str, Any] = {HEADER: _encode_header(update.header, KIND_LORA_UPDATE)}
    _encode_adapter(update.factors, content)
    content[METRICS] = MetricRecord({k: float(v) for k, v in update.metrics.items()})
    return RecordDict(content)


def decode_update(content: RecordDict) -> LoraUpdate:
    """Decode what :func:`encode_update` produced.

    Raises
    ------
    ProtocolError
        If any record or field is missing, mistyped or inconsistent.
    """
    header = _decode_header(content, KIND_LORA_UPDATE)
    metrics = _record(content, METRICS, MetricRecord)
    values: dict[str, float] = {}
    for k, v in metrics.items():
        if not isinstance(v, (int, float)):
            raise ProtocolError(f"metric {k!r} must be a number, got {v!r}")
        values[k] = float(v)
    return LoraUpdate(header=header, factors=_decode_adapter(content), metrics=values)


def encode_client_info(info: ClientInfo) -> RecordDict:
    """Encode a :class:`ClientInfo` reply."""
    return RecordDict(
        {
            HEADER: _encode_header(info.header, KIND_CLIENT_INFO),
            INFO: ConfigRecord({"device": info.device}),
            METRICS: MetricRecord({k: float(v) for k, v in info.properties.items()}),
        }
    )


def decode_client_info(content: RecordDict, node_id: int = 0) -> ClientInfo:
    """Decode what :func:`encode_client_info` produced; ``node_id`` comes from metadata."""
    header = _decode_header(content, KIND_CLIENT_INFO)
    rec = _record(content, INFO, ConfigRecord)
    metrics = _record(content, METRICS, MetricRecord)
    props = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    return ClientInfo(
        header=header,
        node_id=node_id,
        device=_get(rec, "device", str, INFO),
        properties=props,
    )


def encode_query(run_id: str) -> RecordDict:
    """The coordinator's ``query.info`` message: just who is asking."""
    return RecordDict(
        {HEADER: ConfigRecord({"protocol": PROTOCOL_VERSION, "kind": KIND_QUERY, "run_id": run_id})}
    )


def encode_eval_report(report: EvalReport) -> RecordDict:
    """Encode an :class:`EvalReport` reply."""
    return RecordDict(
        {
            HEADER: _encode_header(report.header, KIND_EVAL_REPORT),
            METRICS: MetricRecord({k: float(v) for k, v in report.metrics.items()}),
        }
    )


def decode_eval_report(content: RecordDict) -> EvalReport:
    """Decode what :func:`encode_eval_report` produced."""
    header = _decode_header(content, KIND_EVAL_REPORT)
    metrics = _record(content, METRICS, MetricRecord)
    values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if not all(math.isfinite(v) for v in values.values()):
        raise ProtocolError(f"evaluation metrics must be finite, got {values}")
    return EvalReport(header=header, metrics=values)
