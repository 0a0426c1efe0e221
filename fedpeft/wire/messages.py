"""Typed, versioned messages between coordinator and clients, and their Flower encoding.

Every message carries a :class:`Header` (protocol version, run id, round, base-model
fingerprint, adapter-config hash, num_examples, client id). Tensors keep their dtype: Flower's
``Array`` cannot hold bfloat16, so a bf16 tensor travels as its raw 16-bit pattern (``int16``)
with the original dtype recorded beside it, and comes back bit-identical.

Record layout of a message's ``RecordDict`` (the names are constants below, used nowhere else):

- ``fedpeft.header`` (ConfigRecord): the header fields, plus ``kind``.
- ``fedpeft.tensors`` / ``fedpeft.meta`` (ArrayRecord / ConfigRecord): the adapter,
  ``"<module>::A"`` (r, in) and ``"<module>::B"`` (out, r), exact or through a codec, whole
  or one factor (see :mod:`fedpeft.wire.adapter`).
- ``fedpeft.base`` / ``fedpeft.base_meta``: an instruction's frozen adapter that the client
  merges into its base weights before training (FLoRA), when there is one.
- ``fedpeft.lora`` / ``fedpeft.train`` / ``fedpeft.compress`` (ConfigRecord): the adapter
  spec, which factors to train, training hyper-parameters and codecs of an instruction.
- ``fedpeft.metrics`` (MetricRecord): what a client measured.
- ``fedpeft.prune`` (ConfigRecord): an instruction's pruning plan, or the structure an
  update's factors belong to (see :mod:`fedpeft.wire.prune`).

Decoding never unpickles (Flower's ``Array`` uses ``np.load(allow_pickle=False)``) and turns
every inconsistency into a :class:`~fedpeft.errors.ProtocolError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, TypeVar, cast

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpeft.config import CompressConfig, TrainConfig
from fedpeft.errors import ProtocolError
from fedpeft.wire.adapter import (
    PARTS,
    SharedRecords,
    adapter_nbytes,
    decode_adapter,
    encode_adapter,
    records_nbytes,
)
from fedpeft.wire.codecs import CodecSpec, ErrorFeedback
from fedpeft.wire.prune import PRUNE, PrunePlan, decode_keep, decode_plan, encode_keep, encode_plan
from fedpeft.wire.types import (
    Adapter,
    LoraFactors,
    LoraSpec,
    get_field,
    get_flag,
    get_float,
    get_record,
    get_text,
)

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
    "decode_refusal",
    "decode_update",
    "encode_client_info",
    "encode_eval_report",
    "encode_instruction",
    "encode_query",
    "encode_refusal",
    "encode_update",
    "instruction_payload",
    "records_nbytes",
    "update_payload",
]

PROTOCOL_VERSION: Final = 1
T = TypeVar("T")

HEADER: Final = "fedpeft.header"
TENSORS: Final = "fedpeft.tensors"
META: Final = "fedpeft.meta"
BASE: Final = "fedpeft.base"
BASE_META: Final = "fedpeft.base_meta"
AUX: Final = "fedpeft.aux"  # an algorithm's tensors laid out like the adapter (SCAFFOLD's c)
AUX_META: Final = "fedpeft.aux_meta"
COMPRESS: Final = "fedpeft.compress"
LORA: Final = "fedpeft.lora"
TRAIN: Final = "fedpeft.train"
PERSONAL: Final = "personal"  # option of an evaluation: the node evaluates its own model
OPTIONS: Final = "fedpeft.options"  # the algorithm's own per-client options (one record)
OptionValue = bool | int | float | str
METRICS: Final = "fedpeft.metrics"
INFO: Final = "fedpeft.info"

KIND_INSTRUCTION: Final = "train_instruction"
KIND_LORA_UPDATE: Final = "lora_update"
KIND_CLIENT_INFO: Final = "client_info"
KIND_EVAL_REPORT: Final = "eval_report"
KIND_QUERY: Final = "query"
KIND_REFUSAL: Final = "refusal"


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
class TrainInstruction:
    """What the coordinator asks one client to do in one round.

    Sent as ``train.<mode>`` to train the adapter, or as ``evaluate.<mode>`` to evaluate it on
    the client's held-out records (then ``with_metric`` asks for the task metric too).
    """

    family: ClassVar[str] = "lora"  # its update family (fedpeft.families)
    header: Header
    lora: LoraSpec
    train: TrainConfig
    adapter: Adapter
    seed: int
    mode: str = "lora"
    with_metric: bool = False
    parts: str = "AB"  # factors to train and send back: AB, A (B frozen) or B (A frozen)
    base: Adapter | None = None  # merged into the base weights before training (FLoRA)
    compress: CompressConfig = field(default_factory=CompressConfig)
    prune: PrunePlan | None = None  # FedSpine: structured pruning; adapter cut to prune.keep
    secure: bool = False  # keep the change for secure aggregation; reply with no tensors
    dp_clip: float = 0.0  # secure + DP: clip the kept change to this L2 norm
    dp_noise: float = 0.0  # secure + DP: std of the Gaussian noise this client adds
    # the algorithm's own options for this client (its trainer reads them; e.g. FedProx's mu)
    options: Mapping[str, OptionValue] = field(default_factory=dict)
    # the algorithm's own tensors, laid out like the adapter (SCAFFOLD's server control variate)
    aux: Adapter | None = None
    strategy: str = ""  # the algorithm the coordinator runs (strategy.name); "": not stamped

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.options.items() if not isinstance(v, (bool, int, float, str))}
        if bad:
            raise ProtocolError(f"instruction options must be bool, int, float or str: {bad}")
        if self.parts not in PARTS:
            raise ProtocolError(f"parts must be one of {PARTS}, got {self.parts!r}")
        if self.prune is not None and (self.compress.up != "none" or self.parts != "AB"):
            raise ProtocolError(
                "a pruning instruction trains both factors and sends them exactly "
                f"(parts AB, compress.up none), got parts {self.parts!r}, up {self.compress.up!r}"
            )

    @property
    def up_codec(self) -> CodecSpec:
        """The codec of this client's reply."""
        c = self.compress
        return CodecSpec(name=c.up, ratio=c.ratio, alpha=c.compeft_alpha)

    @property
    def down_codec(self) -> CodecSpec:
        """The codec of this instruction's adapters."""
        return CodecSpec(name=self.compress.down)

    @property
    def message_type(self) -> str:
        """Flower message type, routed to ``@app.train(mode)`` on the client."""
        return f"train.{self.mode}"


