"""The few private Flower pieces fedpeft relies on, isolated here.

Checked against flwr 1.41.0. Everything else in fedpeft uses Flower's public App API
(``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp``). If a Flower upgrade breaks an import
below, this is the only file to fix.

- ``flwr.supercore.inflatable``: a ``Message`` is a content-addressed object tree
  (Message -> RecordDict -> records -> Arrays -> <= 5 MiB ArrayChunks); each object's
  ``deflate()`` is exactly what Flower pushes over the network (before HTTP framing). We use
  it to count the bytes of every message and to round-trip messages in the in-process grid.
- ``flwr.supercore.task_identity.TaskIdentity``: a ``Message`` constructor reads the run id
  and node id from this process-wide identity; the in-process grid must set it.
- ``flwr.supercore.run.Run``: what ``Grid.run`` returns.
- ``flwr.common.constant.ErrorCode``: the codes of the error replies Flower's runtime makes
  itself (a node without heartbeat, an expired message), so they are named as such.
- ``flwr.cli.build.build_fab_from_disk``, ``flwr.proto.fab_pb2.GetFabResponse`` and
  ``flwr.supercore.primitives.asymmetric_ed25519.create_message_to_sign``: how ``flwr run``
  builds an app bundle (deterministically), how a node fetches it, and what a node verifies
  an app signature against, so fedpeft signs exactly what a node checks
  (:mod:`fedpeft.deploy.signing`).
- ``flwr.superlink.grid.http_grid.HttpGrid`` and ``flwr.supercore.inflatable``'s pull
  helpers: :func:`pull_bounded` pulls a reply object by object and stops at a size limit.
- ``flwr.common.serde``: Flower's own protobuf encoding of a ``Context`` and a ``RecordDict``,
  which the deployed node's per-message ClientApp uses to hand a message to the node's
  long-lived model worker (no pickle).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast, runtime_checkable
from uuid import uuid4

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.fab_pb2 import GetFabResponse  # pylint: disable=E0611
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import (
    _get_computed_object_ids,
    get_all_nested_objects,
    get_object_id,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.errors import ProtocolError

T = TypeVar("T")
R = TypeVar("R")

__all__ = [
    "REPLY_TOO_LARGE",
    "SERVER_NODE_ID",
    "UNAVAILABLE_CODES",
    "GetFabResponse",
    "GridWrapper",
    "WireCache",
    "build_fab",
    "carried_nbytes",
    "context_from_bytes",
    "context_to_bytes",
    "fab_signing_message",
    "make_run",
    "message_nbytes",
    "node_of",
    "pull_bounded",
    "records_from_bytes",
    "records_to_bytes",
    "roundtrip",
    "roundtrip_counted",
    "send_bounded",
    "serialize",
    "set_message_id",
    "set_task_identity",
]

SERVER_NODE_ID = 1  # Flower's SUPERLINK_NODE_ID
#: Error replies the runtime makes when a node or message is gone: no heartbeat from the
#: node within its patience, the instruction or its reply expired, or its objects never came.
UNAVAILABLE_CODES = frozenset(
    {ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE}
)


def message_nbytes(message: Message) -> int:
    """Bytes of a message as Flower sends it: the sum of its deflated objects.

    Parameters
    ----------
    message : Message
        Any Flower message, with content or with an error.

    Returns
    -------
    int
        Total length of the serialized object tree (metadata, records, array chunks).
    """
    return WireCache().nbytes(message)


_CONFIG_TAGS = {bool: "b", int: "i", float: "f", str: "s", bytes: "y"}


def _frozen(value: Any) -> Any:
    """A ``ConfigRecord`` value as a hashable key that tells apart whatever serializes apart
    (``True`` from ``1``, ``-0.0`` from ``0.0``: floats by their bits)."""
    if isinstance(value, list):
        return ("l", tuple(_frozen(v) for v in value))
    tag = _CONFIG_TAGS.get(type(value))
    if tag is None:
        raise TypeError(f"not a ConfigRecord value: {type(value).__name__}")
    return (tag, value.hex() if tag == "f" else value)


class WireCache:
    """Serializes and counts messages exactly as Flower does, faster when messages repeat
    records (a round's instructions share all but their header; replies share their tensor
    metadata).

    Flower deflates every object of a message to address it by the hash of its bytes; a
    ``ConfigRecord`` has no change tracking, so each serialization converts each of its values
    again. Here a ``ConfigRecord``'s bytes are made once per distinct content (keyed by its
    values, types included) and its id handed to Flower's own per-context id cache
    (``no_object_id_recompute``); counting keeps each object's length by its content id (the
    same id is the same bytes). Flower 1.41 keeps that cache in the private
    ``_get_computed_object_ids`` and the id in ``__dict__["_object_id"]``, read only inside the
    context; a test compares every count and every byte with Flower's own deflation. Memory is
    bounded: ``max_entries`` per table, then it starts over.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._records: dict[tuple[Any, ...], tuple[str, bytes]] = {}  # content -> (id, bytes)
        self._sizes: dict[str, int] = {}  # object id -> deflated length

    def _config(self, record: ConfigRecord) -> tuple[str, bytes]:
        key = tuple((k, _frozen(v)) for k, v in record.items())
        got = self._records.get(key)
        if got is None:
            body = record.deflate()
            got = (get_object_id(body), body)
            if len(self._records) >= self.max_entries:
                self._records.clear()
            self._records[key] = got
        return got

    def _seed(self, message: Message) -> dict[str, bytes]:
        """Inside ``no_object_id_recompute``: give every ``ConfigRecord`` of ``message`` its
        id from the cache; returns their bytes by id."""
        computed, out = _get_computed_object_ids(), {}
        for record in message.content.values() if message.has_content() else ():
            if type(record) is ConfigRecord:
                oid, body = self._config(record)
                record.__dict__["_object_id"] = oid
                computed.add(oid)
                out[oid] = body
        return out

    def nbytes(self, message: Message) -> int:
        """The message's serialized bytes (each distinct object once, as Flower sends it)."""
        with no_object_id_recompute():
            known = self._seed(message)
            total = 0
            for oid, obj in get_all_nested_objects(message).items():
                size = len(known[oid]) if oid in known else self._sizes.get(oid)
                if size is None:
                    size = len(obj.deflate())
                    if len(self._sizes) >= self.max_entries:
                        self._sizes.clear()
                    self._sizes[oid] = size
                total += size
        return total

    def serialize(self, message: Message) -> tuple[str, dict[str, bytes]]:
        """The message's id and every object of its tree, deflated, by id (what Flower pushes)."""
        with no_object_id_recompute():
            known = self._seed(message)
            objects = {
                oid: known[oid] if oid in known else obj.deflate()
                for oid, obj in get_all_nested_objects(message).items()
            }
            return message.object_id, objects


