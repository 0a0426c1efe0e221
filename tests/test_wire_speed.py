"""The faster wire paths give Flower's bytes exactly: .npy arrays and message serialization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedpeft._flwr import WireCache, roundtrip, serialize, set_message_id, set_task_identity
from fedpeft.wire.npy import array_of, ndarray_of

ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.zeros((0, 3), np.int16),
    np.arange(5, dtype=np.uint32),
    np.full((), 3.0),
    np.ones((2, 2), np.float16),
    np.asfortranarray(np.arange(6.0).reshape(2, 3)),  # Flower's own path
    np.arange(6.0).reshape(2, 3).T,  # not C-contiguous: Flower's own path
    np.array([1, 2], dtype=">i4"),  # not native byte order: Flower's own path
    np.zeros((70_000,), np.float32),  # several of Flower's array chunks
]


@pytest.mark.parametrize("nd", ARRAYS, ids=lambda a: f"{a.dtype}{a.shape}")
def test_array_of_makes_flowers_bytes_and_ndarray_of_reads_them(nd: np.ndarray) -> None:
    ours, theirs = array_of(nd), Array(nd)
    assert ours.data == theirs.data and ours.object_id == theirs.object_id
    assert (ours.dtype, tuple(ours.shape), ours.stype) == (
        theirs.dtype, tuple(theirs.shape), theirs.stype,
    )  # fmt: skip
    back = ndarray_of(theirs)
    assert back.dtype == nd.dtype and back.shape == nd.shape and np.array_equal(back, nd)


def test_ndarray_of_refuses_what_numpy_refuses() -> None:
    good = Array(np.arange(4, dtype=np.float32))
    short = Array(dtype=good.dtype, shape=tuple(good.shape), stype=good.stype, data=good.data[:-4])
    with pytest.raises(ValueError, match="read|size|shape|elements"):
        ndarray_of(short)  # numpy's own error: the data is shorter than the header says
    pickled = Array(np.array([1, "a"], dtype=object).astype(str))  # a str array: no pickle
    assert ndarray_of(pickled).tolist() == ["1", "a"]


def _message(i: int, shared: ArrayRecord) -> Message:
    content = RecordDict(
        {
            "h": ConfigRecord({"client": str(i), "n": i, "x": -0.0 if i % 2 else 0.0,
                               "flag": bool(i % 3), "ints": [1, i], "b": b"\x00" * i}),
            "same": ConfigRecord({"lr": 1e-3, "steps": 3, "on": True}),
            # equal in Python (1 == 1.0 == True, 0.0 == -0.0), not on the wire
            "typed": ConfigRecord({"v": 1, "on": True, "z": 0.0} if i % 2 else
                                  {"v": 1.0, "on": 1, "z": -0.0}),
            "zero": ConfigRecord({"z": 0.0 if i % 2 else -0.0}),
            "t": shared,
            "own": ArrayRecord({"w": Array(np.full((4, 4), float(i % 2), np.float32))}),
            "dup": ArrayRecord({"a": Array(np.zeros(3)), "b": Array(np.zeros(3))}),
        }
    )  # fmt: skip
    msg = Message(content, 10_000 + i, "train.lora", group_id="1")
    set_message_id(msg)
    return msg


def test_wire_cache_counts_and_serializes_exactly_as_flower() -> None:
    set_task_identity(1, 1)  # what a ServerApp's grid sets before it makes messages
    shared = ArrayRecord({"a": Array(torch.randn(8, 16).numpy()), "b": Array(np.zeros((16, 8)))})
    messages = [_message(i, shared) for i in range(12)]
    # the default tables, and small ones that start over along the way
    for cache in (WireCache(), WireCache(max_entries=5)):
        for msg in messages * 2:
            full = serialize(msg)
            assert cache.nbytes(msg) == sum(len(b) for b in full.values())
            root, objects = cache.serialize(msg)
            assert objects == full and root == msg.object_id
    # an independent copy made from those bytes
    copy = roundtrip(messages[3], cache)
    assert copy.content["h"]["client"] == "3" and copy.content["h"]["x"] == 0.0
    assert copy.content["typed"]["v"] == 1 and isinstance(copy.content["typed"]["v"], int)
    assert copy.content["typed"]["on"] is True
    assert copy.content is not messages[3].content


def test_the_in_process_grid_counts_the_replies_it_serialized_exactly() -> None:
    """With ``serialize=True`` a reply's bytes are counted as the grid makes them: the count
    the coordinator would take (Flower's deflated objects, each once), for replies that share
    arrays, repeat equal ones and carry errors; a wrapper, or ``serialize=False``, says none."""
    from flwr.clientapp import ClientApp

    from fedpeft._flwr import GridWrapper, carried_nbytes, message_nbytes
    from fedpeft.simulation.inprocess import FIRST_NODE_ID, InProcessGrid

    app = ClientApp()
    shared = ArrayRecord({"a": Array(np.ones((8, 16), np.float32))})

    @app.train()
    def train(msg: Message, context) -> Message:  # type: ignore[no-untyped-def]
        i = int(context.node_config["partition-id"])
        if i == 3:
            raise ValueError("this client fails")
        return Message(_message(i, shared).content, reply_to=msg)

    for wire in (True, False):
        grid = InProcessGrid(app, [{"partition-id": i} for i in range(5)], serialize=wire)
        set_task_identity(1, 1)
        asks = [Message(RecordDict(), FIRST_NODE_ID + i, "train", group_id="1") for i in range(5)]
        replies = list(grid.send_and_receive(asks))
        assert len(replies) == 5 and sum(r.has_error() for r in replies) == 1
        for reply in replies:
            counted = carried_nbytes(grid, reply)
            assert counted == (message_nbytes(reply) if wire else None)
            assert carried_nbytes(GridWrapper(grid), reply) is None