@dataclass(frozen=True, slots=True)
class LoraUpdate:
    """A client's trained LoRA factors for one round.

    ``keep`` is the pruned structure the factors belong to (a bitmask of the instruction's
    pruning layout), ``None`` for the whole model.
    """

    family: ClassVar[str] = "lora"
    header: Header
    factors: Adapter
    metrics: Mapping[str, float] = field(default_factory=dict)
    keep: bytes | None = None


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


# ----------------------------------------------------------------------------- header


def _encode_header(header: Header, kind: str) -> ConfigRecord:
    fields = dataclasses.asdict(header)
    fields["kind"] = kind
    return ConfigRecord(fields)


def _decode_header(content: RecordDict, kind: str) -> Header:
    rec = get_record(content, HEADER, ConfigRecord)
    protocol = get_field(rec, "protocol", int, HEADER)
    if protocol != PROTOCOL_VERSION:
        side = "this node" if protocol > PROTOCOL_VERSION else "the sender"
        raise ProtocolError(
            f"message speaks fedpeft protocol {protocol}, this node speaks {PROTOCOL_VERSION}; "
            f"upgrade fedpeft on {side}"
        )
    got_kind = get_field(rec, "kind", str, HEADER)
    if got_kind != kind:
        raise ProtocolError(f"expected a {kind!r} message, got {got_kind!r}")
    server_round = get_field(rec, "server_round", int, HEADER)
    num_examples = get_field(rec, "num_examples", int, HEADER)
    if server_round < 0 or num_examples < 0:
        raise ProtocolError(
            f"header server_round ({server_round}) and num_examples ({num_examples}) must be >= 0"
        )
    return Header(
        run_id=get_field(rec, "run_id", str, HEADER),
        server_round=server_round,
        model_fingerprint=get_field(rec, "model_fingerprint", str, HEADER),
        adapter_hash=get_field(rec, "adapter_hash", str, HEADER),
        num_examples=num_examples,
        client_id=get_field(rec, "client_id", str, HEADER),
        protocol=protocol,
    )


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
        rank=get_field(rec, rank, int, where),
        alpha=get_field(rec, alpha, float, where),
        target_modules=tuple(targets),
        dropout=get_field(rec, dropout, float, where),
    )