def serialize(message: Message) -> dict[str, bytes]:
    """Every object of a message's tree, deflated, by object id (what Flower pushes).

    Object ids are content hashes of the deflated bytes; as in Flower's own grids, they are
    computed once per object (``no_object_id_recompute``) rather than once per access.
    """
    with no_object_id_recompute():
        return {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}


def carried_nbytes(grid: Grid, message: Message) -> int | None:
    """The serialized bytes of ``message`` where ``grid`` counted them as it carried it (the
    in-process grid that round-trips every message: the bytes it made); ``None`` where it did
    not. A :class:`GridWrapper` does not pass this on: a wrapper may change a message after
    the grid under it counted it."""
    count = getattr(grid, "carried_nbytes", None)
    return count(message) if callable(count) else None


def roundtrip_counted(message: Message, cache: WireCache | None = None) -> tuple[Message, int]:
    """:func:`roundtrip`, and the bytes it serialized (every distinct object of the message's
    tree, as :meth:`WireCache.nbytes` counts them)."""
    root, contents = (cache or WireCache()).serialize(message)
    nbytes = sum(len(body) for body in contents.values())  # (inflating consumes ``contents``)
    copy = cast(Message, inflate_object_from_contents(root, contents))
    set_message_id(copy, message.metadata.message_id)
    return copy, nbytes


def roundtrip(message: Message, cache: WireCache | None = None) -> Message:
    """Serialize a message to its wire objects and build a new one from those bytes.

    Parameters
    ----------
    message : Message
        The message to send.
    cache : WireCache | None
        Records already serialized (a grid keeps one for its messages).

    Returns
    -------
    Message
        An independent copy made only from the serialized bytes (message id kept).
    """
    return roundtrip_counted(message, cache)[0]


