"""Every rule across sections, decided from the strategy's capabilities, never from its name.

A scenario's sections are each valid on their own (their dataclasses check that); this module
decides whether they work *together*. Each :class:`Rule` names the keys it concerns, says in
one line what it refuses (``docs/combinations.md`` is generated from these lines, see
:func:`combinations_markdown`), and returns the problem for a configuration it refuses.
:func:`cross_section_problems` runs them all, so loading reports every problem at once.

A rule that refuses a combination does so because it would otherwise fail after the model
loads or after clients trained, or be silently ignored; each message says what to change.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, replace

from fedpeft.algorithms.capabilities import Capabilities
from fedpeft.config.sections import RunConfig, ZoConfig, quantization_label
from fedpeft.devices import assign_profiles
from fedpeft.errors import ConfigError

__all__ = [
    "RULES",
    "Rule",
    "combinations_markdown",
    "cross_section_problems",
    "deployment_problems",
    "foldable",
    "same_factors",
]

#: Attacks that rewrite replies in flight (all but data poisoning).
REWRITING_ATTACKS = ("sign_flip", "scale", "noise", "alie", "nonfinite", "inflate_examples")


@dataclass(frozen=True)
class Rule:
    """One cross-section rule.

    Attributes
    ----------
    keys : tuple[str, ...]
        The keys whose combination it decides (named in its message).
    refuses : str
        What it refuses, in one line (the docs table).
    check : Callable[[RunConfig, Capabilities], str | None]
        The problem (what is wrong and what to change), or ``None`` when the scenario is fine.
    """

    keys: tuple[str, ...]
    refuses: str
    check: Callable[[RunConfig, Capabilities], str | None]


def same_factors(cfg: RunConfig, caps: Capabilities) -> bool:
    """Whether every client of a LoRA strategy trains factors of one shape.

    Not when ranks differ (``[ranks]``) or the base model is pruned per client.
    """
    return cfg.ranks.mode == "uniform" and not caps.needs_layout


def _shapes_why(cfg: RunConfig, caps: Capabilities) -> str:
    if caps.needs_layout:
        return f"strategy {cfg.strategy.name!r} prunes each client's model to its own shapes"
    return f"ranks.mode = {cfg.ranks.mode!r} gives clients different ranks"


def _one_shape(
    active: Callable[[RunConfig], bool], what: str, off: str
) -> Callable[[RunConfig, Capabilities], str | None]:
    """A rule: ``what`` needs every LoRA client to train one shape; ``off`` turns it off."""

    def check(cfg: RunConfig, caps: Capabilities) -> str | None:
        if not active(cfg) or caps.family == "zo" or same_factors(cfg, caps):
            return None
        return (
            f"{what}, but {_shapes_why(cfg, caps)}: use ranks.mode = 'uniform' with a "
            f"non-pruning strategy, or {off}"
        )

    return check


_dp_shapes = _one_shape(
    lambda c: c.dp.active,
    "dp.noise_multiplier > 0 clips and averages the clients' changes to one set of factors",
    "dp.noise_multiplier = 0",
)
_robust_shapes = _one_shape(
    lambda c: c.robust.active,
    "robust rules compare the clients' changes coordinate by coordinate",
    "robust.rule = 'mean' with robust.clip_norm = 0",
)
_server_opt_shapes = _one_shape(
    lambda c: c.server_opt.active,
    "server_opt steps one set of factors every client was sent",
    "server_opt.name = 'none'",
)
_secagg_shapes = _one_shape(
    lambda c: c.secagg.enabled, "secagg sums one shape for all clients", "secagg.enabled = false"
)


def _ranks(cfg: RunConfig, caps: Capabilities) -> str | None:
    if cfg.ranks.mode == "uniform" or (caps.heterogeneous_ranks and not caps.chooses_ranks):
        return None
    if caps.chooses_ranks:
        return (
            f"ranks.mode = {cfg.ranks.mode!r}, but {cfg.strategy.name!r} picks each client's "
            "rank itself (its arms in strategy.options): set ranks.mode = 'uniform'"
        )
    kind = "a seed/scalar strategy" if caps.family == "zo" else "a one-rank strategy"
    return (
        f"ranks.mode = {cfg.ranks.mode!r} assigns clients different ranks, but "
        f"{cfg.strategy.name!r} is {kind} and would ignore it: use a heterogeneous-rank "
        "strategy (flora, ffa, rolora, flexlora, hetlora) or ranks.mode = 'uniform'"
    )


def _codec(cfg: RunConfig, caps: Capabilities) -> str | None:
    if cfg.compress.up in caps.codecs:
        return None
    return (
        f"compress.up = {cfg.compress.up!r} is not an upload codec of {cfg.strategy.name!r} "
        f"(it takes {sorted(caps.codecs)}): set compress.up to one of those"
    )


def _down_codec(cfg: RunConfig, caps: Capabilities) -> str | None:
    if cfg.compress.down == "none" or caps.family == "lora":
        return None
    return (
        f"compress.down = {cfg.compress.down!r} encodes LoRA factors; {cfg.strategy.name!r} "
        "sends seed/scalar coefficients: set compress.down = 'none'"
    )


def _zo_section(cfg: RunConfig, caps: Capabilities) -> str | None:
    if caps.family == "zo" or cfg.zo == ZoConfig():
        return None
    return (
        f"[zo] sets seed/scalar training, but {cfg.strategy.name!r} trains LoRA factors and "
        "would ignore it: remove the [zo] keys or use a seed/scalar strategy (fedkseed, "
        "fedkseed-pro, sparse-mezo, ferret)"
    )


def _dp_statistics(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not (cfg.dp.active and caps.client_statistics):
        return None
    return (
        f"dp.noise_multiplier > 0, but {cfg.strategy.name!r} with these strategy.options uses "
        "per-client statistics that DP does not cover (FedKSeed-Pro's seed sampling): use "
        "fedkseed with strategy.options.pro = false, or dp.noise_multiplier = 0"
    )


def _dp_robust(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not (cfg.dp.active and cfg.robust.active):
        return None
    return (
        "dp.noise_multiplier > 0 clips and averages every update itself: set robust.rule = "
        "'mean', robust.clip_norm = 0 and robust.scalar_clip = 0, or dp.noise_multiplier = 0"
    )


def _dp_centralized(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not (cfg.dp.active and cfg.federation.centralized):
        return None
    return "dp protects clients; with federation.centralized = true set dp.noise_multiplier = 0"


def _robust_family(cfg: RunConfig, caps: Capabilities) -> str | None:
    if caps.family == "lora" and cfg.robust.scalar_clip > 0:
        return "robust.scalar_clip is for seed/scalar strategies; LoRA uses robust.clip_norm"
    if caps.family == "zo" and cfg.robust.rule in ("median", "krum", "multikrum"):
        return (
            f"robust.rule = {cfg.robust.rule!r} combines LoRA updates; seed/scalar strategies "
            "take 'mean' or 'trimmed_mean' (per seed) with robust.scalar_clip"
        )
    if caps.family == "zo" and cfg.robust.clip_norm > 0:
        return "robust.clip_norm is for LoRA updates; seed/scalar strategies use scalar_clip"
    return None


def _secagg_strategy(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not cfg.secagg.enabled or caps.linear:
        return None
    return (
        f"secagg.enabled gives the coordinator only the sum of the clients' changes, but "
        f"{cfg.strategy.name!r} is not linear (its new global is not the sent model plus the "
        "mean change): use a linear strategy (fedavg, ffa, rolora, fedkseed, ferret) or "
        "secagg.enabled = false"
    )


def _secagg_clients(cfg: RunConfig, caps: Capabilities) -> str | None:
    fed = cfg.federation
    per_round = fed.sample_size(fed.num_clients)
    if not cfg.secagg.enabled or (per_round >= 2 and not fed.centralized):
        return None
    if fed.centralized:
        return (
            "secagg hides each client's update in a sum of several; federation.centralized = "
            "true has one client: set secagg.enabled = false"
        )
    return (
        f"secagg needs at least 2 clients per round; federation.fraction_train = "
        f"{fed.fraction_train} / clients_per_round = {fed.clients_per_round} of num_clients = "
        f"{fed.num_clients} samples {per_round}: raise federation.clients_per_round, "
        "fraction_train or min_clients"
    )


def _secagg_robust(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not (cfg.secagg.enabled and cfg.robust.active):
        return None
    return "robust rules need each client's update; secagg hides them: set secagg.enabled = false"


def _secagg_codec(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not (cfg.secagg.enabled and cfg.compress.up != "none"):
        return None
    return "secagg sends fixed-point vectors, not codec payloads: set compress.up = 'none'"


def _secagg_attack(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not (cfg.secagg.enabled and cfg.attack.kind in REWRITING_ATTACKS):
        return None
    return (
        f"attack.kind = {cfg.attack.kind!r} rewrites updates in flight, which secagg hides "
        "from everyone: use attack.kind = 'label_flip' (data poisoning) or secagg.enabled = false"
    )


def _attack_codec(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not (cfg.attack.kind in REWRITING_ATTACKS and cfg.compress.up != "none"):
        return None
    return (
        f"attack.kind = {cfg.attack.kind!r} rewrites plain updates in flight: set "
        "compress.up = 'none'"
    )


def _attack_centralized(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not (cfg.attack.kind != "none" and cfg.federation.centralized):
        return None
    return (
        f"attack.kind = {cfg.attack.kind!r} makes some clients attackers; "
        "federation.centralized = true has one honest client: set attack.kind = 'none'"
    )


def _attack_zo(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not (caps.family == "zo" and cfg.attack.kind == "alie"):
        return None
    return "attack.kind = 'alie' shifts LoRA factors; seed/scalar strategies take the others"


def _eval_federated(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not (cfg.eval.federated and caps.family == "zo"):
        return None
    return (
        f"eval.federated is for LoRA strategies; {cfg.strategy.name!r} is a seed/scalar "
        "strategy: set eval.federated = false"
    )


def _eval_personalized(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not (cfg.eval.personalized and caps.family == "zo"):
        return None
    return (
        f"eval.personalized is for LoRA strategies; {cfg.strategy.name!r} is a seed/scalar "
        "strategy: set eval.personalized = false"
    )


def _personal_eval(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not caps.personal or cfg.eval.personalized:
        return None
    return (
        f"{cfg.strategy.name!r} keeps part of each client's model on the client, so the "
        "global model alone shows none of the training: set eval.personalized = true"
    )


def _fixed_steps(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not (caps.fixed_steps and cfg.train.epochs > 0):
        return None
    return (
        f"train.epochs = {cfg.train.epochs} gives clients different numbers of local steps, "
        f"but {cfg.strategy.name!r} derives its state from the steps it asks for: set "
        "train.epochs = 0 and train.local_steps"
    )


def _centralized_clients(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not (cfg.federation.centralized and cfg.federation.min_clients > 1):
        return None
    return (
        "federation.centralized = true runs one client holding all the data, but "
        f"federation.min_clients = {cfg.federation.min_clients} waits for more: set "
        "federation.min_clients = 1"
    )


def _server_opt(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not cfg.server_opt.active or (caps.family == "lora" and caps.linear):
        return None
    kind = "a seed/scalar strategy" if caps.family == "zo" else "not linear"
    return (
        f"server_opt.name = {cfg.server_opt.name!r} steps the mean change of a linear LoRA "
        f"strategy, but {cfg.strategy.name!r} is {kind}: use fedavg, ffa or rolora, or "
        "server_opt.name = 'none'"
    )


def _lr_schedule(cfg: RunConfig, caps: Capabilities) -> str | None:
    train = cfg.train
    scheduled = train.lr_schedule != "constant" or train.warmup_rounds > 0
    if scheduled and caps.family == "zo":
        return (
            f"train.lr_schedule = {train.lr_schedule!r} / train.warmup_rounds = "
            f"{train.warmup_rounds} schedule train.lr of LoRA training; {cfg.strategy.name!r} "
            "is a seed/scalar strategy: set train.lr_schedule = 'constant' and "
            "train.warmup_rounds = 0"
        )
    if train.warmup_rounds >= cfg.federation.rounds > 0 and scheduled:
        return (
            f"train.warmup_rounds = {train.warmup_rounds} leaves no round of the "
            f"federation.rounds = {cfg.federation.rounds} after warmup: lower it"
        )
    return None


def _devices(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not cfg.devices.tiers and not cfg.devices.file:
        return None
    ids = [str(i) for i in range(cfg.federation.num_clients)]
    try:
        assign_profiles(ids, cfg.devices.tiers, cfg.devices.file)
    except ConfigError as err:
        return "; ".join(err.problems)
    return None


def _quantized(cfg: RunConfig) -> list[str]:
    """The quantizations this scenario's nodes load, other than ``none``."""
    own = quantization_label(cfg.model.quantization, cfg.model.double_quant)
    return sorted({own, *cfg.simulation.node_quantization} - {"none"})