def _decode_fields(content: RecordDict, name: str, cls: type[T]) -> T:
    """A config dataclass sent as a ConfigRecord; unknown fields ask for an upgrade."""
    rec = get_record(content, name, ConfigRecord)
    unknown = sorted(set(rec) - {f.name for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
    if unknown:
        raise ProtocolError(f"{name} has unknown fields {unknown}; upgrade fedpeft on this node")
    try:
        return cls(**dict(rec))
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"{name} is invalid: {err}") from None


def _decode_train(content: RecordDict) -> TrainConfig:
    """The training hyper-parameters of an instruction."""
    return _decode_fields(content, TRAIN, TrainConfig)


def _section_record(section: Any, shared: SharedRecords | None) -> ConfigRecord:
    """A config section as a record; one record per section object in ``shared`` (a round's
    instructions carry the same ``train`` and ``compress`` sections)."""
    key = ("section", id(section))
    if shared is not None and key in shared:
        return cast(ConfigRecord, shared[key][1])
    record = ConfigRecord(dataclasses.asdict(section))
    if shared is not None:
        shared[key] = (section, record)  # the section is kept so its id is not reused
    return record


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
            "parts": ins.parts,
            "secure": ins.secure,
            "strategy": ins.strategy,
            "dp_clip": float(ins.dp_clip),
            "dp_noise": float(ins.dp_noise),
        }
    )
    content[TRAIN] = _section_record(ins.train, shared)
    content[COMPRESS] = _section_record(ins.compress, shared)
    codec = ins.down_codec
    content[TENSORS], content[META] = encode_adapter(ins.adapter, codec=codec, shared=shared)
    if ins.base is not None:
        content[BASE], content[BASE_META] = encode_adapter(ins.base, codec=codec, shared=shared)
    if ins.aux is not None:
        content[AUX], content[AUX_META] = encode_adapter(ins.aux, codec=codec, shared=shared)
    if ins.prune is not None:
        content[PRUNE] = encode_plan(ins.prune)
    if ins.options:
        content[OPTIONS] = ConfigRecord(dict(sorted(ins.options.items())))
    return RecordDict(content)


def instruction_payload(content: RecordDict) -> int:
    """Payload bytes of an encoded instruction: its adapters' arrays as they travel."""
    return sum(
        records_nbytes(get_record(content, r, ArrayRecord))
        for r in (TENSORS, BASE, AUX)
        if r in content
    )


def decode_instruction(content: RecordDict) -> TrainInstruction:
    """Decode what :func:`encode_instruction` produced.

    Raises
    ------
    ProtocolError
        If any record or field is missing, mistyped or inconsistent.
    """
    header = _decode_header(content, KIND_INSTRUCTION)
    lora = get_record(content, LORA, ConfigRecord)
    spec = _decode_lora_spec(lora, LORA, ("rank", "alpha", "target_modules", "dropout"))
    train = _decode_train(content)
    base = decode_adapter(content, BASE, BASE_META) if BASE in content else None
    aux = decode_adapter(content, AUX, AUX_META) if AUX in content else None
    return TrainInstruction(
        header=header,
        lora=spec,
        train=train,
        adapter=decode_adapter(content, TENSORS, META),
        seed=get_field(lora, "seed", int, LORA),
        mode=get_field(lora, "mode", str, LORA),
        with_metric=get_field(lora, "with_metric", bool, LORA),
        parts=get_field(lora, "parts", str, LORA),
        base=base,
        compress=_decode_fields(content, COMPRESS, CompressConfig),
        prune=decode_plan(content),
        secure=get_flag(lora, "secure", LORA),
        strategy=get_text(lora, "strategy", LORA),
        dp_clip=get_float(lora, "dp_clip", LORA),
        dp_noise=get_float(lora, "dp_noise", LORA),
        options=_decode_options(content),
        aux=aux,
    )


