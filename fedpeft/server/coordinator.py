"""The round loop: sample, instruct, collect, validate, aggregate, evaluate, record.

The loop talks to clients only through a Flower ``Grid`` (the in-process grid, Flower's Ray
simulation or a real SuperLink) and to the algorithm only through the
:class:`~fedpeft.algorithms.base.Strategy` protocol. It stamps every instruction with the
header, counts the bytes of every message it sends and receives (Flower's serialized object
tree, as pushed over the network), validates each update against its instruction and keeps
per-client failures and rejections in the round's metrics. LoRA and seed/scalar strategies
run through the same loop (:mod:`fedpeft.server.exchange` handles both message kinds).

Per round ``r``: ``k = min(n, max(min_clients, ceil(fraction_train * n)))`` clients (or
``federation.clients_per_round``) are sampled by a generator seeded with ``(seed, "sample",
r)``, so a resumed run samples the same. With ``federation.discovery = "all"`` they are drawn
from the ``n`` clients that joined before the first round; with ``"sampled"`` from the whole
population's ids, and only the drawn clients are asked who they are, when first drawn (a
population of millions starts at once; a drawn client that does not join fails the round's
instruction with the reason).

After round 0 (the evaluation of the start) and after every round, the coordinator's whole
state (:meth:`Coordinator.state_dict`: round, strategy state with any bandit or accountant,
the current global model, the metrics rows, simulated time) is written atomically to
``checkpoint`` (:mod:`fedpeft.server.checkpoint`). Every random draw derives from the run
seed and the round, so a run resumed from a checkpoint continues exactly as the uninterrupted
run would. A round with too few valid updates is run again ``validation.round_retries`` times,
with the strategy's state restored first, before the run fails.
"""

from __future__ import annotations

import copy
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from flwr.serverapp import Grid

from fedpeft._flwr import node_of
from fedpeft.algorithms.base import AggregateResult, Strategy
from fedpeft.algorithms.registry import strategy_capabilities
from fedpeft.config import RunConfig
from fedpeft.config.rules import foldable
from fedpeft.devices import DeviceProfile, assign_profiles
from fedpeft.errors import AggregationError, ConfigError, ProtocolError, RoundError, by_reason
from fedpeft.families import Stamp, family_of
from fedpeft.lora.rank_ops import rank_energy
from fedpeft.privacy import PrivacyBudgetExhausted
from fedpeft.prune.deployed import DeviceEval, device_models
from fedpeft.rounds import clients_per_round, round_train
from fedpeft.seeding import derive_seed, np_rng
from fedpeft.server.checkpoint import (
    CheckpointError,
    load_checkpoint,
    result_from_state,
    result_state,
    save_checkpoint,
)
from fedpeft.server.discovery import ClientIds, Roster
from fedpeft.server.exchange import Exchange, Instruction, exchange
from fedpeft.server.fedeval import federated_eval
from fedpeft.server.fold import Fold
from fedpeft.server.rows import client_choices, round_row
from fedpeft.server.screen import DeviceScreen
from fedpeft.server.secure_round import secure_aggregate
from fedpeft.server.validate import Limits, cap_weights, weight_cap
from fedpeft.wire.messages import ClientInfo, Header

__all__ = [
    "Coordinator",
    "EvalFn",
    "RunResult",
    "SimulatedNodes",
    "clients_per_round",
    "new_run_id",
    "scenario_of",
]

log = logging.getLogger(__name__)

EvalFn = Callable[[AggregateResult, bool], dict[str, float]]
SILENT = ("timeout:", "unavailable:")  # failures after which a client is probed first


def new_run_id(scenario: str) -> str:
    """``<scenario>-<16 random hex digits>``: two runs of one scenario never share an id, so
    a reply from an earlier run is a ``replay``; a resumed run keeps its id."""
    return f"{scenario}-{secrets.token_hex(8)}"


def scenario_of(run_id: str) -> str:
    """The scenario part of a run id (:func:`new_run_id`)."""
    return run_id.split("-", 1)[0]


@dataclass
class RunResult:
    """What a finished run produced."""

    rows: list[dict[str, Any]]
    model: AggregateResult
    clients: list[ClientInfo]
    setup_bytes: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    stopped: str | None = None  # why the run ended before its last round
    discovery: dict[str, Any] = field(default_factory=dict)  # Roster.report() of this run


