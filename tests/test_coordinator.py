"""The coordinator rejects bad updates alone, records why, and fails a round cleanly."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.client.app import make_client_app
from fedpeft.errors import REJECT_CODES, RoundError
from fedpeft.server.app import run_server
from fedpeft.server.results import RunReporter
from fedpeft.simulation.inprocess import InProcessGrid
from fedpeft.wire.messages import HEADER, TENSORS


def _corrupting(wrap, real: ClientApp, corrupt, victims: set[int]) -> ClientApp:
    def train(msg: Message, ctx: Context) -> Message:
        reply = real(msg, ctx)
        if int(ctx.node_config["partition-id"]) in victims:
            corrupt(reply.content)
        return reply

    return wrap(real, {"train.lora": train})


def _run(cfg, tmp_path, app, cache):
    n = cfg.federation.num_clients
    grid = InProcessGrid(app, [{"partition-id": i} for i in range(n)])
    reporter = RunReporter(tmp_path, cfg.federation.rounds, quiet=True)
    summary = run_server(grid, cfg, tmp_path, reporter, cache)
    rows = [
        __import__("json").loads(line)
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    return summary, rows


def _set_header(field, value):
    def corrupt(content: RecordDict) -> None:
        content[HEADER][field] = value

    return corrupt


def _first(content: RecordDict, fn) -> None:
    key = sorted(content[TENSORS])[0]
    content[TENSORS][key] = Array(fn(content[TENSORS][key].numpy().copy()))


def _poke(value):
    def corrupt(content: RecordDict) -> None:
        def put(arr):
            arr.flat[0] = value
            return arr

        _first(content, put)

    return corrupt


def _scale(content: RecordDict) -> None:
    for key in sorted(content[TENSORS]):
        content[TENSORS][key] = Array(content[TENSORS][key].numpy() * 1e6)


def _as_int(content: RecordDict) -> None:
    _first(content, lambda arr: arr.astype(np.int32))


def _truncate(content: RecordDict) -> None:
    key = sorted(content[TENSORS])[0]
    arr = content[TENSORS][key]
    arr.data = arr.data[: len(arr.data) // 2]


def _drop_module(content: RecordDict) -> None:
    for key in sorted(content[TENSORS])[:2]:
        del content[TENSORS][key]


def _bloat(content: RecordDict) -> None:
    content["padding"] = ArrayRecord({"x": Array(np.zeros(600_000, np.float32))})


def _lower_rank(content: RecordDict) -> None:
    for key in sorted(content[TENSORS]):
        arr = content[TENSORS][key].numpy()
        content[TENSORS][key] = Array(arr[:2].copy() if key.endswith("::A") else arr[:, :2].copy())


# Every bad input of issue 8 section 1 that a LoRA client can send, with its typed code.
BAD_INPUTS = [
    (_set_header("server_round", 0), "replay", "round 0, this is run .* round 1"),
    (_set_header("run_id", "someone-else"), "replay", "run 'someone-else'"),
    (_set_header("model_fingerprint", "0000"), "header", "model_fingerprint"),
    (_set_header("adapter_hash", "0000"), "header", "adapter_hash"),
    (_set_header("num_examples", 10**12), "num_examples", "num_examples is 1000000000000"),
    (_set_header("num_examples", 10**6), "num_examples", "reported at discovery"),
    (_set_header("num_examples", 0), "num_examples", "num_examples is 0"),
    (_set_header("protocol", 99), "decode", "protocol 99"),
    (_poke(np.nan), "nonfinite", "NaN or infinite"),
    (_poke(np.inf), "nonfinite", "NaN or infinite"),
    (_scale, "norm", "above validation.max_update_norm"),
    (_as_int, "dtype", "is int32, expected float32"),
    (_truncate, "decode", "could not be decoded|bytes"),
    (_drop_module, "structure", "modules differ"),
    (_lower_rank, "structure", "expected A\\(4,"),
    (_bloat, "payload_size", "the limit for this instruction"),
]


@pytest.mark.parametrize(("corrupt", "code", "reason"), BAD_INPUTS)
def test_bad_update_rejected_alone_with_its_code(
    tiny_config, tmp_path, cache, wrap_app, corrupt, code, reason
):
    cfg = tiny_config("federation.rounds=1", "federation.min_clients=2")
    app = _corrupting(wrap_app, make_client_app(cfg, cache), corrupt, victims={1})
    summary, rows = _run(cfg, tmp_path, app, cache)
    row = rows[1]
    assert row["clients"] == 2 and row["client_ids"] == ["0", "2"]
    assert list(row["failures"]) == ["1"]
    assert row["rejected"] == {code: 1}
    assert row["failures"]["1"].startswith(f"{code}: ")
    assert re.search(reason, row["failures"]["1"]), row["failures"]["1"]
    assert summary["failures"] == 1 and row["eval_loss"] is not None


def test_every_rejection_code_is_documented():
    assert {code for _, code, _ in BAD_INPUTS} <= set(REJECT_CODES)


class _Twice(InProcessGrid):
    """Delivers every training reply twice (a replayed or duplicated message)."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        if any(m.metadata.message_type == "train.lora" for m in messages):
            replies += replies[:1]
        return replies