def set_message_id(message: Message, message_id: str | None = None) -> str:
    """Give a message an id, as a SuperLink does when it stores it."""
    mid = message_id if message_id is not None else str(uuid4())
    message.metadata.__dict__["_message_id"] = mid
    return mid


def set_task_identity(run_id: int, node_id: int) -> None:
    """Set the process-wide identity Flower's ``Message`` constructor reads."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id


def build_fab(app: Path) -> bytes:
    """The Flower app bundle ``flwr run APP`` builds and submits (same bytes: fixed dates)."""
    from flwr.cli.build import build_fab_from_disk  # the CLI's module: imported only here

    return bytes(build_fab_from_disk(app))


def fab_signing_message(fab_digest: bytes, signed_at: int) -> bytes:
    """What an app signature signs, as a Flower node verifies it."""
    return bytes(create_message_to_sign(fab_digest, signed_at))


def make_run(run_id: int) -> Run:
    """An empty Flower ``Run`` record for an in-process run."""
    return Run.create_empty(run_id=run_id)


def context_to_bytes(context: Context) -> bytes:
    """A node's ``Context`` (ids, node and run config, state) in Flower's protobuf encoding."""
    return bytes(context_to_proto(context).SerializeToString())


def _parsed(data: bytes, proto: T, convert: Callable[[T], R], what: str) -> R:
    """``convert(proto parsed from data)``; any failure of either step is a ``ProtocolError``.

    Flower's converters assume well-formed protobufs: on corrupted input they raise
    ``AttributeError``, ``TypeError``, ``KeyError``... (found by fuzzing; flwr 1.41).
    """
    try:
        proto.ParseFromString(data)  # type: ignore[attr-defined]
        return convert(proto)
    except Exception as err:  # network input: every failure is a bad message
        raise ProtocolError(f"{what} bytes do not parse: {type(err).__name__}: {err}") from None


def context_from_bytes(data: bytes) -> Context:
    """The ``Context`` encoded by :func:`context_to_bytes` (protobuf parsing only)."""
    return _parsed(data, ProtoContext(), context_from_proto, "Context")


def records_to_bytes(records: RecordDict) -> bytes:
    """A ``RecordDict`` (a message's content) in Flower's protobuf encoding."""
    return bytes(recorddict_to_proto(records).SerializeToString())


def records_from_bytes(data: bytes) -> RecordDict:
    """The ``RecordDict`` encoded by :func:`records_to_bytes` (protobuf parsing only)."""
    return _parsed(data, ProtoRecordDict(), recorddict_from_proto, "RecordDict")


def node_of(grid: Grid, client_id: str) -> int | None:
    """The node of ``client_id`` where ``grid`` knows it without asking (the in-process grid's
    ``node_of``); ``None`` where it does not, or the grid cannot say (Ray, a SuperLink)."""
    find = getattr(grid, "node_of", None)
    return find(client_id) if callable(find) else None


class GridWrapper(Grid):
    """A ``Grid`` that hands every call to ``grid``; subclasses change what they need.

    Checked against the abstract methods of ``flwr.serverapp.Grid`` in flwr 1.41.
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Any) -> None:
        """Delegated."""
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        """Delegated."""
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """Delegated."""
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """Delegated."""
        return self.grid.get_node_ids()

    def node_of(self, client_id: str) -> int | None:
        """Delegated where the wrapped grid addresses client ids (``None`` otherwise)."""
        return node_of(self.grid, client_id)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegated."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegated."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Delegated."""
        return self.grid.send_and_receive(messages, timeout=timeout)


# ---------------------------------------------------------------------- bounded pull
@runtime_checkable
class ReplyLimits(Protocol):
    """A ``Grid`` that stops pulling a reply once it passes a byte limit (the deployed
    runtime's polling grid, :class:`fedpeft.deploy.apps.PollingGrid`)."""

    def limit_replies(self, limits: Mapping[int, int]) -> None:
        """Byte limits, per destination node, for the replies of the next exchange."""


def send_bounded(
    grid: Grid, messages: list[Message], limits: Mapping[int, int], timeout: float | None
) -> list[Message]:
    """``grid.send_and_receive``, announcing each destination node's reply limit in bytes
    where the grid can enforce it before a reply is pulled whole."""
    if isinstance(grid, ReplyLimits):
        grid.limit_replies(limits)
    return list(grid.send_and_receive(messages, timeout=timeout))


#: Error code of a reply fedpeft stopped pulling because it passed its size limit (not one of
#: Flower's ``ErrorCode`` values, which stop at 8 in flwr 1.41).
REPLY_TOO_LARGE = 1001


class _TooLarge(Exception):
    def __init__(self, nbytes: int) -> None:
        super().__init__(nbytes)
        self.nbytes = nbytes


class _Budget:
    """Pulls one reply's objects (``fetch``), counting their bytes; past ``limit``, stops."""

    def __init__(self, fetch: Callable[[str], bytes], limit: int | None) -> None:
        self.fetch = fetch
        self.limit = limit
        self.pulled = 0
        self._lock = threading.Lock()  # Flower pulls a reply's objects from several threads

    def __call__(self, object_id: str) -> bytes:
        data = self.fetch(object_id)
        with self._lock:
            self.pulled += len(data)
            if self.limit is not None and self.pulled > self.limit:
                raise _TooLarge(self.pulled)
        return data


def pull_bounded(
    grid: Grid, message_ids: Iterable[str], limits: Mapping[str, int]
) -> list[Message]:
    """``grid.pull_messages``, except that on the deployed runtime a reply whose objects pass
    ``limits[reply_to_message_id]`` bytes is not pulled further: it becomes an error reply
    (code :data:`REPLY_TOO_LARGE`) and the SuperLink is told it was received, so it drops it.

    Flower's ``HttpGrid.pull_messages`` (flwr 1.41) pulls every object of a reply before the
    caller sees any byte of it, so a node could make the coordinator hold whatever it pushes.
    This is that method's loop with a byte count around each object pull. Other grids (the
    in-process grid, Ray's) hold replies in memory already and are pulled as they are.
    """
    from flwr.app.message import make_message
    from flwr.app.metadata import Metadata
    from flwr.proto.message_pb2 import (  # pylint: disable=E0611
        ConfirmMessageReceivedRequest,
    )
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
    from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, pull_objects
    from flwr.superlink.grid.http_grid import HttpGrid

    ids = list(message_ids)
    if not isinstance(grid, HttpGrid):
        return list(grid.pull_messages(ids))
    client, node, run_id = grid._runtime_client, grid.node, grid.run.run_id  # noqa: SLF001
    res = client.PullMessages(PullAppMessagesRequest(message_ids=ids))
    out: list[Message] = []
    for proto, tree in zip(res.messages_list, res.message_object_trees, strict=True):
        msg_id, reply_to = proto.metadata.message_id, proto.metadata.reply_to_message_id
        limit = limits.get(reply_to)
        budget = _Budget(make_pull_object_fn_protobuf(client.PullObject, node, run_id), limit)
        error: Error | None = None
        try:
            objects = [t.object_id for t in iterate_object_tree(tree)]
            contents = pull_objects(objects, pull_object_fn=budget)
        except _TooLarge as big:
            error = Error(
                code=REPLY_TOO_LARGE,
                reason=f"reply is larger than {limit} bytes: pulling stopped after "
                f"{big.nbytes} bytes (validation.max_reply_mb)",
            )
        except ObjectPullError as err:
            error = Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason=f"reply objects: {err}")
        if error is not None:
            meta = Metadata(
                run_id=run_id, message_id="", src_node_id=proto.metadata.src_node_id,
                dst_node_id=node.node_id, reply_to_message_id=reply_to, group_id="",
                created_at=time.time(), ttl=0, message_type=proto.metadata.message_type,
            )  # fmt: skip
            out.append(make_message(metadata=meta, error=error))
        else:
            message = cast(Message, inflate_object_from_contents(msg_id, contents))
            message.metadata.__dict__["_message_id"] = msg_id
            out.append(message)
        # received (or refused): either way the SuperLink may drop its copy
        client.ConfirmMessageReceived(
            ConfirmMessageReceivedRequest(node=node, run_id=run_id, message_object_id=msg_id)
        )
    return out
