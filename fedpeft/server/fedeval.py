"""Federated evaluation: every client evaluates the global adapter on its own held-out share.

Complements the coordinator's centralized evaluation where the coordinator has no data of its
own, or to see how the global adapter does on each client's distribution. LoRA runs only.

Personalized evaluation (``eval.personalized``) asks every client for the numbers of its own
model: the global adapter, plus the client's personal part where the algorithm keeps one
(FedSA-LoRA's ``B``). What a user deploying on a device cares about is that device's model,
so these are reported per client and summarized as the mean over clients (each counts once)
and the worst decile: the mean over the worst ``ceil(n / 10)`` clients (highest loss, lowest
task metric).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedpeft._flwr import message_nbytes, send_bounded
from fedpeft.config import TrainConfig
from fedpeft.errors import ProtocolError, clip
from fedpeft.wire.messages import (
    PERSONAL,
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
        # fsum: correctly rounded, so the order replies arrive in (Ray, real nodes) cannot
        # change the last bits
        total = math.fsum(w for _, w in pairs)
        out[f"fed_{key}"] = math.fsum(v * w for v, w in pairs) / total if total else None
    return out


def _personal(reports: Sequence[EvalReport]) -> dict[str, Any]:
    """Mean over clients and worst decile of every ``eval_*`` value (see the module docstring)."""
    out: dict[str, Any] = {}
    keys = sorted(
        {k for r in reports for k in r.metrics if k.startswith("eval_")} - {"eval_tokens"}
    )
    for key in keys:
        values = [float(r.metrics[key]) for r in reports if key in r.metrics]
        worst_first = sorted(values, reverse=key == "eval_loss")  # loss: high is bad
        worst = worst_first[: math.ceil(len(values) / 10)]
        out[f"personal_{key}_mean"] = math.fsum(values) / len(values)  # order-independent
        out[f"personal_{key}_worst10"] = math.fsum(worst) / len(worst)
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
    personal: bool = False,
) -> dict[str, Any]:
    """Send ``evaluate.lora`` to every client and combine their reports.

    ``header`` is stamped with each client's id and base-model fingerprint. Returns
    ``fed_eval_loss`` (weighted by target tokens), ``fed_eval_<metric>`` (weighted by
    records), ``fed_eval_clients``, ``fed_eval_failures`` and the bytes both ways.
    ``personal``: each client evaluates its own model; the keys start with ``personal_`` and
    give the mean over clients and the worst decile (``personal_eval_loss_mean``,
    ``personal_eval_loss_worst10``, ...).
    """
    msgs, asked = [], {}
    shared: SharedRecords = {}
    for c in clients:
        # each client's base model as admitted at discovery (the coordinator's, or the same
        # weights in a quantization model.node_quantizations admits)
        h = Header(header.run_id, header.server_round, c.header.model_fingerprint,
                   spec.config_hash(), header.num_examples, c.client_id)  # fmt: skip
        ins = TrainInstruction(
            h, spec, train, adapter, seed=0, with_metric=metric,
            options={PERSONAL: True} if personal else {},
        )  # fmt: skip
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
    prefix = "personal_eval" if personal else "fed_eval"
    summary = (_personal if personal else _weighted)(reports) if reports else {}
    return {
        f"{prefix}_bytes_down": sum(message_nbytes(m) for m in msgs),
        f"{prefix}_bytes_up": sum(message_nbytes(r) for r in replies),
        f"{prefix}_clients": len(reports),
        f"{prefix}_failures": failures,
        **summary,
    }