def test_duplicate_reply_is_counted_and_ignored(tiny_config, tmp_path, cache):
    cfg = tiny_config("federation.rounds=1")
    n = cfg.federation.num_clients
    grid = _Twice(make_client_app(cfg, cache), [{"partition-id": i} for i in range(n)])
    run_server(grid, cfg, tmp_path, RunReporter(tmp_path, 1, quiet=True), cache)
    row = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][1]
    assert row["rejected"] == {"duplicate": 1} and row["failures"] == {}
    assert row["clients"] == n


def test_a_client_claiming_many_examples_cannot_capture_the_average(make_update):
    from fedpeft.server.validate import cap_weights

    ups = [make_update(str(i), num_examples=n) for i, n in enumerate([100, 120, 80, 10**9])]
    capped, count = cap_weights(ups, 10.0)
    assert count == 1 and [u.header.num_examples for u in capped] == [100, 120, 80, 1100]
    share = 1100 / (100 + 120 + 80 + 1100)
    assert share < 0.8  # uncapped it would be 0.9999997
    assert cap_weights(ups, 0.0) == (ups, 0)


def test_client_exception_is_recorded_and_round_goes_on(tiny_config, tmp_path, cache, wrap_app):
    cfg = tiny_config("federation.rounds=1", "federation.min_clients=2")
    real = make_client_app(cfg, cache)

    def train(msg: Message, ctx: Context) -> Message:
        if ctx.node_config["partition-id"] == 0:
            raise RuntimeError("GPU fell off the bus")
        return real(msg, ctx)

    app = wrap_app(real, {"train.lora": train})
    _, rows = _run(cfg, tmp_path, app, cache)
    assert rows[1]["clients"] == 2
    assert "GPU fell off the bus" in rows[1]["failures"]["0"]


def test_round_fails_cleanly_without_enough_valid_updates(tiny_config, tmp_path, cache, wrap_app):
    cfg = tiny_config("federation.rounds=2", "federation.min_clients=2")
    app = _corrupting(wrap_app, make_client_app(cfg, cache), _poke(np.nan), victims={0, 1})
    with pytest.raises(
        RoundError, match=r"round 1 failed: 1 valid updates, need federation.min_clients=2"
    ):
        _run(cfg, tmp_path, app, cache)


def test_sampling_fraction_and_minimum(tiny_config, tmp_path, cache):
    cfg = tiny_config(
        "federation.num_clients=3",
        "federation.fraction_train=0.3",
        "federation.min_clients=2",
        "federation.rounds=3",
    )
    _, rows = _run(cfg, tmp_path, make_client_app(cfg, cache), cache)
    picked = [tuple(r["client_ids"]) for r in rows[1:]]
    assert all(len(p) == 2 for p in picked)
    assert len(set(picked)) > 1  # different clients in different rounds


def test_a_node_whose_scenario_runs_another_algorithm_refuses_the_instruction(
    tiny_config, tmp_path, cache
):
    """Instructions name the coordinator's algorithm; a node resolves its client half from
    its own scenario and refuses when the two differ, instead of training the wrong way."""
    cfg = tiny_config("federation.rounds=1", "federation.min_clients=1")
    other = tiny_config("federation.rounds=1", "strategy.name=ffa")
    with pytest.raises(RoundError) as err:
        _run(cfg, tmp_path, make_client_app(other, cache), cache)
    said = "the coordinator runs algorithm 'fedavg', this node's scenario runs 'ffa'"
    text = str(err.value)  # the reason once, with the clients it hit
    assert "0 valid updates" in text and text.count(said) == 1, err.value
    assert "clients 0, 1, 2: client_error:" in text, err.value