def _quant_installed(cfg: RunConfig, caps: Capabilities) -> str | None:
    quantized = _quantized(cfg)
    if not quantized or importlib.util.find_spec("bitsandbytes") is not None:
        return None
    return (
        f"model.quantization / simulation.node_quantization load a {quantized[0]} base through "
        "bitsandbytes, which is not installed here: run `pip install 'fedpeft[quant]'`, or set "
        "model.quantization = 'none' and leave simulation.node_quantization empty"
    )


def _quant_zo_full(cfg: RunConfig, caps: Capabilities) -> str | None:
    quantized = _quantized(cfg)
    if not quantized or caps.family != "zo" or cfg.zo.target != "full":
        return None
    return (
        f"zo.target = 'full' perturbs every base weight in place, and a {quantized[0]} base "
        "holds packed integer blocks that cannot be perturbed and restored exactly: set "
        "zo.target = 'lora' (seed/scalar over LoRA factors) or model.quantization = 'none'"
    )


def _quant_layout(cfg: RunConfig, caps: Capabilities) -> str | None:
    quantized = _quantized(cfg)
    if not quantized or not (caps.needs_layout or caps.merges_base):
        return None
    what = "prunes" if caps.needs_layout else "merges adapters into"
    return (
        f"{cfg.strategy.name!r} {what} the base model's linear layers, whose weights a "
        f"{quantized[0]} base holds as packed blocks: set model.quantization = 'none' (and "
        "leave simulation.node_quantization empty)"
    )


