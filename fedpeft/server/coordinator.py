"""The round loop: sample, instruct, collect, validate, aggregate, evaluate, record.

The loop talks to clients only through a Flower ``Grid`` (the in-process grid, Flower's Ray
simulation or a real SuperLink) and to the algorithm only through the
:class:`~fedpeft.strategies.base.Strategy` protocol. It stamps every instruction with the
header, counts the bytes of every message it sends and receives (Flower's serialized object
tree, as pushed over the network), validates each update against its instruction and keeps
per-client failures and rejections in the round's metrics.

Per round ``r``: ``k = min(n, max(min_clients, ceil(fraction_train * n)))`` clients are
sampled by a generator seeded with ``(seed, "sample", r)``, so a resumed run samples the same.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedpeft._flwr import message_nbytes
from fedpeft.config import RunConfig
from fedpeft.errors import ProtocolError, RoundError
from fedpeft.seeding import derive_seed, np_rng
from fedpeft.server.validate import validate_update
from fedpeft.strategies.base import Strategy
from fedpeft.wire import (
    Adapter,
    ClientInfo,
    EvalReport,
    Header,
    LoraSpec,
    LoraUpdate,
    SharedRecords,
    TrainInstruction,
    adapter_nbytes,
    decode_client_info,
    decode_eval_report,
    decode_update,
    encode_instruction,
    encode_query,
)

__all__ = ["Coordinator", "EvalFn", "RunResult", "clients_per_round"]

EvalFn = Callable[[LoraSpec, Adapter, bool], dict[str, float]]


def clients_per_round(cfg: RunConfig, available: int) -> int:
    """``min(available, max(min_clients, ceil(fraction_train * available)))``."""
    fed = cfg.federation
    return min(available, max(fed.min_clients, math.ceil(fed.fraction_train * available)))


@dataclass
class RunResult:
    """What a finished run produced."""

    rows: list[dict[str, Any]]
    adapter: Adapter
    spec: LoraSpec
    clients: list[ClientInfo]
    setup_bytes: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0


class Coordinator:
    """Runs federated rounds over a Flower ``Grid``.

    Parameters
    ----------
    cfg : RunConfig
        The scenario.
    grid : Grid
        How messages reach clients.
    strategy : Strategy
        The aggregation algorithm (owns the global adapter).
    spec : LoraSpec
        The run's adapter structure.
    initial : Adapter
        The starting global adapter (evaluated as round 0).
    fingerprint : str
        The base model's fingerprint; clients must have the same.
    run_id : str
        Stamped on every message.
    evaluate : EvalFn | None
        Centralized evaluation of a global adapter (``None``: no evaluation).
    on_row : Callable[[dict[str, Any]], None] | None
        Called with each round's metrics as soon as they exist.
    """

    def __init__(
        self,
        cfg: RunConfig,
        grid: Grid,
        strategy: Strategy,
        spec: LoraSpec,
        initial: Adapter,
        fingerprint: str,
        run_id: str,
        evaluate: EvalFn | None = None,
        on_row: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.grid = grid
        self.strategy = strategy
        self.fingerprint = fingerprint
        self.run_id = run_id
        self.evaluate = evaluate
        self.on_row = on_row
        self.spec = spec
        self.adapter = initial
        self.server_round = 0
        self.examples_behind_global = 0
        self.rows: list[dict[str, Any]] = []
        self.clients: list[ClientInfo] = []

    # ------------------------------------------------------------------ discovery
    def discover(self) -> tuple[list[ClientInfo], dict[str, int]]:
        """Ask every node who it is (``query.info``); returns infos and setup bytes."""
        query = encode_query(self.run_id)
        msgs = [Message(query, node, "query.info") for node in sorted(self.grid.get_node_ids())]
        down = sum(message_nbytes(m) for m in msgs)
        replies = list(
            self.grid.send_and_receive(msgs, timeout=self.cfg.federation.round_timeout_s)
        )
        infos, up, problems = [], 0, []
        for reply in replies:
            up += message_nbytes(reply)
            node = reply.metadata.src_node_id
            if reply.has_error():
                problems.append(f"node {node}: {reply.error.reason}")
                continue
            info = decode_client_info(reply.content, node_id=node)
            if info.header.model_fingerprint != self.fingerprint:
                problems.append(
                    f"node {node} (client {info.client_id}) has base model "
                    f"{info.header.model_fingerprint}, the coordinator {self.fingerprint}"
                )
                continue
            infos.append(info)
        if len(infos) < self.cfg.federation.min_clients:
            raise RoundError(
                0, f"only {len(infos)} usable clients answered; " + "; ".join(problems)
            )
        return sorted(infos, key=lambda c: c.client_id), {
            "setup_bytes_down": down,
            "setup_bytes_up": up,
        }

    # ------------------------------------------------------------------ one round
    def sample(self, server_round: int, clients: Sequence[ClientInfo]) -> list[ClientInfo]:
        """The clients that train in ``server_round`` (seeded, order by client id)."""
        k = clients_per_round(self.cfg, len(clients))
        picked = np_rng(self.cfg.federation.seed, "sample", server_round).choice(
            len(clients), k, replace=False
        )
        return sorted((clients[int(i)] for i in picked), key=lambda c: c.client_id)

    def _train_config(self) -> Any:
        train = self.cfg.train
        if self.cfg.federation.centralized and train.epochs == 0:
            # Same total optimizer steps as the federated run it is the reference for.
            federated = clients_per_round(self.cfg, self.cfg.federation.num_clients)
            train = replace(train, local_steps=train.local_steps * federated)
        return train

    def instructions(
        self, server_round: int, clients: Sequence[ClientInfo]
    ) -> dict[str, TrainInstruction]:
        """Turn the strategy's plans into stamped instructions."""
        plans = self.strategy.configure_train(server_round, clients)
        known = {c.client_id for c in clients}
        unknown = sorted(set(plans) - known)
        if unknown:
            raise RoundError(
                server_round, f"strategy planned for clients {unknown} that were not sampled"
            )
        train = self._train_config()
        return {
            cid: TrainInstruction(
                header=Header(
                    run_id=self.run_id,
                    server_round=server_round,
                    model_fingerprint=self.fingerprint,
                    adapter_hash=plan.spec.config_hash(),
                    num_examples=self.examples_behind_global,
                    client_id=cid,
                ),
                lora=plan.spec,
                train=train,
                adapter=plan.adapter,
                seed=derive_seed(self.cfg.federation.seed, "client-round", server_round, cid),
            )
            for cid, plan in sorted(plans.items())
        }

    def _collect(
        self,
        server_round: int,
        instructions: Mapping[str, TrainInstruction],
        nodes: Mapping[str, int],
    ) -> tuple[list[LoraUpdate], dict[str, str], dict[str, int]]:
        shared: SharedRecords = {}  # one encoded copy of each distinct adapter
        msgs = {
            cid: Message(
                encode_instruction(ins, shared),
                nodes[cid],
                ins.message_type,
                group_id=str(server_round),
            )
            for cid, ins in instructions.items()
        }
        counts = {"bytes_down": sum(message_nbytes(m) for m in msgs.values()), "bytes_up": 0}
        counts["payload_down"] = sum(adapter_nbytes(i.adapter) for i in instructions.values())
        counts["payload_up"] = 0
        by_node = {nodes[cid]: cid for cid in instructions}
        replies = list(
            self.grid.send_and_receive(
                list(msgs.values()), timeout=self.cfg.federation.round_timeout_s
            )
        )
        del msgs, shared
        replies.reverse()
        updates: list[LoraUpdate] = []
        failures: dict[str, str] = {}
        while replies:  # pop as we decode: a reply's bytes are freed once it is a tensor
            reply = replies.pop()
            cid = by_node.get(reply.metadata.src_node_id)
            if cid is None or cid in failures or any(u.header.client_id == cid for u in updates):
                continue  # not asked this round, or a duplicate reply
            counts["bytes_up"] += message_nbytes(reply)
            if reply.has_error():
                failures[cid] = f"client error: {reply.error.reason}"
                continue
            try:
                update = decode_update(reply.content)
                validate_update(update, instructions[cid])
            except ProtocolError as err:
                failures[cid] = f"rejected: {err.reason}"
                continue
            counts["payload_up"] += adapter_nbytes(update.factors)
            updates.append(update)
        for cid in instructions:
            if cid not in failures and not any(u.header.client_id == cid for u in updates):
                failures[cid] = "no reply before the round timeout"
        return updates, failures, counts

    def _evaluate_now(self, server_round: int) -> tuple[bool, bool]:
        ev, last = self.cfg.eval, server_round == self.cfg.federation.rounds
        loss = server_round == 0 or last or (ev.every > 0 and server_round % ev.every == 0)
        metric = (
            server_round == 0
            or last
            or (ev.metric_every > 0 and server_round % ev.metric_every == 0)
        )
        return loss, metric

    def run_round(self, server_round: int, clients: Sequence[ClientInfo]) -> dict[str, Any]:
        """One full round; returns (and reports) its metrics row.

        Raises
        ------
        RoundError
            If fewer than ``min_clients`` valid updates came back.
        """
        t0 = time.perf_counter()
        sampled = self.sample(server_round, clients)
        instructions = self.instructions(server_round, sampled)
        nodes = {c.client_id: c.node_id for c in sampled}
        updates, failures, counts = self._collect(server_round, instructions, nodes)
        if len(updates) < self.cfg.federation.min_clients:
            reasons = "; ".join(f"client {c}: {r}" for c, r in sorted(failures.items()))
            raise RoundError(
                server_round,
                f"{len(updates)} valid updates, need federation.min_clients="
                f"{self.cfg.federation.min_clients}. {reasons}",
            )
        result = self.strategy.aggregate_train(server_round, updates)
        self.adapter, self.spec = result.adapter, result.spec
        self.examples_behind_global = sum(u.header.num_examples for u in updates)
        self.server_round = server_round
        row = self._row(server_round, updates, failures, counts, len(instructions))
        row.update({k: float(v) for k, v in result.metrics.items()})
        row.update(self._eval_row(server_round))
        row["wall_s"] = time.perf_counter() - t0
        self._report(row)
        return row

    def _row(
        self,
        server_round: int,
        updates: Sequence[LoraUpdate],
        failures: Mapping[str, str],
        counts: Mapping[str, int],
        asked: int,
    ) -> dict[str, Any]:
        losses = [
            (u.header.num_examples, u.metrics["train_loss"])
            for u in updates
            if "train_loss" in u.metrics
        ]
        total = sum(n for n, _ in losses)
        return {
            "round": server_round,
            "train_loss": sum(n * v for n, v in losses) / total if total else None,
            "clients": len(updates),
            "client_ids": sorted(u.header.client_id for u in updates),
            "failures": dict(sorted(failures.items())),
            "num_examples": self.examples_behind_global,
            "bytes_up": counts["bytes_up"],
            "bytes_down": counts["bytes_down"],
            "bytes_up_per_client": counts["bytes_up"] / max(len(updates), 1),
            "bytes_down_per_client": counts["bytes_down"] / max(asked, 1),
            "payload_up": counts["payload_up"],
            "payload_down": counts["payload_down"],
            "train_s_max": max((u.metrics.get("train_s", 0.0) for u in updates), default=0.0),
            "local_steps_max": max((u.metrics.get("steps", 0.0) for u in updates), default=0.0),
        }

    def _eval_row(self, server_round: int) -> dict[str, Any]:
        loss, metric = self._evaluate_now(server_round)
        out: dict[str, Any] = {"eval_loss": None}
        if loss and self.evaluate is not None:
            t0 = time.perf_counter()
            out.update(self.evaluate(self.spec, self.adapter, metric))
            out["eval_s"] = time.perf_counter() - t0
        if loss and self.cfg.eval.federated:
            out.update(self.federated_eval(server_round, metric))
        return out

    def federated_eval(self, server_round: int, metric: bool) -> dict[str, Any]:
        """Every client evaluates the global adapter on its own share of the held-out split.

        Returns ``fed_eval_loss`` (weighted by target tokens), ``fed_eval_<metric>`` (weighted
        by records), how many clients answered, their failures and the bytes both ways.
        """
        msgs, asked = [], {}
        shared: SharedRecords = {}
        for c in self.clients:
            ins = TrainInstruction(
                header=Header(self.run_id, server_round, self.fingerprint, self.spec.config_hash(),
                              self.examples_behind_global, c.client_id),
                lora=self.spec, train=self.cfg.train, adapter=self.adapter, seed=0,
                with_metric=metric,
            )  # fmt: skip
            msgs.append(Message(encode_instruction(ins, shared), c.node_id, f"evaluate.{ins.mode}"))
            asked[c.node_id] = c.client_id
        timeout = self.cfg.federation.round_timeout_s
        replies = list(self.grid.send_and_receive(msgs, timeout=timeout))
        reports, failures = [], {}
        for reply in replies:
            cid = asked.get(reply.metadata.src_node_id, "?")
            try:
                reports.append(self._eval_report(reply, server_round, cid))
            except ProtocolError as err:
                failures[cid] = err.reason
        out: dict[str, Any] = {
            "fed_eval_bytes_down": sum(message_nbytes(m) for m in msgs),
            "fed_eval_bytes_up": sum(message_nbytes(r) for r in replies),
            "fed_eval_clients": len(reports),
            "fed_eval_failures": failures,
        }
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

    def _eval_report(self, reply: Message, server_round: int, cid: str) -> EvalReport:
        if reply.has_error():
            raise ProtocolError(f"client error: {reply.error.reason}")
        report = decode_eval_report(reply.content)
        h = report.header
        if (h.run_id, h.server_round, h.client_id) != (self.run_id, server_round, cid):
            raise ProtocolError(
                f"report is for run/round/client {h.run_id}/{h.server_round}/{h.client_id}"
            )
        if "eval_loss" not in report.metrics or "eval_tokens" not in report.metrics:
            raise ProtocolError(f"report lacks eval_loss/eval_tokens: {sorted(report.metrics)}")
        return report

    def _report(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row(row)

    # ------------------------------------------------------------------ the run
    def run(self) -> RunResult:
        """Discover clients, evaluate the start (round 0), run every round."""
        t0 = time.perf_counter()
        clients, setup = self.discover()
        self.clients = clients
        start: dict[str, Any] = {
            "round": 0,
            "train_loss": None,
            "clients": 0,
            "bytes_up": 0,
            "bytes_down": 0,
        }
        start.update(self._eval_row(0))
        start["wall_s"] = time.perf_counter() - t0
        self._report(start)
        for server_round in range(self.server_round + 1, self.cfg.federation.rounds + 1):
            self.run_round(server_round, clients)
        return RunResult(
            rows=self.rows,
            adapter=self.adapter,
            spec=self.spec,
            clients=clients,
            setup_bytes=setup,
            wall_s=time.perf_counter() - t0,
        )
