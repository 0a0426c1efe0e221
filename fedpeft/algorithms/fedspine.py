"""FedSpine (Yao et al. 2025, arXiv:2501.02438): a bandit picks each device's (structured
pruning ratio, LoRA rank); devices prune-then-tune; pruned updates are averaged per coordinate.

Per round and sampled device ``k``:

1. **Arm.** The bandit (:mod:`fedpeft.bandit`; by default ``pooled-ucb``: arm quality pooled
   over devices, speed per device) picks an arm ``(p_k, r_k)`` from ``arms``. The device
   starts from the structure it ended at last time when that was pruned no further than
   ``p_k`` (pruning continues from there); moving to a less pruned arm, from that structure
   grown back to ``p_k`` by base-weight magnitude (``regrow``); an unpruned arm, or a first
   pruned arm, from the whole model (with ``start = "magnitude"``, or for a device that
   cannot hold the whole model, from the coordinator's magnitude structure). It receives
   the first ``r_k`` components of the unit-scale global adapter (``B`` divided by its
   ``alpha / r_k``), cut to its starting structure.
2. **Prune-then-tune** on the device (:mod:`fedpeft.client.prune_trainer`): LoRAPrune scores
   from LoRA gradients, pruning in ``stages`` with ``warmup_steps`` of tuning before each.
3. **Masked aggregation** (:mod:`fedpeft.prune.masked`): every coordinate of the unit-scale
   ``B`` (out, R) and ``A`` (R, in) is the example-weighted mean over the devices whose
   structure and rank contain it; a coordinate nobody covered keeps its value. Rank
   components are treated like pruned features (a rank-4 device does not dilute components
   5..8 with zeros, unlike HetLoRA's zero padding). With one arm ``(0, r)`` for everyone
   this is FedAvg of the factors.
4. **Memory.** A device with a memory budget (``ClientInfo.properties["memory_mb"]``: a node's
   ``--memory-mb``, or its simulated device profile) plays only arms that fit it
   (:meth:`FedSpine.fitting`): every client reports its measured peak training memory
   (:mod:`fedpeft.client.memory`), kept per device and arm; an arm is left out when its
   footprint, or that of an arm pruning at least as much with no larger rank, exceeds the
   budget; an unpruned arm needs at least the largest peak measured in a round begun on the
   whole model. A device whose budget is below that peak begins a pruned arm from the
   structure magnitude pruning of the base weights gives at the arm's ratio, computed by the
   coordinator (:mod:`fedpeft.prune.magnitude`), instead of from the whole model, which it
   could not hold. A device no arm fits sits the round out. The simulation fails a device whose
   measured peak exceeds its profile's memory (``memory``), as the device would.
5. **Reward.** FedSpine's exact reward is not public. Ours, per device ``k`` of the round,
   with ``T`` the round's median device time::

       rate_k   = gain_k / T                         # loss gain per second of a typical round
       reward_k = rate_k / median_j |rate_j|  -  delay_penalty * n * max(0, t_k / T - 1)

   ``gain_k`` (``reward = "validation"``, the default when the coordinator has validation
   records, ``eval.validation_examples``): how much the device's update alone lowers the
   loss of the **unpruned** model on those records, ``L(G) - L(G with the coordinates k
   trained set to k's values)`` (FedSpine's "update importance"; it sees that a heavily
   pruned device's factors, fitted to repair its own pruning, may not help the whole
   model). ``reward = "probe"`` (no server data): the drop of the device's own first-batch
   loss, from the first local step (received factors, starting structure) to after tuning
   (final structure), which the device measures with one extra forward. ``t_k`` is the device's
   simulated seconds (compute x speed + bytes / bandwidth; on real nodes its measured
   compute time), ``n`` the number of devices in the round. Why this shape: the round lasts as
   long as its slowest device, so a device that finishes before the typical one gains nothing
   by finishing sooner and should train the arm that teaches most; one that finishes later
   delays everybody. The federation's progress per second is ``sum_j gain_j / T_round``; a
   straggler that stretches the round by a fraction ``x`` costs about ``x`` times the
   whole round's gain, ``n`` typical gains, which is why the charge scales with ``n``
   (``delay_penalty`` 0.5: half that first-order cost, since only the slowest device sets the
   round time while every device above the median is charged). This is FedSpine's
   straggler term in our form. A device whose update does not come back (it missed
   ``devices.deadline_s``, ran out of memory, or went away) earns ``-delay_penalty x n``: no
   gain, charged as a straggler that doubled the round.
   Dividing by the round's median rate makes rewards scale-free as the loss flattens (UCB's
   bonus assumes rewards of order 1). With a single arm nothing is learned or measured.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedpeft.algorithms.base import AggregateResult, LoraPlan, StrategyContext
from fedpeft.algorithms.capabilities import Capabilities
from fedpeft.algorithms.hetero import UnitGlobal, client_spec, example_weights
from fedpeft.algorithms.registry import register_strategy
from fedpeft.bandit import Arm, Bandit, Outcome, OutcomeBandit, make_bandit
from fedpeft.client.prune_trainer import PruneTrainer
from fedpeft.errors import AggregationError, ConfigError
from fedpeft.lora.rank_ops import for_client, unit_scale, unit_spec
from fedpeft.prune.deployed import DeviceModel
from fedpeft.prune.layout import PruneLayout, cut_adapter
from fedpeft.prune.masked import Slice, masked_average
from fedpeft.prune.schedule import default_protect
from fedpeft.prune.structure import Keep
from fedpeft.wire.messages import ClientInfo, LoraFactors, LoraUpdate
from fedpeft.wire.prune import PrunePlan

__all__ = ["FedSpine", "fedspine_outcomes", "fedspine_reward"]

DEFAULT_ARMS = [[0.0, 8.0], [0.25, 8.0], [0.5, 4.0], [0.75, 4.0]]


def fedspine_outcomes(
    gains: Mapping[str, float], times: Mapping[str, float], delay_penalty: float
) -> dict[str, Outcome]:
    """Every device's reward of a round, in its parts (see the module docstring)."""
    t_med = statistics.median(times[c] for c in gains) if gains else 0.0
    rates = {c: gains[c] / max(t_med, 1e-9) for c in gains}
    scale = statistics.median(abs(r) for r in rates.values()) if rates else 0.0
    return {
        c: Outcome(
            gain=rate / scale if scale > 0 else 0.0,
            slowness=max(times[c] / t_med, 1e-6) if t_med > 0 else 1.0,
            weight=delay_penalty * len(gains),
        )
        for c, rate in rates.items()
    }