def _decode_options(content: RecordDict) -> dict[str, OptionValue]:
    if OPTIONS not in content:
        return {}
    rec = get_record(content, OPTIONS, ConfigRecord)
    out: dict[str, OptionValue] = {}
    for key, value in rec.items():
        if not isinstance(value, (bool, int, float, str)):
            raise ProtocolError(f"{OPTIONS}.{key} must be bool, int, float or str", "decode")
        out[str(key)] = value
    return out


def encode_update(
    update: LoraUpdate,
    ins: TrainInstruction | None = None,
    feedback: ErrorFeedback | None = None,
) -> RecordDict:
    """Encode a :class:`LoraUpdate` as a Flower ``RecordDict``.

    With the instruction it answers, only the trained factors travel (``ins.parts``), through
    the upload codec; a lossy codec sends ``trained - received`` (with ``feedback``, the
    sender's error-feedback residual, for sparse codecs).
    """
    content: dict[str, Any] = {HEADER: _encode_header(update.header, KIND_LORA_UPDATE)}
    if ins is None:
        content[TENSORS], content[META] = encode_adapter(update.factors)
    else:
        content[TENSORS], content[META] = encode_adapter(
            update.factors,
            codec=ins.up_codec,
            parts=ins.parts,
            reference=ins.adapter,
            feedback=feedback,
        )
    content[METRICS] = MetricRecord({k: float(v) for k, v in update.metrics.items()})
    if update.keep is not None:
        content[PRUNE] = encode_keep(update.keep)
    return RecordDict(content)


def decode_update(content: RecordDict, reference: Adapter | None = None) -> LoraUpdate:
    """Decode what :func:`encode_update` produced.

    ``reference`` (the instruction's adapter) fills a factor the client did not send and is
    added back to a delta-encoded update.

    Raises
    ------
    ProtocolError
        If any record or field is missing, mistyped or inconsistent.
    """
    header = _decode_header(content, KIND_LORA_UPDATE)
    metrics = get_record(content, METRICS, MetricRecord)
    values: dict[str, float] = {}
    for k, v in metrics.items():
        if not isinstance(v, (int, float)):
            raise ProtocolError(f"metric {k!r} must be a number, got {v!r}")
        values[k] = float(v)
    factors = decode_adapter(content, TENSORS, META, reference)
    return LoraUpdate(header=header, factors=factors, metrics=values, keep=decode_keep(content))


def update_payload(content: RecordDict) -> int:
    """Payload bytes of an encoded update: its arrays as they travel."""
    return records_nbytes(get_record(content, TENSORS, ArrayRecord)) if TENSORS in content else 0


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
    rec = get_record(content, INFO, ConfigRecord)
    metrics = get_record(content, METRICS, MetricRecord)
    props = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    return ClientInfo(
        header=header,
        node_id=node_id,
        device=get_field(rec, "device", str, INFO),
        properties=props,
    )


def encode_query(run_id: str) -> RecordDict:
    """The coordinator's ``query.info`` message: just who is asking."""
    return RecordDict(
        {HEADER: ConfigRecord({"protocol": PROTOCOL_VERSION, "kind": KIND_QUERY, "run_id": run_id})}
    )


def encode_refusal(run_id: str, reason: str) -> RecordDict:
    """The coordinator's ``query.refused`` message: this node is left out of the run, and why."""
    return RecordDict(
        {
            HEADER: ConfigRecord(
                {"protocol": PROTOCOL_VERSION, "kind": KIND_REFUSAL, "run_id": run_id}
            ),
            INFO: ConfigRecord({"reason": reason}),
        }
    )


def decode_refusal(content: RecordDict) -> tuple[str, str]:
    """``(run_id, reason)`` of a ``query.refused`` message."""
    rec = get_record(content, HEADER, ConfigRecord)
    if get_field(rec, "kind", str, HEADER) != KIND_REFUSAL:
        raise ProtocolError(f"expected a {KIND_REFUSAL!r} message")
    reason = get_field(get_record(content, INFO, ConfigRecord), "reason", str, INFO)
    return get_field(rec, "run_id", str, HEADER), reason


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
    metrics = get_record(content, METRICS, MetricRecord)
    values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if not all(math.isfinite(v) for v in values.values()):
        raise ProtocolError(f"evaluation metrics must be finite, got {values}")
    return EvalReport(header=header, metrics=values)
