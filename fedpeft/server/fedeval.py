"""Federated evaluation: every client evaluates the global adapter on its own held-out share.

Complements the coordinator's centralized evaluation where the coordinator has no data of its
own, or to see how the global adapter does on each client's distribution. LoRA runs only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedpeft._flwr import message_nbytes, send_bounded
from fedpeft.config import TrainConfig
from fedpeft.errors import ProtocolError, clip
from fedpeft.wire.messages import (
    Adapter,
    ClientInfo,
    EvalReport,
    Header,
    LoraSpec,
    SharedRecords,
    TrainInstruction,
    decode_eval_report,
    encode_instruction,
)

__all__ = ["federated_eval"]

REPORT_LIMIT = 1_000_000  # an evaluation report is a header and a few numbers


def _report(reply: Message, run_id: str, server_round: int, cid: str) -> EvalReport:
    if reply.has_error():
        raise ProtocolError(f"client error: {reply.error.reason}", "client_error")
    report = decode_eval_report(reply.content)
    h = report.header
    if (h.run_id, h.server_round, h.client_id) != (run_id, server_round, cid):
        raise ProtocolError(
            f"report is for run/round/client {h.run_id}/{h.server_round}/{h.client_id}"
        )
    if "eval_loss" not in report.metrics or "eval_tokens" not in report.metrics:
        raise ProtocolError(f"report lacks eval_loss/eval_tokens: {sorted(report.metrics)}")
    return report


def _weighted(reports: Sequence[EvalReport]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    keys = sorted(
        {k for r in reports for k in r.metrics if k.startswith("eval_")} - {"eval_tokens"}
    )
    for key in keys:
        # loss: per target token; task metrics: per record
        pairs = [
            (
                r.metrics[key],
                r.metrics["eval_tokens"] if key == "eval_loss" else r.header.num_examples,
            )
            for r in reports
            if key in r.metrics
        ]
        total = sum(w for _, w in pairs)
        out[f"fed_{key}"] = sum(v * w for v, w in pairs) / total if total else None
    return out


def federated_eval(
    grid: Grid,
    clients: Sequence[ClientInfo],
    header: Header,
    spec: LoraSpec,
    adapter: Adapter,
    train: TrainConfig,
    metric: bool,
    timeout: float,
) -> dict[str, Any]:
    """Send ``evaluate.lora`` to every client and combine their reports.

    ``header`` is stamped with each client's id. Returns ``fed_eval_loss`` (weighted by target
    tokens), ``fed_eval_<metric>`` (weighted by records), ``fed_eval_clients``,
    ``fed_eval_failures`` and the bytes both ways.
    """
    msgs, asked = [], {}
    shared: SharedRecords = {}
    for c in clients:
        h = Header(header.run_id, header.server_round, header.model_fingerprint, spec.config_hash(),
                   header.num_examples, c.client_id)  # fmt: skip
        ins = TrainInstruction(h, spec, train, adapter, seed=0, with_metric=metric)
        msgs.append(Message(encode_instruction(ins, shared), c.node_id, f"evaluate.{ins.mode}"))
        asked[c.node_id] = c.client_id
    replies = send_bounded(grid, msgs, dict.fromkeys(asked, REPORT_LIMIT), timeout)
    reports, failures = [], {}
    for reply in replies:
        cid = asked.get(reply.metadata.src_node_id, "?")
        try:
            reports.append(_report(reply, header.run_id, header.server_round, cid))
        except ProtocolError as err:
            failures[cid] = clip(err.reason)
    return {
        "fed_eval_bytes_down": sum(message_nbytes(m) for m in msgs),
        "fed_eval_bytes_up": sum(message_nbytes(r) for r in replies),
        "fed_eval_clients": len(reports),
        "fed_eval_failures": failures,
        **_weighted(reports),
    }
