"""Shared fixtures: tiny models built in code, small configs, update factories."""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from hypothesis import settings  # noqa: E402

from fedpeft import testing  # noqa: E402
from fedpeft.cache import PROCESS_CACHE, ProcessCache  # noqa: E402
from fedpeft.config import ModelConfig, RunConfig  # noqa: E402
from fedpeft.config.load import load_config  # noqa: E402
from fedpeft.lora.handle import ModelHandle  # noqa: E402
from fedpeft.models import load_model  # noqa: E402
from fedpeft.wire.messages import Header, LoraFactors, LoraUpdate  # noqa: E402

# Property tests are CPU-bound: on a busy machine hypothesis' 200 ms deadline per example
# fails tests that are merely slow. Their size is bounded by max_examples instead.
settings.register_profile("fedpeft", deadline=None)
settings.load_profile("fedpeft")

REPO = Path(__file__).resolve().parents[1]
TINY_TOML = REPO / "simulations" / "tiny.toml"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``FEDPEFT_MUTATION=1`` (benchmarks/mutation.py) keep the unit tests only: a test
    that runs a simulation (it takes ``tiny_config`` or is marked ``sim``), Ray or a
    deployment costs minutes per surviving mutant."""
    if os.environ.get("FEDPEFT_MUTATION") != "1":
        return
    keep, drop = [], []
    for item in items:
        slow = "tiny_config" in getattr(item, "fixturenames", ()) or any(
            item.get_closest_marker(m) for m in ("sim", "ray", "deploy")
        )
        (drop if slow else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def _fresh_process_cache():
    """Every test starts with an empty process cache, so no test sees a model or runtime that
    an earlier one built or changed (a full-model seed/scalar run moves the cached weights)."""
    yield
    PROCESS_CACHE.clear()


@pytest.fixture
def install_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[Path, str, str], None]:
    """``install_plugin(file, module, entry)``: a copy of ``file`` as module ``module`` with a
    distribution's metadata declaring ``entry`` (``"name = module:Class"``) in the
    ``fedpeft.strategies`` group, on ``sys.path``, as pip leaves an installed plug-in."""

    def install(file: Path, module: str, entry: str) -> None:
        shutil.copy(file, tmp_path / f"{module}.py")
        info = tmp_path / f"{module}-1.0.dist-info"
        info.mkdir()
        name = module.replace("_", "-")
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[fedpeft.strategies]\n{entry}\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, module, raising=False)

    return install


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """``free_port()``: a port for a server a test starts in another process
    (:func:`fedpeft.testing.free_port`)."""
    return testing.free_port


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root."""
    return REPO


@pytest.fixture(scope="session")
def tiny_handle() -> ModelHandle:
    """One tiny random LLaMA shared by the tests that only read or switch adapters."""
    return load_model(ModelConfig(name="tiny"))


def _small_model(arch: str, layers: int = 3) -> torch.nn.Module:
    """A small random LLaMA (6 query heads in 3 KV groups: GQA) or GPT-2 (4 heads), eval mode."""
    from fedpeft.seeding import scoped_torch_seed

    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        conf = LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=layers,
            num_attention_heads=6,
            num_key_value_heads=3,
            max_position_embeddings=64,
        )
        with scoped_torch_seed(0):
            return LlamaForCausalLM(conf).eval()
    from transformers import GPT2Config, GPT2LMHeadModel

    g_conf = GPT2Config(vocab_size=64, n_embd=48, n_layer=layers, n_head=4, n_positions=64)
    with scoped_torch_seed(0):
        return GPT2LMHeadModel(g_conf).eval()


@pytest.fixture
def small_model() -> Callable[..., torch.nn.Module]:
    """``small_model(arch, layers=3)``: a fresh small random ``llama`` or ``gpt2`` model."""
    return _small_model


def _zeroed(model: torch.nn.Module, keep: Mapping[int, Any]) -> torch.nn.Module:
    """Zero what structured pruning removes, shapes unchanged: the output projection's columns
    (GPT-2 Conv1D: rows) of removed query heads and the down projection's of removed FFN
    channels. Written from the model's config, not with fedpeft's pruning helpers."""
    cfg = model.config
    llama = cfg.model_type == "llama"
    heads = cfg.num_attention_heads if llama else cfg.n_head
    groups = cfg.num_key_value_heads if llama else heads
    hd = (cfg.hidden_size if llama else cfg.n_embd) // heads
    ffn = cfg.intermediate_size if llama else (cfg.n_inner or 4 * cfg.n_embd)
    per = heads // groups  # query heads per KV group
    layers = model.model.layers if llama else model.transformer.h
    with torch.no_grad():
        for i, k in keep.items():
            kept = {h * hd + d for g in k.attn for h in range(g * per, (g + 1) * per)
                    for d in range(hd)}  # fmt: skip
            cols = [c for c in range(heads * hd) if c not in kept]
            kept_ffn = set(k.ffn)
            chans = [c for c in range(ffn) if c not in kept_ffn]
            if llama:
                layers[i].self_attn.o_proj.weight[:, cols] = 0
                layers[i].mlp.down_proj.weight[:, chans] = 0
            else:
                layers[i].attn.c_proj.weight[cols, :] = 0
                layers[i].mlp.c_proj.weight[chans, :] = 0
    return model