def fedspine_reward(
    gains: Mapping[str, float], times: Mapping[str, float], delay_penalty: float
) -> dict[str, float]:
    """The reward of every device of a round (see the module docstring)."""
    return {c: o.reward for c, o in fedspine_outcomes(gains, times, delay_penalty).items()}


class FedSpine:
    """Bandit-chosen pruning ratio and rank per device, masked averaging of pruned updates."""

    trainer = PruneTrainer()  # the client half: prune in stages, then tune (LoRAPrune scores)
    capabilities = Capabilities(
        family="lora",
        heterogeneous_ranks=True,
        chooses_ranks=True,
        needs_layout=True,
        needs_validation=True,
        codecs=frozenset({"none"}),
    )

    @dataclass(frozen=True)
    class Config:
        """Options of :class:`FedSpine`."""

        arms: list[list[float]] = field(default_factory=lambda: [list(a) for a in DEFAULT_ARMS])
        bandit: str = "pooled-ucb"  # pooled-ucb | sw-ucb | d-ucb | epsilon-greedy | thompson
        bandit_options: dict[str, float] = field(default_factory=dict)  # e.g. {window = 10}
        delay_penalty: float = 0.5  # straggler charge, in typical gains per device per 100 % delay
        stages: int = 2  # a device reaches its ratio in this many cuts
        warmup_steps: int = 2  # local steps of tuning and scoring before each cut
        weighted: bool = True  # weight devices by num_examples (False: plain mean)
        reward: str = "auto"  # validation | probe | auto (validation when records exist)
        start: str = "own"  # own: prune on the device | magnitude: the coordinator's structure
        regrow: bool = True  # a move to a less pruned arm grows the device's structure back

        def __post_init__(self) -> None:
            p = []
            if self.start not in ("own", "magnitude"):
                p.append(f"start must be own|magnitude, got {self.start!r}")
            if not self.arms:
                p.append("arms must list at least one [ratio, rank]")
            for arm in self.arms:
                ok = len(arm) == 2 and 0 <= arm[0] < 1 and arm[1] >= 1 and arm[1] == int(arm[1])
                if not ok:
                    p.append(f"arm {arm} must be [ratio in [0, 1), integer rank >= 1]")
            if len({(float(a[0]), int(a[1])) for a in self.arms if len(a) == 2}) < len(self.arms):
                p.append(f"arms repeat an arm: {self.arms}")
            if self.delay_penalty < 0:
                p.append(f"delay_penalty must be >= 0, got {self.delay_penalty}")
            if self.reward not in ("auto", "validation", "probe"):
                p.append(f"reward must be auto|validation|probe, got {self.reward!r}")
            if self.stages < 1 or self.warmup_steps < 0:
                p.append(
                    f"stages >= 1 and warmup_steps >= 0, got {self.stages}, {self.warmup_steps}"
                )
            if not p:
                try:
                    make_bandit(
                        self.bandit,
                        [Arm(r, int(k)) for r, k in self.arms],
                        0,
                        **self.bandit_options,
                    )
                except ConfigError as err:
                    p.append(str(err))
            if p:
                raise ConfigError([f"strategy.options.{x}" for x in p])

    def __init__(self, config: Config, ctx: StrategyContext) -> None:
        self.config = config
        self.ctx = ctx
        self.arms = [Arm(float(r), int(k)) for r, k in config.arms]
        self._global = UnitGlobal(ctx, max(a.rank for a in self.arms))
        self.bandit: Bandit = make_bandit(
            config.bandit, self.arms, ctx.seed, **config.bandit_options
        )
        self._keeps: dict[str, tuple[float, bytes]] = {}  # device -> (target ratio, structure)
        self._pending: dict[str, int] = {}  # device -> arm played this round
        self._peaks: dict[str, dict[int, float]] = {}  # device -> arm -> measured peak MiB
        self._arm_of: dict[str, int] = {}  # device -> the arm it trained last
        self._whole_peak: float | None = None  # largest peak of a round begun on the whole model
        self._started_whole: set[str] = set()  # devices of this round that begin whole
        self._own_start: set[str] = set()  # devices of this round that begin on their own scores
        self._scored: set[str] = set()  # devices whose structure their own scores chose
        self._gains: dict[str, float] = {}  # device -> the gain of its last update
        if config.start == "magnitude" and ctx.magnitude_start is None:
            raise ConfigError(
                "strategy.options.start = 'magnitude' needs the coordinator's base weights "
                "(StrategyContext.magnitude_start)"
            )

    @property
    def reward_kind(self) -> str:
        """``validation`` or ``probe``: what the bandit's reward measures."""
        kind = self.config.reward
        if kind == "auto":
            return "validation" if self.ctx.validation_loss is not None else "probe"
        if kind == "validation" and self.ctx.validation_loss is None:
            raise ConfigError(
                "strategy.options.reward = 'validation' needs validation records "
                "(eval.validation_examples > 0)"
            )
        return kind

    @property
    def layout(self) -> PruneLayout:
        """The base model's prunable structure."""
        if self.ctx.layout is None:
            raise ConfigError(
                "fedspine needs the base model's pruning layout (StrategyContext.layout)"
            )
        return self.ctx.layout

    def _plan(self, cid: str, arm: Arm, budget: float | None = None) -> LoraPlan:
        layout = self.layout
        ratio, keep = self._keeps.get(cid, (0.0, b""))
        grow = self.ctx.magnitude_start if self.config.regrow else None
        start = b""
        if 0 < ratio <= arm.ratio:  # prune further from where the device is
            start = keep
            if cid in self._scored:
                self._own_start.add(cid)
        elif 0 < arm.ratio < ratio and grow is not None:  # less pruned: grow back, keep the rest
            start = grow(arm.ratio, keep)
        weak = not self._holds_whole(budget)
        if not start and arm.ratio > 0 and weak and self.config.start == "own":
            start = self._donor(arm.ratio)  # what a device that could score found at the ratio
        if not start and arm.ratio > 0 and (self.config.start == "magnitude" or weak):
            assert self.ctx.magnitude_start is not None  # (checked at start, or _holds_whole)
            start = self.ctx.magnitude_start(arm.ratio)  # the coordinator prunes for it
        if not start:
            self._started_whole.add(cid)
            self._own_start.add(cid)
        full = layout.full()
        keeps = layout.decode(start) if start else full
        spec = client_spec(self.ctx, arm.rank)
        adapter = cut_adapter(for_client(self._global.adapter, spec), layout, full, keeps)
        prune = PrunePlan(
            layout=layout,
            ratio=arm.ratio,
            keep=start,
            stages=self.config.stages,
            warmup_steps=self.config.warmup_steps,
            protect=default_protect(layout),
            measure=len(self.arms) > 1 and self.reward_kind == "probe",
        )
        return LoraPlan(spec=spec, adapter=adapter, prune=prune)

    @property
    def failed_reward(self) -> float:
        """The reward of a device whose update did not come back: no gain, charged as a
        straggler that doubled the round (``delay_penalty x n`` with a 100 % delay), ``n``
        the devices the round asked."""
        return -self.config.delay_penalty * max(len(self._pending), 1)

    def device_models(self) -> dict[str, DeviceModel]:
        """Each device's deployed model: the structure it trained at last, with its last
        arm's rank slice of the current global adapter cut to that structure."""
        layout, full = self.layout, self.layout.full()
        out = {}
        for cid, i in sorted(self._arm_of.items()):
            keep = self._keeps[cid][1]
            spec = client_spec(self.ctx, self.arms[i].rank)
            keeps = layout.decode(keep) if keep else full
            adapter = cut_adapter(for_client(self._global.adapter, spec), layout, full, keeps)
            out[cid] = DeviceModel(spec=spec, adapter=adapter, layout=layout, keep=keep)
        return out

    def configure_train(
        self, server_round: int, clients: Sequence[ClientInfo]
    ) -> Mapping[str, LoraPlan]:
        """Each device's arm from the bandit, its start structure and its slice of the global."""
        self._pending = {}
        self._started_whole = set()
        self._own_start = set()
        plans = {}
        for c in sorted(clients, key=lambda c: c.client_id):
            budget = c.properties.get("memory_mb")
            allowed = self.fitting(c.client_id, budget)
            if not allowed:  # no arm fits the device: it sits the round out
                continue
            i = self.bandit.select(c.client_id, allowed)
            self._pending[c.client_id] = i
            plans[c.client_id] = self._plan(c.client_id, self.arms[i], budget)
        return plans

    def _donor(self, ratio: float) -> bytes:
        """For a device that cannot hold the whole model: the structure at ``ratio`` that a
        device which could chose with its own scores, the one whose last update gained most
        (ties: the smallest id); empty when there is none."""
        found = [
            (-self._gains.get(c, 0.0), c)
            for c in self._scored
            if self._keeps.get(c, (0.0, b""))[0] == ratio and self._keeps[c][1]
        ]
        return self._keeps[min(found)[1]][1] if found else b""

    def _holds_whole(self, budget: float | None) -> bool:
        """Whether a device with ``budget`` can begin a round on the whole model: unless a
        round begun on it was measured above the budget (and a coordinator start exists)."""
        if budget is None or self.ctx.magnitude_start is None or self._whole_peak is None:
            return True
        return self._whole_peak <= budget

    def footprint(self, cid: str, i: int) -> float | None:
        """What arm ``i`` is known to need on device ``cid`` (MiB): the device's own last
        measurement, else the largest any device measured (the same model and batches, so
        mostly a property of the arm), else ``None``. Measured in rounds that trained at the
        arm's own structure (no cut): a round that prunes on the device starts from a larger
        model, and that transient is the simulation's to charge (``devices``), not the arm's."""
        own = self._peaks.get(cid, {}).get(i)
        if own is not None:
            return own
        seen = [p[i] for p in self._peaks.values() if i in p]
        return max(seen) if seen else None

    def fitting(self, cid: str, budget: float | None) -> list[int]:
        """The arms device ``cid`` may play under a memory ``budget`` (MiB; None: all).

        Left out: an arm whose footprint (:meth:`footprint`) exceeds the budget, and an arm
        that prunes no more and has no lower rank than one whose footprint does (memory
        does not shrink with less pruning or a larger rank). An arm nobody measured yet,
        with no such arm beside it, is allowed: playing it measures it.
        """
        if budget is None:
            return list(range(len(self.arms)))
        known = {i: f for i in range(len(self.arms)) if (f := self.footprint(cid, i)) is not None}
        if self._whole_peak is not None:  # an unpruned arm needs what a whole-model round did
            known |= {i: self._whole_peak for i, a in enumerate(self.arms)
                      if a.ratio == 0 and i not in known}  # fmt: skip
        over = [self.arms[j] for j, f in known.items() if f > budget]
        return [
            i
            for i, a in enumerate(self.arms)
            if not any(a.ratio <= o.ratio and a.rank >= o.rank for o in over)
        ]

    def _structures(self, ups: Sequence[LoraUpdate]) -> list[list[Keep]]:
        """Each update's kept structure, decoded once per round."""
        layout = self.layout
        return [layout.decode(u.keep) if u.keep else layout.full() for u in ups]

    def _slices(
        self,
        ups: Sequence[LoraUpdate],
        structures: Sequence[Sequence[Keep]],
        weights: Sequence[float],
        module: str,
    ) -> tuple[list[Slice], list[Slice]]:
        b_pieces, a_pieces = [], []
        for w, u, keeps in zip(weights, ups, structures, strict=True):
            rows, cols = self.layout.factor_index(module, keeps)
            a, b = unit_scale(u.factors[module])  # (r_k, in_k), (out_k, r_k)
            ranks = tuple(range(a.shape[0]))
            b_pieces.append(Slice(b, rows, ranks, w))
            a_pieces.append(Slice(a, ranks, cols, w))
        return b_pieces, a_pieces

    def aggregate_train(self, server_round: int, updates: Sequence[LoraUpdate]) -> AggregateResult:
        """Masked averaging of the unit-scale factors; bandit rewards; remember structures."""
        ups = sorted(updates, key=lambda u: u.header.client_id)
        if not ups:
            raise AggregationError("strategy 'fedspine' got no updates to aggregate")
        global_ = self._global.adapter
        for u in ups:
            if set(u.factors) != set(global_):
                raise AggregationError(
                    f"client {u.header.client_id} adapted other modules than the global adapter"
                )
        weights = example_weights(ups, self.config.weighted)
        structures = self._structures(ups)
        out: dict[str, LoraFactors] = {}
        covered = 0.0
        for m in sorted(global_):
            g = global_[m]
            b_pieces, a_pieces = self._slices(ups, structures, weights, m)
            b, count_b = masked_average(b_pieces, g.b)  # (out, R)
            a, _ = masked_average(a_pieces, g.a)  # (R, in)
            covered += float((count_b > 0).float().mean()) / len(global_)
            out[m] = LoraFactors(a=a, b=b, alpha=g.alpha)
        metrics = self._learn(ups, structures)
        metrics["fedspine_covered"] = covered
        return self._global.update(out, metrics)

    def _validation_gains(
        self, ups: Sequence[LoraUpdate], structures: Sequence[Sequence[Keep]]
    ) -> dict[str, float]:
        """``L(G) - L(G with k's coordinates)`` on the validation records, per device."""
        val = self.ctx.validation_loss
        if val is None:
            raise ConfigError("no validation records to score updates with")
        prev = self._global.adapter
        spec = unit_spec(self.ctx.spec, next(iter(prev.values())).rank)
        base = val(spec, prev)
        gains = {}
        for u, keeps in zip(ups, structures, strict=True):
            solo: dict[str, LoraFactors] = {}
            for m, g in prev.items():
                b_pieces, a_pieces = self._slices([u], [keeps], [1.0], m)
                b, _ = masked_average(b_pieces, g.b)
                a, _ = masked_average(a_pieces, g.a)
                solo[m] = LoraFactors(a=a, b=b, alpha=g.alpha)
            gains[u.header.client_id] = base - val(spec, solo)
        return gains

    def _learn(
        self, ups: Sequence[LoraUpdate], structures: Sequence[Sequence[Keep]]
    ) -> dict[str, float]:
        """Record structures, feed the bandit, describe the round."""
        metrics: dict[str, float] = {}
        drops, times, kept, played = {}, {}, [], []
        learning = len(self.arms) > 1
        if learning and self.reward_kind == "validation":
            mine = [i for i, u in enumerate(ups) if u.header.client_id in self._pending]
            drops = self._validation_gains([ups[i] for i in mine], [structures[i] for i in mine])
        for u in ups:
            cid = u.header.client_id
            arm_i = self._pending.get(cid)
            if arm_i is None:
                continue
            arm = self.arms[arm_i]
            played.append(arm)
            self._keeps[cid] = (arm.ratio, u.keep or b"")
            self._arm_of[cid] = arm_i
            if arm.ratio > 0 and cid in self._own_start:
                self._scored.add(cid)
            else:
                self._scored.discard(cid)
            metrics[f"arm_ratio/{cid}"] = arm.ratio
            metrics[f"arm_rank/{cid}"] = float(arm.rank)
            kept.append(u.metrics.get("prune_params", 1.0))
            if "peak_mem_mb" in u.metrics and not u.metrics.get("prune_cuts", 0.0):
                # a round that cut nothing ran at the arm's own structure: its steady footprint
                self._peaks.setdefault(cid, {})[arm_i] = u.metrics["peak_mem_mb"]
            if "peak_mem_mb" in u.metrics and cid in self._started_whole:
                peak = u.metrics["peak_mem_mb"]
                self._whole_peak = max(self._whole_peak or 0.0, peak)
            if "probe_loss_start" in u.metrics and "probe_loss_end" in u.metrics:
                drops[cid] = u.metrics["probe_loss_start"] - u.metrics["probe_loss_end"]
            times[cid] = u.metrics.get("client_s", u.metrics.get("train_s", 0.0))
        if learning and drops:
            self._gains.update(drops)
            outcomes = fedspine_outcomes(drops, times, self.config.delay_penalty)
            for cid, o in sorted(outcomes.items()):
                self._observe(cid, o)
            metrics["fedspine_reward_mean"] = sum(o.reward for o in outcomes.values()) / len(
                outcomes
            )
            metrics["fedspine_gain_mean"] = sum(drops.values()) / len(drops)
        failed = sorted(set(self._pending) - {u.header.client_id for u in ups})
        if learning and failed:  # missed the deadline, ran out of memory, or went away
            for cid in failed:  # no gain, charged as a straggler that doubled the round
                self._observe(cid, Outcome(0.0, 2.0, -self.failed_reward, failed=True))
            metrics["fedspine_failed_pulls"] = float(len(failed))
        if played:
            metrics["fedspine_ratio_mean"] = sum(a.ratio for a in played) / len(played)
            metrics["fedspine_rank_mean"] = sum(a.rank for a in played) / len(played)
            metrics["fedspine_params_mean"] = sum(kept) / len(kept)
        return metrics

    def _observe(self, cid: str, outcome: Outcome) -> None:
        if isinstance(self.bandit, OutcomeBandit):
            self.bandit.observe(cid, self._pending[cid], outcome)
        else:
            self.bandit.update(cid, self._pending[cid], outcome.reward)

    def state_dict(self) -> dict[str, Any]:
        """Global adapter, bandit statistics, each device's structure, this round's arms, the
        measured memory of each device's arms."""
        return {
            **self._global.state(),
            "bandit": self.bandit.state_dict(),
            "keeps": {c: [r, k] for c, (r, k) in self._keeps.items()},
            "pending": dict(self._pending),
            "peaks": {c: {str(i): v for i, v in p.items()} for c, p in self._peaks.items()},
            "arm_of": dict(self._arm_of),
            "whole_peak": self._whole_peak,
            "started_whole": sorted(self._started_whole),
            "own_start": sorted(self._own_start),
            "scored": sorted(self._scored),
            "gains": dict(self._gains),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._global.load(state)
        self.bandit.load_state_dict(state["bandit"])
        self._keeps = {str(c): (float(r), bytes(k)) for c, (r, k) in state["keeps"].items()}
        self._pending = {str(c): int(i) for c, i in state["pending"].items()}
        self._peaks = {
            str(c): {int(i): float(v) for i, v in p.items()}
            for c, p in state.get("peaks", {}).items()
        }
        self._arm_of = {str(c): int(i) for c, i in state.get("arm_of", {}).items()}
        whole = state.get("whole_peak")
        self._whole_peak = float(whole) if whole is not None else None
        self._started_whole = {str(c) for c in state.get("started_whole", [])}
        self._own_start = {str(c) for c in state.get("own_start", [])}
        self._scored = {str(c) for c in state.get("scored", [])}
        self._gains = {str(c): float(g) for c, g in state.get("gains", {}).items()}


register_strategy("fedspine", FedSpine)
