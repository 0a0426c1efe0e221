"""The round learning-rate schedule (``train.lr_schedule``) and what each round's clients get."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedpeft.cache import ProcessCache
from fedpeft.config import RunConfig, TrainConfig
from fedpeft.config.load import load_config
from fedpeft.errors import ConfigError
from fedpeft.rounds import round_lr, round_train
from fedpeft.simulation.runner import simulate

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "simulations" / "tiny.toml")


@pytest.mark.parametrize(
    ("schedule", "warmup", "end", "want"),
    [
        ("constant", 0, 0.0, [1.0, 1.0, 1.0, 1.0, 1.0]),
        ("constant", 2, 0.0, [1 / 3, 2 / 3, 1.0, 1.0, 1.0]),
        # p = (r - 1) / 5: 0, .2, .4, .6, .8
        ("linear", 0, 0.0, [1.0, 0.8, 0.6, 0.4, 0.2]),
        ("linear", 0, 0.5, [1.0, 0.9, 0.8, 0.7, 0.6]),
        ("cosine", 0, 0.0, [(1 + math.cos(math.pi * k / 5)) / 2 for k in range(5)]),
        # warmup 1: r = 1 at lr / 2; then p = (r - 2) / 4 over rounds 2..5
        ("cosine", 1, 0.1, [0.5] + [0.1 + 0.9 * (1 + math.cos(math.pi * k / 4)) / 2
                                    for k in range(4)]),
    ],
)  # fmt: skip
def test_round_lr_known_values(schedule, warmup, end, want):
    train = TrainConfig(lr=2.0, lr_schedule=schedule, warmup_rounds=warmup, lr_end_factor=end)
    got = [round_lr(train, r, 5) for r in range(1, 6)]
    assert got == pytest.approx([2.0 * w for w in want], abs=1e-12)
    assert all(g > 0 for g in got)


def test_round_train_keeps_the_section_when_constant_and_scales_centralized_steps():
    cfg = RunConfig()
    assert round_train(cfg, 3) is cfg.train
    central = load_config(None, {"federation.centralized": True, "federation.min_clients": 1,
                                 "train.lr_schedule": "linear"})  # fmt: skip
    t = round_train(central, 2)
    assert t.local_steps == central.train.local_steps * central.federation.num_clients
    assert t.lr == pytest.approx(central.train.lr * (1 - 1 / 3))


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["strategy.name=fedkseed", "zo.num_seeds=64", "train.lr_schedule=cosine"],
         "train.lr_schedule = 'cosine' / train.warmup_rounds = 0 schedule train.lr of LoRA"),
        (["train.warmup_rounds=3", "federation.rounds=3"],
         "train.warmup_rounds = 3 leaves no round of the federation.rounds = 3"),
        (["train.lr_schedule=step"], "train.lr_schedule must be one of"),
        (["train.lr_end_factor=2"], "train.lr_end_factor must be in [0, 1]"),
    ],
)  # fmt: skip
def test_schedule_rules(overrides, problem):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_clients_train_with_the_rounds_rate(tmp_path):
    """The rate each round's instructions carried is in its row, and differs from a constant
    run's model (the clients used it)."""
    small = ["federation.rounds=3", "train.local_steps=2", "eval.examples=8",
             "data.max_examples_per_client=32", "eval.max_new_tokens=2"]  # fmt: skip
    sched = [*small, "train.lr_schedule=linear", "train.warmup_rounds=1"]
    simulate(load_config(TINY, sched), tmp_path / "s", quiet=True, cache=ProcessCache())
    rows = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    lr = load_config(TINY, []).train.lr
    assert [r.get("lr") for r in rows[1:]] == pytest.approx([lr / 2, lr, lr / 2])
    simulate(load_config(TINY, small), tmp_path / "c", quiet=True, cache=ProcessCache())
    const = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert "lr" not in const[1]
    assert rows[1]["eval_loss"] != const[1]["eval_loss"]
