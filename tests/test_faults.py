"""What a node can do to the coordinator, and what the coordinator does about it.

Huge error texts leave the checkpoint and ``metrics.jsonl`` bounded; a node the runtime says
is gone is named ``unavailable``; a node that hung once is probed, not waited on for a round;
discovery lists every expected client that did not join and every node it refused, with the
reason; run ids are unique per run and survive a resume; a full disk leaves no row ahead of
the checkpoint and no temporary file.
"""

from __future__ import annotations

import errno
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message

from fedpeft._flwr import SERVER_NODE_ID, set_message_id
from fedpeft.client.app import make_client_app
from fedpeft.errors import MAX_REASON, RoundError
from fedpeft.server import checkpoint as checkpoint_module
from fedpeft.server.app import run_server
from fedpeft.server.checkpoint import CHECKPOINT, load_checkpoint
from fedpeft.server.results import RunReporter, format_summary
from fedpeft.simulation.inprocess import FIRST_NODE_ID, InProcessGrid
from fedpeft.wire.messages import HEADER, decode_refusal


class FaultGrid(InProcessGrid):
    """An in-process grid where ``fate(node, k)`` decides what becomes of the k-th message
    (from 1) sent to ``node``: ``"ok"`` (answered), ``"silent"`` (never answered: the node
    hangs) or ``"gone"`` (the runtime answers for the node with Flower's ``NODE_UNAVAILABLE``
    error, as a SuperLink does for a node without heartbeat). Counts what each node was sent.
    """

    def __init__(self, app, configs, fate) -> None:
        super().__init__(app, configs)
        self.fate = fate
        self.sent: dict[int, Counter[str]] = {n: Counter() for n in self.get_node_ids()}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent[node][msg.metadata.message_type] += 1
            what = self.fate(node, sum(self.sent[node].values()))
            if what == "ok":
                ids += list(super().push_messages([msg]))
                continue
            mid = set_message_id(msg)
            ids.append(mid)
            if what == "gone":
                reply = Message(Error(code=5, reason="Error: Node Unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = SERVER_NODE_ID  # from the SuperLink
                set_message_id(reply)
                self._replies[mid] = reply
        return ids


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _serve(cfg, out: Path, grid, cache, resume: bool = False) -> dict:
    reporter = RunReporter(out, cfg.federation.rounds, quiet=True, resume=resume)
    return run_server(grid, cfg, out, reporter, cache, resume=resume)


def _nodes(n: int) -> list[dict]:
    return [{"partition-id": i, "num-partitions": n} for i in range(n)]


@pytest.mark.parametrize(
    ("size", "code"),
    [(30_000_000, "payload_size"), (400_000, "client_error")],
    ids=["30MB-over-the-reply-limit", "400kB-under-it"],
)
def test_huge_error_texts_leave_checkpoint_and_metrics_bounded(
    tiny_config, tmp_path, cache, wrap_app, size, code
):
    cfg = tiny_config("federation.rounds=10", "train.local_steps=1", "eval.every=0")
    real = make_client_app(cfg, cache)

    def train(msg: Message, ctx: Context) -> Message:
        if ctx.node_config["partition-id"] == 1:
            raise RuntimeError("x" * size)
        return real(msg, ctx)

    summary = _serve(cfg, tmp_path, InProcessGrid(wrap_app(real, {"train.lora": train}),
                                                  _nodes(3)), cache)  # fmt: skip
    rows = _rows(tmp_path)
    assert summary["rounds"] == 10 and summary["failures"] == 10
    for row in rows[1:]:
        reason = row["failures"]["1"]
        assert reason.startswith(f"{code}: ") and len(reason) <= MAX_REASON + 80, reason[:200]
        assert row["rejected"] == {code: 1} and row["clients"] == 2
    # the run's records do not grow with what the node sent: 10 rounds, well under 1 MB
    assert (tmp_path / "metrics.jsonl").stat().st_size < 100_000
    state = load_checkpoint(tmp_path / CHECKPOINT)
    assert len(json.dumps([r.get("failures") for r in state["rows"]])) < 10 * (MAX_REASON + 200)
    assert (tmp_path / CHECKPOINT).stat().st_size < 2_000_000


def test_a_node_the_runtime_reports_gone_is_unavailable_not_timeout(tiny_config, tmp_path, cache):
    cfg = tiny_config("federation.rounds=1", "federation.min_clients=2")
    node = FIRST_NODE_ID + 2
    # answers discovery, then the SuperLink reports it gone
    grid = FaultGrid(make_client_app(cfg, cache), _nodes(3),
                     lambda n, k: "gone" if n == node and k > 1 else "ok")  # fmt: skip
    _serve(cfg, tmp_path, grid, cache)
    row = _rows(tmp_path)[1]
    assert row["rejected"] == {"unavailable": 1}
    assert row["failures"] == {"2": "unavailable: Error: Node Unavailable"}


def test_a_hung_node_is_probed_not_waited_on_and_rejoins_when_it_answers(
    tiny_config, tmp_path, cache
):
    cfg = tiny_config("federation.rounds=3", "federation.min_clients=2", "eval.every=0")
    node = FIRST_NODE_ID + 1
    # messages to node 1: discovery (answered), round 1's work (hangs), round 2's probe
    # (still hung), round 3's probe and work (answered again)
    grid = FaultGrid(make_client_app(cfg, cache), _nodes(3),
                     lambda n, k: "silent" if n == node and k in (2, 3) else "ok")  # fmt: skip
    _serve(cfg, tmp_path, grid, cache)
    rows = _rows(tmp_path)
    assert rows[1]["failures"]["1"] == "timeout: no reply before the round timeout"
    # round 2: probed, no answer, so it is not sent the round's work
    assert rows[2]["failures"]["1"].startswith("unavailable: no answer to a probe within 60 s")
    assert rows[2]["rejected"] == {"unavailable": 1} and rows[2]["probe_bytes"] > 0
    # round 3: the probe is answered, so the client trains again
    assert rows[3]["failures"] == {} and rows[3]["client_ids"] == ["0", "1", "2"]
    assert grid.sent[node] == Counter({"query.info": 3, "train.lora": 2})
    assert "probe_bytes" not in rows[1]


def test_discovery_lists_every_node_it_left_out_with_the_reason(
    tiny_config, tmp_path, cache, wrap_app
):
    cfg = tiny_config(
        "federation.rounds=1", "federation.num_clients=3", "federation.connect_timeout_s=0"
    )
    real = make_client_app(cfg, cache)

    def info(msg: Message, ctx: Context) -> Message:
        reply = real(msg, ctx)
        if ctx.node_config.get("other-model"):
            reply.content[HEADER]["model_fingerprint"] = "0123456789abcdef"
        return reply

    told: list[tuple[int, str]] = []

    def refused(msg: Message, ctx: Context) -> Message:
        told.append((ctx.node_id, decode_refusal(msg.content)[1]))
        return real(msg, ctx)

    app = wrap_app(real, {"query.info": info, "query.refused": refused})
    configs = [
        *_nodes(2),  # partitions 0 and 1; partition 2 is claimed only by a node with
        {"partition-id": 2, "num-partitions": 3, "other-model": 1},  # another base model
        {"partition-id": 7, "num-partitions": 3},  # no such partition: its data fails
        {"partition-id": 1, "num-partitions": 3},  # partition 1 again: a later duplicate
        {"partition-id": 9, "own-data": 1},  # its own data, a client id the scenario lacks
    ]
    summary = _serve(cfg, tmp_path, InProcessGrid(app, configs), cache)
    found = summary["discovery"]
    ids = [FIRST_NODE_ID + i for i in range(6)]
    assert found["expected"] == 3 and found["joined"] == ["0", "1"]
    assert found["missing"] == {"2": f"node {ids[2]} was refused"}
    refused = found["refused"]
    assert set(refused) == {str(n) for n in ids[2:]}
    assert "base model 0123456789abcdef (none) vs " in refused[str(ids[2])]
    assert "different weights; load the same model on both sides" in refused[str(ids[2])]
    assert "DataError: partition 7 is outside 0..2" in refused[str(ids[3])]
    assert f"node {ids[1]} joined earlier with the same client id" in refused[str(ids[4])]
    assert "client id '9' is not one of the scenario's 0..2" in refused[str(ids[5])]
    assert _rows(tmp_path)[0]["discovery"] == found
    assert summary["num_clients"] == 2
    table = format_summary(summary, cfg.data.metric)
    assert "clients joined" in table and "2 of 3  (missing 2; 4 node(s) refused" in table
    # the coordinator tells the nodes it decided to refuse; the failing one knows already
    assert sorted(n for n, _ in told) == [ids[2], ids[4], ids[5]]
    assert all(reason == refused[str(n)] for n, reason in told)


def test_each_run_has_its_own_id_and_a_resumed_run_keeps_it(tiny_config, tmp_path, cache):
    cfg = tiny_config("federation.rounds=1", "eval.every=0")
    ids = []
    for name in ("a", "b"):
        _serve(cfg, tmp_path / name, InProcessGrid(make_client_app(cfg, cache), _nodes(3)), cache)
        ids.append(load_checkpoint(tmp_path / name / CHECKPOINT)["run_id"])
    assert ids[0] != ids[1] and ids[0].split("-")[0] == ids[1].split("-")[0]
    longer = tiny_config("federation.rounds=1", "eval.every=0")
    grid = InProcessGrid(make_client_app(longer, cache), _nodes(3))
    _serve(longer, tmp_path / "a", grid, cache, resume=True)  # nothing left to run
    assert load_checkpoint(tmp_path / "a" / CHECKPOINT)["run_id"] == ids[0]


def test_resume_keeps_metrics_while_it_waits_for_nodes(tiny_config, tmp_path, cache):
    cfg = tiny_config("federation.rounds=2", "eval.every=0", "federation.connect_timeout_s=0.2")
    _serve(cfg, tmp_path, InProcessGrid(make_client_app(cfg, cache), _nodes(3)), cache)
    before = (tmp_path / "metrics.jsonl").read_text()
    assert len(before.splitlines()) == 3
    nobody = InProcessGrid(make_client_app(cfg, cache), [])
    with pytest.raises(RoundError, match="0 of 3 expected clients joined"):
        _serve(cfg, tmp_path, nobody, cache, resume=True)
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_a_full_disk_leaves_no_row_ahead_of_the_checkpoint_and_no_temp_file(
    tiny_config, tmp_path, cache, monkeypatch
):
    cfg = tiny_config("federation.rounds=3", "eval.every=0")
    real_save = checkpoint_module.save_checkpoint
    saves = []

    def save(path: Path, state) -> None:
        saves.append(state["round"])
        if state["round"] == 2:  # the write of round 2's checkpoint hits a full disk
            with path.with_name(path.name + ".tmp").open("wb") as fh:
                fh.write(b"")
            real_write = Path.open

            def full(self, *args, **kwargs):
                if self.name.endswith(".tmp"):
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real_write(self, *args, **kwargs)

            monkeypatch.setattr(Path, "open", full)
        real_save(path, state)

    monkeypatch.setattr("fedpeft.server.coordinator.save_checkpoint", save)
    with pytest.raises(OSError, match="No space left"):
        _serve(cfg, tmp_path, InProcessGrid(make_client_app(cfg, cache), _nodes(3)), cache)
    monkeypatch.undo()
    assert saves == [0, 1, 2]
    assert [r["round"] for r in _rows(tmp_path)] == [0, 1]
    assert load_checkpoint(tmp_path / CHECKPOINT)["round"] == 1
    assert not (tmp_path / (CHECKPOINT + ".tmp")).exists()
