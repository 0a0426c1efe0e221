"""The coordinator rejects bad updates alone, records why, and fails a round cleanly."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.client.app import make_client_app
from fedpeft.errors import RoundError
from fedpeft.server.app import run_server
from fedpeft.server.results import RunReporter
from fedpeft.simulation.inprocess import InProcessGrid
from fedpeft.wire import HEADER, TENSORS


def _wrapping(real: ClientApp, train_fn) -> ClientApp:
    """A ClientApp that answers queries like ``real`` and trains through ``train_fn``."""
    app = ClientApp()

    @app.query("info")
    def info(msg: Message, ctx: Context) -> Message:
        return real(msg, ctx)

    app.train("lora")(train_fn)
    return app


def _corrupting(real: ClientApp, corrupt, victims: set[int]) -> ClientApp:
    def train(msg: Message, ctx: Context) -> Message:
        reply = real(msg, ctx)
        if int(ctx.node_config["partition-id"]) in victims:
            corrupt(reply.content)
        return reply

    return _wrapping(real, train)


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


def _nan(content: RecordDict) -> None:
    key = sorted(content[TENSORS])[0]
    arr = content[TENSORS][key].numpy().copy()
    arr.flat[0] = np.nan
    content[TENSORS][key] = Array(arr)


def _lower_rank(content: RecordDict) -> None:
    for key in sorted(content[TENSORS]):
        arr = content[TENSORS][key].numpy()
        content[TENSORS][key] = Array(arr[:2].copy() if key.endswith("::A") else arr[:, :2].copy())


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_set_header("server_round", 99), "server_round is 99"),
        (_set_header("run_id", "someone-else"), "run_id"),
        (_set_header("model_fingerprint", "0000"), "model_fingerprint"),
        (_set_header("adapter_hash", "0000"), "adapter_hash"),
        (_set_header("num_examples", 10**12), "num_examples is 1000000000000"),
        (_set_header("protocol", 99), "protocol 99"),
        (_nan, "NaN or infinite"),
        (_lower_rank, "expected A\\(4,"),
    ],
)
def test_bad_update_rejected_alone(tiny_config, tmp_path, cache, corrupt, reason):
    cfg = tiny_config("federation.rounds=1", "federation.min_clients=2")
    app = _corrupting(make_client_app(cfg, cache), corrupt, victims={1})
    summary, rows = _run(cfg, tmp_path, app, cache)
    row = rows[1]
    assert row["clients"] == 2 and row["client_ids"] == ["0", "2"]
    assert list(row["failures"]) == ["1"]
    assert "rejected" in row["failures"]["1"]
    assert __import__("re").search(reason, row["failures"]["1"])
    assert summary["failures"] == 1


def test_client_exception_is_recorded_and_round_goes_on(tiny_config, tmp_path, cache):
    cfg = tiny_config("federation.rounds=1", "federation.min_clients=2")
    real = make_client_app(cfg, cache)

    def train(msg: Message, ctx: Context) -> Message:
        if ctx.node_config["partition-id"] == 0:
            raise RuntimeError("GPU fell off the bus")
        return real(msg, ctx)

    app = _wrapping(real, train)
    _, rows = _run(cfg, tmp_path, app, cache)
    assert rows[1]["clients"] == 2
    assert "GPU fell off the bus" in rows[1]["failures"]["0"]


def test_round_fails_cleanly_without_enough_valid_updates(tiny_config, tmp_path, cache):
    cfg = tiny_config("federation.rounds=2", "federation.min_clients=2")
    app = _corrupting(make_client_app(cfg, cache), _nan, victims={0, 1})
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