def _checkpointing_zo(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not cfg.train.gradient_checkpointing or caps.family != "zo":
        return None
    return (
        f"train.gradient_checkpointing trades recomputation for the activations a backward "
        f"needs; {cfg.strategy.name!r} runs the seed/scalar loops, which it does not reach: "
        "set train.gradient_checkpointing = false"
    )


def _node_quantization(cfg: RunConfig, caps: Capabilities) -> str | None:
    own = quantization_label(cfg.model.quantization, cfg.model.double_quant)
    admitted = {own, *cfg.model.node_quantizations}
    bad = sorted(set(cfg.simulation.node_quantization) - admitted)
    if not bad:
        return None
    return (
        f"simulation.node_quantization has {bad}, which the coordinator would refuse (it admits "
        f"{sorted(admitted)}): add them to model.node_quantizations"
    )


def _stream_strategy(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not cfg.federation.streaming or (caps.linear and not caps.client_statistics):
        return None
    why = (
        "uses statistics of each client's update beyond their mean"
        if caps.linear
        else "is not linear (its new global is not the sent model plus the mean change)"
    )
    return (
        f"federation.aggregation = 'stream' keeps only the sum of the clients' changes, but "
        f"{cfg.strategy.name!r} {why}: use a linear strategy (fedavg, ffa, rolora, fedsa, "
        "scaffold, fedkseed, ferret) or federation.aggregation = 'batch'"
    )


_stream_shapes = _one_shape(
    lambda c: c.federation.streaming,
    "federation.aggregation = 'stream' sums one shape for all clients",
    "federation.aggregation = 'batch'",
)


def _stream_wrappers(cfg: RunConfig, caps: Capabilities) -> str | None:
    if not cfg.federation.streaming:
        return None
    used = [
        key
        for key, on in (
            ("secagg.enabled (already delivers only the sum)", cfg.secagg.enabled),
            (f"robust.rule = {cfg.robust.rule!r} (compares the updates; 'mean' with "
             "robust.clip_norm or robust.scalar_clip folds)", cfg.robust.rule != "mean"),
        )
        if on
    ]  # fmt: skip
    if not used:
        return None
    return (
        f"federation.aggregation = 'stream' folds each update into the sum as it arrives, "
        f"which {'; '.join(used)} cannot follow yet: set federation.aggregation = 'batch'"
    )


def foldable(cfg: RunConfig, caps: Capabilities) -> bool:
    """Whether a round's valid replies can be summed before the strategy sees them: exactly
    when ``federation.aggregation = 'stream'`` would be accepted for this scenario. A batch
    round of such a scenario folds its collected replies too (:mod:`fedpeft.server.fold`), so
    the two aggregation modes give the same global bit for bit."""
    as_stream = replace(cfg, federation=replace(cfg.federation, aggregation="stream"))
    checks = (_stream_strategy, _stream_shapes, _stream_wrappers)
    return all(check(as_stream, caps) is None for check in checks)


def _sampled_discovery(cfg: RunConfig, caps: Capabilities) -> str | None:
    fed = cfg.federation
    if not fed.sampled_discovery:
        return None
    used = [
        key
        for key, on in (
            ("simulation.backend = 'ray' (Flower's engine gives nodes ids of its own)",
             cfg.simulation.backend == "ray"),
            ("eval.federated / eval.personalized (ask every client)",
             cfg.eval.federated or cfg.eval.personalized),
            ("devices.tiers / devices.file (a profile for every client up front)",
             bool(cfg.devices.tiers or cfg.devices.file)),
            ("ranks.mode = 'tiers' (orders every client id)", cfg.ranks.mode == "tiers"),
            ("federation.centralized (one client)", fed.centralized),
        )
        if on
    ]  # fmt: skip
    if not used:
        return None
    return (
        "federation.discovery = 'sampled' asks only each round's sampled clients who they "
        f"are, which {'; '.join(used)} cannot follow: set federation.discovery = 'all'"
    )


def _drawn_centralized(cfg: RunConfig, caps: Capabilities) -> str | None:
    fed = cfg.federation
    if not (fed.records_per_client and fed.centralized):
        return None
    return (
        "federation.centralized = true gives its one client the union of the clients' "
        f"records, which federation.records_per_client = {fed.records_per_client} (records "
        "drawn per client, shared between clients) does not define: set "
        "federation.records_per_client = 0"
    )


RULES: tuple[Rule, ...] = (
    Rule(("ranks.mode", "strategy.name"), "different ranks with a strategy that has one rank "
         "(or none: seed/scalar)", _ranks),
    Rule(("zo", "strategy.name"), "a `[zo]` section with a LoRA strategy", _zo_section),
    Rule(("compress.up", "strategy.name"), "an upload codec the strategy does not take "
         "(seed/scalar strategies and FedSpine take none)", _codec),
    Rule(("compress.down", "strategy.name"), "a download codec with a seed/scalar strategy",
         _down_codec),
    Rule(("dp.noise_multiplier", "strategy.options"), "DP with a strategy that uses per-client "
         "statistics (FedKSeed-Pro, or fedkseed with pro = true)", _dp_statistics),
    Rule(("dp.noise_multiplier", "ranks.mode", "strategy.name"), "DP when LoRA clients train "
         "different shapes (mixed ranks, per-client pruning)", _dp_shapes),
    Rule(("dp.noise_multiplier", "robust.rule", "robust.clip_norm"), "DP together with a "
         "robust rule or clipping", _dp_robust),
    Rule(("dp.noise_multiplier", "federation.centralized"), "DP in centralized mode",
         _dp_centralized),
    Rule(("robust.rule", "robust.clip_norm", "robust.scalar_clip", "strategy.name"), "a "
         "robust setting of the other update family", _robust_family),
    Rule(("robust.rule", "robust.clip_norm", "ranks.mode", "strategy.name"), "robust rules "
         "when LoRA clients train different shapes", _robust_shapes),
    Rule(("secagg.enabled", "strategy.name"), "secure aggregation with a strategy that is not "
         "linear (capability `linear`)", _secagg_strategy),
    Rule(("secagg.enabled", "ranks.mode", "strategy.name"), "secure aggregation when LoRA "
         "clients train different shapes", _secagg_shapes),
    Rule(("secagg.enabled", "federation.centralized", "federation.fraction_train",
          "federation.clients_per_round", "federation.min_clients"), "secure aggregation with "
         "fewer than 2 clients a round", _secagg_clients),
    Rule(("secagg.enabled", "robust.rule", "robust.clip_norm"), "secure aggregation with "
         "robust rules", _secagg_robust),
    Rule(("secagg.enabled", "compress.up"), "secure aggregation with an upload codec",
         _secagg_codec),
    Rule(("secagg.enabled", "attack.kind"), "secure aggregation with an attack that rewrites "
         "updates in flight (label_flip works)", _secagg_attack),
    Rule(("attack.kind", "compress.up"), "an attack that rewrites updates with an upload codec",
         _attack_codec),
    Rule(("attack.kind", "federation.centralized"), "an attack in centralized mode",
         _attack_centralized),
    Rule(("attack.kind", "strategy.name"), "the ALIE attack with a seed/scalar strategy",
         _attack_zo),
    Rule(("eval.federated", "strategy.name"), "federated evaluation with a seed/scalar "
         "strategy", _eval_federated),
    Rule(("eval.personalized", "strategy.name"), "personalized evaluation with a seed/scalar "
         "strategy", _eval_personalized),
    Rule(("eval.personalized", "strategy.name"), "a personalized strategy (FedSA-LoRA) "
         "without personalized evaluation", _personal_eval),
    Rule(("train.epochs", "strategy.name"), "local epochs with a strategy that derives its "
         "state from a fixed number of local steps (SCAFFOLD)", _fixed_steps),
    Rule(("federation.centralized", "federation.min_clients"), "centralized mode waiting for "
         "more than one client", _centralized_clients),
    Rule(("server_opt.name", "strategy.name"), "a server optimizer over a strategy that is "
         "not linear, or a seed/scalar one", _server_opt),
    Rule(("server_opt.name", "ranks.mode", "strategy.name"), "a server optimizer when LoRA "
         "clients train different shapes", _server_opt_shapes),
    Rule(("train.lr_schedule", "train.warmup_rounds", "federation.rounds", "strategy.name"),
         "a round learning-rate schedule with a seed/scalar strategy, or warmup that takes "
         "every round", _lr_schedule),
    Rule(("model.quantization", "simulation.node_quantization"), "a quantized base where "
         "bitsandbytes is not installed", _quant_installed),
    Rule(("model.quantization", "simulation.node_quantization", "zo.target", "strategy.name"),
         "a quantized base with seed/scalar training of every base weight", _quant_zo_full),
    Rule(("model.quantization", "simulation.node_quantization", "strategy.name"), "a quantized "
         "base with a strategy that prunes the base model (FedSpine) or merges adapters into "
         "it (FLoRA)", _quant_layout),
    Rule(("train.gradient_checkpointing", "strategy.name"), "gradient checkpointing with a "
         "seed/scalar strategy", _checkpointing_zo),
    Rule(("simulation.node_quantization", "model.node_quantizations"), "simulated nodes "
         "loading a quantization the coordinator does not admit", _node_quantization),
    Rule(("federation.aggregation", "strategy.name"), "streaming aggregation with a strategy "
         "that is not linear or uses per-client statistics", _stream_strategy),
    Rule(("federation.aggregation", "ranks.mode", "strategy.name"), "streaming aggregation "
         "when LoRA clients train different shapes", _stream_shapes),
    Rule(("federation.aggregation", "secagg.enabled", "robust.rule"), "streaming aggregation "
         "with secure aggregation or robust rules other than the mean", _stream_wrappers),
    Rule(("federation.discovery", "simulation.backend", "eval.federated", "eval.personalized",
          "devices.tiers", "devices.file", "ranks.mode", "federation.centralized"), "discovery "
         "of the sampled clients only with Ray, federated evaluation, device profiles, rank "
         "tiers or centralized mode", _sampled_discovery),
    Rule(("federation.records_per_client", "federation.centralized"), "records drawn per "
         "client in centralized mode", _drawn_centralized),
    Rule(("devices.tiers", "devices.file", "federation.num_clients"), "device tiers or a "
         "device file that name an unknown profile or are malformed", _devices),
)  # fmt: skip


def cross_section_problems(cfg: RunConfig, caps: Capabilities) -> list[str]:
    """Every problem across sections (empty if the sections work together)."""
    return [msg for rule in RULES if (msg := rule.check(cfg, caps)) is not None]


def deployment_problems(cfg: RunConfig) -> list[str]:
    """What a scenario asks that only a simulation can do (checked before real nodes run it)."""
    out = []
    if cfg.attack.kind != "none":
        out.append("[attack] simulates Byzantine clients; it is refused on real nodes")
    if cfg.federation.sampled_discovery:
        out.append(
            "federation.discovery = 'sampled' needs a transport that addresses clients by id "
            "(the in-process simulation); real nodes are discovered with 'all'"
        )
    return out


def combinations_markdown() -> str:
    """``docs/combinations.md``: the rules as a table (regenerate with ``fedpeft rules``)."""
    lines = [
        "# Which sections combine",
        "",
        "Generated from `fedpeft/config/rules.py` by `fedpeft rules > docs/combinations.md`;",
        "a test checks that this file is current. Every rule is decided when the scenario",
        "loads (`fedpeft validate`), from the strategy's capabilities",
        "(`fedpeft/algorithms/capabilities.py`), never from its name: a plug-in that declares",
        "the same capabilities as an in-tree strategy is accepted in the same places.",
        "Anything not refused here works together, and `tests/test_combinations.py` runs a",
        "round of every accepted pair of feature sections to keep that true.",
        "",
        "| keys | refused |",
        "|---|---|",
    ]
    lines += [f"| {', '.join(f'`{k}`' for k in r.keys)} | {r.refuses} |" for r in RULES]
    return "\n".join(lines) + "\n"