class SimulatedNodes(Protocol):
    """A simulation's virtual nodes, whose own state (``Context.state``) the checkpoint keeps
    for them: a real device keeps it on its own disk when the coordinator dies, a simulated
    one dies with it."""

    def state_dict(self) -> dict[str, Any]:
        """Every node's state."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        ...


class Coordinator:
    """Runs federated rounds over a Flower ``Grid``.

    Parameters
    ----------
    cfg : RunConfig
        The scenario.
    grid : Grid
        How messages reach clients.
    strategy : Strategy
        The aggregation algorithm (owns the global model).
    initial : AggregateResult
        The starting global model (evaluated as round 0).
    fingerprint : str
        The base model's fingerprint; clients must have the same.
    run_id : str
        Stamped on every message.
    evaluate : EvalFn | None
        Centralized evaluation of a global model (``None``: no evaluation).
    on_row : Callable[[dict[str, Any]], None] | None
        Called with each round's metrics as soon as they exist.
    zo_blocks : int
        Seed/scalar strategies: blocks of the tuned tensors (to validate uploads).
    checkpoint : Path | None
        Where the state is written after every round (``None``: nowhere).
    resume : bool
        Continue from ``checkpoint`` instead of starting at round 0.
    nodes : SimulatedNodes | None
        In-process simulation: the virtual nodes, whose state is checkpointed with the
        coordinator's so a resumed run continues exactly (per-node state such as SCAFFOLD's
        control variates and FedSA-LoRA's personal ``B``).
    evaluate_devices : DeviceEval | None
        Evaluation of each device's deployed model (a pruning strategy's ``device_models``,
        :mod:`fedpeft.prune.deployed`) whenever the loss is evaluated.
    on_phase : Callable[[str], None] | None
        Told what the run does before its first round (waiting for clients, evaluating the
        start), for the progress display.
    """

    def __init__(
        self,
        cfg: RunConfig,
        grid: Grid,
        strategy: Strategy,
        initial: AggregateResult,
        fingerprint: str,
        run_id: str,
        evaluate: EvalFn | None = None,
        on_row: Callable[[dict[str, Any]], None] | None = None,
        zo_blocks: int = 1,
        checkpoint: Path | None = None,
        resume: bool = False,
        nodes: SimulatedNodes | None = None,
        evaluate_devices: DeviceEval | None = None,
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.on_phase = on_phase or (lambda text: None)
        self.evaluate_devices = evaluate_devices
        self.grid = grid
        self.strategy = strategy
        self.capabilities = strategy_capabilities(cfg.strategy.name, cfg.strategy.options)
        # a batch round sums its replies when streaming could: the same global either way
        self.folds = not cfg.federation.streaming and foldable(cfg, self.capabilities)
        self.current = initial
        self.fingerprint = fingerprint
        self.run_id = run_id
        self.evaluate = evaluate
        self.on_row = on_row
        self.zo_blocks = zo_blocks
        self.checkpoint = checkpoint
        self.resume = resume
        self.nodes = nodes
        self.server_round = 0
        self.examples_behind_global = 0
        self.rows: list[dict[str, Any]] = []
        self.clients: list[ClientInfo] = []
        self.roster = Roster((), run_id, fingerprint)
        self.suspects: set[str] = set()  # timed out or unavailable; probed before trusted again
        self.profiles: dict[str, DeviceProfile] = {}
        self.sim_wall_s = 0.0

    # ------------------------------------------------------------------ discovery
    def discover(self) -> tuple[list[ClientInfo], dict[str, int]]:
        """Ask each node who it is until every expected client id has joined or
        ``connect_timeout_s`` has passed; returns the admitted clients and setup bytes.

        Nodes register asynchronously (Ray's engine starts its virtual nodes in another
        thread, SuperNodes connect when they are started), so the grid is asked again until
        the roster is complete. Who joined, who is missing and who was refused (and why) is
        in :attr:`roster`.
        """
        fed = self.cfg.federation
        self.roster = Roster(
            ClientIds(fed.nodes),
            self.run_id,
            self.fingerprint,
            tuple(self.cfg.model.node_quantizations),
            on_demand=fed.sampled_discovery,
        )
        if fed.sampled_discovery:  # each round asks the clients it draws (_draw)
            if node_of(self.grid, "0") is None:
                raise ConfigError(
                    "federation.discovery = 'sampled' needs a transport that addresses clients "
                    f"by id (the in-process simulation); {type(self.grid).__name__} does not"
                )
            return [], {"setup_bytes_down": 0, "setup_bytes_up": 0}
        deadline = time.monotonic() + fed.connect_timeout_s
        while True:
            connected = set(self.grid.get_node_ids())
            self.roster.ask(self.grid, connected, connected, fed.round_timeout_s)
            if self.roster.complete or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        infos = self.roster.infos()
        for cid, why in self.roster.missing().items():
            log.warning("fedpeft: client %s did not join: %s", cid, why)
        if len(infos) < min(fed.min_clients, fed.nodes):
            gone = self.roster.report()
            raise RoundError(
                0,
                f"{len(infos)} of {fed.nodes} expected clients joined within "
                f"federation.connect_timeout_s = {fed.connect_timeout_s:g} s, "
                f"federation.min_clients is {fed.min_clients}; missing: "
                f"{by_reason(gone['missing']) or 'none'}; refused: "
                f"{by_reason(gone['refused'], 'node') or 'none'}",
            )
        setup = {"setup_bytes_down": self.roster.bytes_down, "setup_bytes_up": self.roster.bytes_up}
        return infos, setup

    def _rejoin(self) -> None:
        """Before a round: ask nodes that connected since (a restarted node has a new id),
        so a client whose node came back takes part again."""
        if self.cfg.federation.sampled_discovery:
            return  # a client is asked when it is drawn
        connected = set(self.grid.get_node_ids())
        if connected - self.roster.asked:
            before = {c.client_id: c.node_id for c in self.clients}
            timeout = self.cfg.federation.round_timeout_s
            if self.roster.ask(self.grid, connected, connected, timeout):
                self.clients = self.roster.infos()
                back = {c.client_id for c in self.clients if before.get(c.client_id) != c.node_id}
                self.suspects -= back

    def _probe(self, cids: set[str]) -> tuple[dict[str, str], int]:
        """Clients that timed out or were unavailable are asked a cheap question (within
        ``federation.probe_timeout_s``) before they are sent a round's instruction again, so
        a hung node costs one probe timeout per round, not a round timeout."""
        fed = self.cfg.federation
        timeout = min(fed.probe_timeout_s, fed.round_timeout_s)
        why, nbytes = self.roster.probe(self.grid, cids & self.suspects, timeout)
        self.suspects -= cids - set(why)
        return {c: f"{r} after it failed to answer before" for c, r in why.items()}, nbytes

    # ------------------------------------------------------------------ one round
    def sample(self, server_round: int, clients: Sequence[ClientInfo]) -> list[ClientInfo]:
        """The clients that train in ``server_round`` (seeded, ordered by client id)."""
        k = clients_per_round(self.cfg, len(clients))
        rng = np_rng(self.cfg.federation.seed, "sample", server_round)
        picked = rng.choice(len(clients), k, replace=False)
        return sorted((clients[int(i)] for i in picked), key=lambda c: c.client_id)

    def _draw(self, server_round: int) -> tuple[list[ClientInfo], dict[str, str], int]:
        """Sampled discovery: the round's clients drawn from the whole population's ids and
        asked who they are when first drawn; the admitted ones (ordered by client id), the
        drawn ones that did not join (each with why) and the bytes the questions cost."""
        fed = self.cfg.federation
        k = clients_per_round(self.cfg, fed.nodes)
        rng = np_rng(fed.seed, "sample", server_round)
        drawn = sorted(str(int(i)) for i in rng.choice(fed.nodes, k, replace=False))
        before = self.roster.bytes_down + self.roster.bytes_up
        why = self.roster.ask_clients(self.grid, drawn, fed.round_timeout_s)
        self.clients = self.roster.infos()
        joined = [self.roster.clients[c] for c in drawn if c not in why]
        return joined, why, self.roster.bytes_down + self.roster.bytes_up - before

    def _node_fingerprint(self, cid: str) -> str:
        """The base model client ``cid`` was admitted with: the coordinator's, or the same
        weights in another quantization that ``model.node_quantizations`` admits."""
        info = self.roster.clients.get(cid)
        return info.header.model_fingerprint if info is not None else self.fingerprint

    def _header(self, server_round: int, cid: str, adapter_hash: str) -> Header:
        return Header(
            run_id=self.run_id,
            server_round=server_round,
            model_fingerprint=self._node_fingerprint(cid),
            adapter_hash=adapter_hash,
            num_examples=self.examples_behind_global,
            client_id=cid,
        )

    def instructions(
        self, server_round: int, clients: Sequence[ClientInfo]
    ) -> dict[str, Instruction]:
        """Turn the strategy's plans into stamped instructions (LoRA or seed/scalar)."""
        plans: Mapping[str, Any] = self.strategy.configure_train(server_round, clients)
        unknown = sorted(set(plans) - {c.client_id for c in clients})
        if unknown:
            raise RoundError(server_round, f"strategy planned for unsampled clients {unknown}")
        train = round_train(self.cfg, server_round)
        out: dict[str, Instruction] = {}
        for cid, plan in sorted(plans.items()):
            seed = derive_seed(self.cfg.federation.seed, "client-round", server_round, cid)
            try:
                family = family_of(plan)
            except ProtocolError as err:
                raise RoundError(
                    server_round, f"strategy planned a {type(plan).__name__}: {err.reason}"
                ) from err
            header = self._header(server_round, cid, plan.spec.config_hash())
            secure, clip, noise = self.cfg.secagg.enabled, 0.0, 0.0
            if secure and self.cfg.dp.active:  # distributed DP: each client clips and adds
                dp, fewest = self.cfg.dp, self.cfg.federation.min_clients
                clip, noise = dp.clip_norm, dp.noise_multiplier * dp.clip_norm / math.sqrt(fewest)
            stamp = Stamp(
                header, train, seed, self.cfg.compress, secure, clip, noise,
                strategy=self.cfg.strategy.name,
            )  # fmt: skip
            out[cid] = family.instruction(plan, stamp)
        return out

    def _evaluate_now(self, server_round: int) -> tuple[bool, bool]:
        ev, last = self.cfg.eval, server_round == self.cfg.federation.rounds
        first_or_last = server_round == 0 or last
        loss = first_or_last or (ev.every > 0 and server_round % ev.every == 0)
        metric = first_or_last or (ev.metric_every > 0 and server_round % ev.metric_every == 0)
        return loss, metric

    def run_round(
        self, server_round: int, clients: Sequence[ClientInfo], attempt: int = 1
    ) -> dict[str, Any]:
        """One full round (``attempt``: which try at it); returns (and reports) its metrics row.

        Raises
        ------
        RoundError
            If fewer than ``min_clients`` valid updates came back.
        """
        t0 = time.perf_counter()
        absent: dict[str, str] = {}
        if self.cfg.federation.sampled_discovery:
            picked, absent, asked_bytes = self._draw(server_round)
        else:
            picked, asked_bytes = self.sample(server_round, clients), 0
        sampled = self._with_budgets(picked)
        instructions = self.instructions(server_round, sampled)
        nodes = {c.client_id: c.node_id for c in sampled}
        limits = {
            c.client_id: Limits(self.cfg.validation, c.num_examples, self.zo_blocks)
            for c in sampled
        }
        fed = self.cfg.federation
        gone, probe_bytes = self._probe(set(instructions))
        asked = {c: i for c, i in instructions.items() if c not in gone}
        fold = None
        if fed.streaming and asked:  # weights capped at the median the sampled clients reported
            reported = [c.num_examples for c in sampled if c.client_id in asked]
            cap = weight_cap(reported, self.cfg.validation.max_weight_ratio)
            fold = self._fold(server_round, asked, cap)
        screen = DeviceScreen(self.profiles, self.cfg.devices.deadline_s)
        got = exchange(
            self.grid, asked, nodes, server_round, fed.round_timeout_s, limits, fold,
            fed.in_flight, screen,
        )  # fmt: skip
        for cid, reason in sorted({**gone, **absent}.items()):
            got.fail(cid, "unavailable", reason)
        if probe_bytes:
            got.metrics["probe_bytes"] = probe_bytes
        if asked_bytes:
            got.metrics["discovery_bytes"] = asked_bytes
        self.suspects |= {c for c, r in got.failures.items() if r.startswith(SILENT)}
        if self.profiles:
            self.sim_wall_s += screen.round_s()
        sim = screen.row(self.sim_wall_s)
        capped = 0
        if fold is None and self.folds and got.updates:  # a batch round sums what it collected
            got.updates, capped = cap_weights(got.updates, self.cfg.validation.max_weight_ratio)
            fold = self._fold(server_round, asked, None)
            got.updates = self._fold_collected(fold, got)
        if len(got.updates) < self.cfg.federation.min_clients:
            reasons = by_reason(got.failures)
            raise RoundError(
                server_round,
                f"{len(got.updates)} valid updates, need federation.min_clients="
                f"{self.cfg.federation.min_clients}. {reasons}",
            )
        if fold is not None:  # the stubs stand for the sum; the strategy gets what it rebuilds
            got.contributors, capped = got.updates, capped + fold.capped
            got.updates = fold.result(got.updates)
            got.metrics.update(self._robust_metrics(fold))
        else:
            got.updates, capped = cap_weights(got.updates, self.cfg.validation.max_weight_ratio)
        if self.cfg.secagg.enabled:
            fixed = clients_per_round(self.cfg, self.cfg.federation.num_clients)
            secure_aggregate(
                self.grid, self.cfg, instructions, nodes, got, server_round, self.zo_blocks,
                divisor=fixed if self.cfg.dp.active else None,
                example_weighted=self.capabilities.example_weighted,
            )  # fmt: skip
        self.current = self.strategy.aggregate_train(server_round, got.updates)
        contributed = got.contributors or got.updates
        self.examples_behind_global = sum(u.header.num_examples for u in contributed)
        self.server_round = server_round
        row = round_row(server_round, got, len(instructions), self.examples_behind_global)
        row["weights_capped"] = capped
        row.update(got.metrics)
        row["attempts"] = attempt
        if self.cfg.train.lr_schedule != "constant" or self.cfg.train.warmup_rounds:
            row["lr"] = instructions[next(iter(instructions))].train.lr if instructions else None
        row.update(client_choices(instructions))
        row.update(sim)
        row.update({k: float(v) for k, v in self.current.metrics.items()})
        if self.capabilities.heterogeneous_ranks and self.current.adapter is not None:
            # the global update's energy per rank component (rank collapse across ranks)
            row["rank_energy"], row["rank_energy_effective"] = rank_energy(self.current.adapter)
        row.update(self._eval_row(server_round))
        row["wall_s"] = time.perf_counter() - t0
        return row

    def _fold(self, server_round: int, asked: Mapping[str, Instruction], cap: int | None) -> Fold:
        """The sum a round folds its replies into, each weight capped at ``cap``."""
        caps, dp, robust = self.capabilities, self.cfg.dp, self.cfg.robust
        weighted, clip, divisor, scalar_clip = caps.example_weighted, 0.0, None, caps.scalar_clip
        if dp.active:  # each change clipped, one weight each, divided by the fixed clients
            # per round; the DP wrapper adds the noise
            weighted, clip = False, dp.clip_norm
            divisor = clients_per_round(self.cfg, self.cfg.federation.num_clients)
        if robust.active:  # rule "mean" (the rules fold no other): the wrapper's clipping
            clip = robust.clip_norm
            if robust.scalar_clip > 0:  # then the strategy's own: the tighter of the two
                scalar_clip = min(c for c in (robust.scalar_clip, scalar_clip) if c > 0)
        try:
            return Fold(asked, self.zo_blocks, cap, weighted, scalar_clip, clip, divisor,
                        robust.scalar_clip if robust.active else 0.0)  # fmt: skip
        except AggregationError as err:
            raise RoundError(server_round, f"folded aggregation: {err}") from err

    def _robust_metrics(self, fold: Fold) -> dict[str, float]:
        """What the robust wrapper reports of its clipping, from the fold that did it."""
        robust = self.cfg.robust
        out: dict[str, float] = {}
        if robust.active and robust.clip_norm > 0:
            out["robust_clipped"] = float(fold.norm_clipped)
            out["robust_norm_max"] = fold.norm_max
        if robust.active and robust.scalar_clip > 0:
            out["robust_clipped"] = float(fold.scalars_above)
            out["robust_scalar_max"] = fold.scalar_max
        return out

    @staticmethod
    def _fold_collected(fold: Fold, got: Exchange) -> list[Any]:
        """Fold a batch round's valid updates in client order; their stubs (an update whose
        weighted change is beyond the sum's range fails, as it would streaming)."""
        stubs = []
        for u in sorted(got.updates, key=lambda u: u.header.client_id):
            try:
                stubs.append(fold.add(u))
            except ProtocolError as err:
                got.fail(u.header.client_id, err.reason, str(err))
        return stubs

    def _with_budgets(self, clients: Sequence[ClientInfo]) -> list[ClientInfo]:
        """``clients`` with their simulated device's memory budget in ``properties``
        (``memory_mb``), as a deployed node advertises its own (``--memory-mb``), which wins."""
        out = []
        for c in clients:
            prof = self.profiles.get(c.client_id)
            if prof is not None and "memory_mb" not in c.properties:
                c = replace(c, properties={**c.properties, "memory_mb": prof.memory_mb})
            out.append(c)
        return out

    def _eval_row(self, server_round: int) -> dict[str, Any]:
        loss, metric = self._evaluate_now(server_round)
        out: dict[str, Any] = {"eval_loss": None}
        if loss and self.evaluate is not None:
            t0 = time.perf_counter()
            out.update(self.evaluate(self.current, metric))
            out["eval_s"] = time.perf_counter() - t0
        cur, ev = self.current, self.cfg.eval
        if not loss or cur.spec is None or cur.adapter is None:
            return out
        if self.evaluate_devices is not None and (models := device_models(self.strategy)):
            out.update(self._device_row(self.evaluate_devices(models, metric)))
        header = self._header(server_round, "", cur.spec.config_hash())
        timeout = self.cfg.federation.round_timeout_s
        for personal in [False] * ev.federated + [True] * ev.personalized:
            # each client's own model: the loss only (the task metric would generate text on
            # every client at every evaluation)
            out.update(
                federated_eval(self.grid, self.clients, header, cur.spec, cur.adapter,
                               self.cfg.train, metric and not personal, timeout, personal)
            )  # fmt: skip
        return out

    def _device_row(self, got: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
        """The deployment view: each device model's loss, kept parameters and forward time
        per example, the loss's mean over devices and per device tier (simulated profiles);
        where the task metric was computed, the same for it."""
        losses = {c: v["loss"] for c, v in got.items()}
        out: dict[str, Any] = {
            "device_eval_loss": dict(losses),
            "device_params": {c: v["params"] for c, v in got.items()},
            "device_forward_s": {c: v["forward_s"] for c, v in got.items()},
            "device_eval_loss_mean": math.fsum(losses.values()) / len(losses),
        }
        if tiers := self._tier_means(losses):
            out["device_eval_loss_tier"] = tiers
        scores = {c: v["metric"] for c, v in got.items() if "metric" in v}
        if scores:  # the task metric of each device model's generations
            key = f"device_eval_{self.cfg.data.metric}"
            out[key] = scores
            out[f"{key}_mean"] = math.fsum(scores.values()) / len(scores)
            if tiers := self._tier_means(scores):
                out[f"{key}_tier"] = tiers
        return out

    def _tier_means(self, values: Mapping[str, float]) -> dict[str, float]:
        """The mean of ``values`` per simulated device tier (empty without profiles)."""
        tiers: dict[str, list[float]] = {}
        for c, v in sorted(values.items()):
            if c in self.profiles:
                tiers.setdefault(self.profiles[c].name, []).append(v)
        return {t: math.fsum(v) / len(v) for t, v in tiers.items()}

    def _report(self, row: dict[str, Any]) -> None:
        """Keep ``row``, checkpoint, then tell listeners: a row written to ``metrics.jsonl``
        is never ahead of the checkpoint (a full disk fails the save first)."""
        self.rows.append(row)
        self._save()
        if self.on_row is not None:
            self.on_row(row)

    # ------------------------------------------------------------------ the run
    def run(self) -> RunResult:
        """Discover clients, evaluate the start (round 0), run every round.

        Resuming, the checkpoint's rows are written again (and its run id adopted) before
        waiting for the nodes, so ``metrics.jsonl`` holds them while the nodes come back.
        """
        t0 = time.perf_counter()
        if self.resume:
            self._restore()
        self.on_phase("waiting for clients")
        self.clients, setup = self.discover()
        devices = self.cfg.devices
        self.profiles = assign_profiles(
            [c.client_id for c in self.clients], devices.tiers, devices.file
        )
        start: dict[str, Any] = {
            "round": 0,
            "train_loss": None,
            "clients": 0,
            "bytes_up": 0,
            "bytes_down": 0,
        }
        if not self.resume:
            start["discovery"] = self.roster.report()
            if self.evaluate is not None:
                n = self.cfg.eval.examples
                self.on_phase("evaluating the start model" + (f" on {n} examples" if n else ""))
            start.update(self._eval_row(0))
            start["wall_s"] = time.perf_counter() - t0
            self._report(start)
        stopped = None
        for server_round in range(self.server_round + 1, self.cfg.federation.rounds + 1):
            try:
                self._report(self._run_with_retries(server_round))
            except PrivacyBudgetExhausted as err:
                stopped = str(err)
                log.warning("fedpeft: %s", err)
                break
        return RunResult(
            rows=self.rows,
            model=self.current,
            clients=self.clients,
            setup_bytes=setup,
            discovery=self.roster.report(),
            wall_s=time.perf_counter() - t0,
            stopped=stopped,
        )

    # ------------------------------------------------------------------ state
    def _run_with_retries(self, server_round: int) -> dict[str, Any]:
        self._rejoin()
        retries = self.cfg.validation.round_retries
        for attempt in range(retries + 1):
            # a copy of the strategy's state only when a failed attempt may need it back
            snapshot = copy.deepcopy(self.strategy.state_dict()) if attempt < retries else None
            try:
                return self.run_round(server_round, self.clients, attempt + 1)
            except RoundError as err:
                if snapshot is None:
                    raise
                log.warning("%s; running it again (%d of %d)", err, attempt + 1, retries)
                self.strategy.load_state_dict(snapshot)
        raise AssertionError("unreachable")  # pragma: no cover

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after the last completed round."""
        return {
            "run_id": self.run_id,
            "round": self.server_round,
            "examples_behind_global": self.examples_behind_global,
            "sim_wall_s": self.sim_wall_s,
            "rows": copy.deepcopy(self.rows),
            "current": result_state(self.current),
            "strategy": self.strategy.state_dict(),
            **({"nodes": self.nodes.state_dict()} if self.nodes is not None else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the strategy's part included).

        Raises
        ------
        CheckpointError
            If the state is from a run with another scenario (another ``run_id``).
        """
        saved = str(state["run_id"])
        if scenario_of(saved) != scenario_of(self.run_id):
            raise CheckpointError(
                f"the checkpoint is from scenario {scenario_of(saved)!r}, this scenario is "
                f"{scenario_of(self.run_id)!r}: resume with the run folder's own config.toml"
            )
        self.run_id = saved  # the same run goes on: replies from other runs stay replays
        self.server_round = int(state["round"])
        self.examples_behind_global = int(state["examples_behind_global"])
        self.sim_wall_s = float(state["sim_wall_s"])
        self.rows = list(state["rows"])
        self.current = result_from_state(state["current"])
        self.strategy.load_state_dict(state["strategy"])
        if self.nodes is not None and "nodes" in state:
            self.nodes.load_state_dict(state["nodes"])

    def _save(self) -> None:
        if self.checkpoint is not None:
            save_checkpoint(self.checkpoint, self.state_dict())

    def _restore(self) -> None:
        if self.checkpoint is None:
            raise CheckpointError("resume needs a checkpoint path")
        self.load_state_dict(load_checkpoint(self.checkpoint))
        for row in self.rows:  # the run's metrics so far, written again by whoever listens
            if self.on_row is not None:
                self.on_row(row)
        log.info("resumed after round %d from %s", self.server_round, self.checkpoint)