@pytest.fixture
def zeroed() -> Callable[..., torch.nn.Module]:
    """``zeroed(model, keep)``: the reference a pruned model must equal (see ``_zeroed``)."""
    return _zeroed


class _RoundRecorder:
    """A strategy that records the rounds it is asked about, around a real one (wrappers such as
    DP and robust aggregation must pass the round on)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.rounds = inner, []

    def configure_train(self, server_round: int, clients: Any) -> Any:
        self.rounds.append(("configure", server_round))
        return self.inner.configure_train(server_round, clients)

    def aggregate_train(self, server_round: int, updates: Any) -> Any:
        self.rounds.append(("aggregate", server_round))
        return self.inner.aggregate_train(server_round, updates)

    def state_dict(self) -> Any:
        return self.inner.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.inner.load_state_dict(state)


@pytest.fixture
def round_recorder() -> type[_RoundRecorder]:
    """``round_recorder(strategy)``: the strategy, recording ``(call, round)`` in ``.rounds``."""
    return _RoundRecorder


@pytest.fixture
def cache() -> ProcessCache:
    """A fresh process cache, so a test counts its own model loads."""
    return ProcessCache()


def _tiny_config(*overrides: str) -> RunConfig:
    base = (
        "federation.num_clients=3",
        "federation.rounds=2",
        "train.local_steps=3",
        "data.max_examples_per_client=48",
        "eval.examples=16",
        "eval.max_new_tokens=8",
    )
    return load_config(TINY_TOML, [*base, *overrides])


@pytest.fixture
def tiny_config() -> Callable[..., RunConfig]:
    """``tiny_config(*overrides)``: the shipped tiny scenario, made smaller, plus overrides."""
    return _tiny_config


@pytest.fixture
def make_update() -> Callable[..., LoraUpdate]:
    """Factory of random LoRA updates: ``make_update(client="0", rank=4, num_examples=10)``."""

    def make(
        client: str = "0",
        rank: int = 4,
        num_examples: int = 10,
        modules: tuple[str, ...] = ("m.q_proj", "m.v_proj"),
        shape: tuple[int, int] = (12, 10),
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        server_round: int = 1,
    ) -> LoraUpdate:
        g = torch.Generator().manual_seed(seed)
        factors = {
            m: LoraFactors(
                a=torch.randn(rank, shape[1], generator=g).to(dtype),
                b=torch.randn(shape[0], rank, generator=g).to(dtype),
                alpha=8.0,
            )
            for m in modules
        }
        header = Header(
            run_id="run",
            server_round=server_round,
            model_fingerprint="fp",
            adapter_hash="h",
            num_examples=num_examples,
            client_id=client,
        )
        return LoraUpdate(header=header, factors=factors, metrics={"train_loss": 1.0})

    return make


Handler = Callable[[Message, Context], Message]


def _wrap_app(real: ClientApp, overrides: Mapping[str, Handler]) -> ClientApp:
    """A ClientApp answering every fedpeft message type like ``real``, except ``overrides``
    (message type, e.g. ``"train.lora"`` -> handler)."""
    from fedpeft.deploy.apps import FORWARDED

    app = ClientApp()
    for category, action in FORWARDED:
        kind = f"{category}.{action}"

        def forward(msg: Message, ctx: Context) -> Message:
            return real(msg, ctx)

        getattr(app, category)(action)(overrides.get(kind, forward))
    return app


@pytest.fixture
def wrap_app() -> Callable[[ClientApp, Mapping[str, Handler]], ClientApp]:
    """``wrap_app(real, {"train.lora": handler})``: ``real`` with some handlers replaced."""
    return _wrap_app


@pytest.fixture
def outage(monkeypatch: pytest.MonkeyPatch) -> Callable[[int | None], None]:
    """``outage(r)``: every client of round ``r`` times out (the round fails) until
    ``outage(None)`` ends the outage."""
    from fedpeft.server import coordinator

    real = coordinator.exchange

    def start(failing_round: int | None) -> None:
        if failing_round is None:
            monkeypatch.setattr(coordinator, "exchange", real)
            return

        def exchange(grid, instructions, nodes, server_round, *args, **kwargs):
            got = real(grid, instructions, nodes, server_round, *args, **kwargs)
            if server_round == failing_round:
                for u in got.updates:
                    got.fail(u.header.client_id, "timeout", "simulated outage")
                got.updates = []
            return got

        monkeypatch.setattr(coordinator, "exchange", exchange)

    return start


@pytest.fixture
def word_batches() -> Callable[[ModelHandle], tuple[Callable[[list[int]], Any], int]]:
    """``word_batches(handle)``: 16 short tokenized records ("Define word i." -> "meaning
    number i") as ``(batch_of(indices), 16)``, for seed/scalar local loops."""
    from fedpeft.data.tasks import TextPair
    from fedpeft.data.tokenize import collate, encode_pairs

    def make(handle: ModelHandle) -> tuple[Callable[[list[int]], Any], int]:
        pairs = [TextPair(f"Define word {i}.\n", f"meaning number {i}") for i in range(16)]
        examples = encode_pairs(handle.tokenizer, pairs, 48)

        def batch_of(idx: list[int]) -> Any:
            pad = handle.tokenizer.pad_token_id
            return collate([examples[i] for i in idx], pad, handle.device)

        return batch_of, len(examples)

    return make
