"""Configuration: every shipped TOML validates; errors are collected and say what is valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from fedpeft.config import RunConfig
from fedpeft.config.load import config_to_dict, dump_toml, load_config, parse_overrides
from fedpeft.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(
    p for d in ("simulations", "server", "client", "strategies") for p in (REPO / d).rglob("*.toml")
)


def test_defaults_are_valid():
    cfg = load_config(None)
    assert isinstance(cfg, RunConfig) and cfg.strategy.name == "fedavg"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_toml_validates(path):
    cfg = load_config(path)
    assert Path(cfg.data.path).is_file(), f"{path}: data.path {cfg.data.path} missing"


def test_shipped_scenarios_exist():
    names = {p.name for p in SHIPPED}
    assert {"tiny.toml", "default.toml", "centralized.toml"} <= names


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("4", 4),
        ("1e-3", 1e-3),
        ("true", True),
        ('["q_proj", "v_proj"]', ["q_proj", "v_proj"]),
        ("hello", "hello"),
        ('"4"', "4"),
    ],
)
def test_override_values_parse_as_toml(raw, value):
    assert parse_overrides([f"x={raw}"]) == {"x": value}


def test_overrides_apply_and_shortcuts_expand():
    cfg = load_config(
        REPO / "simulations" / "tiny.toml",
        ["rounds=7", "lora.rank=2", "train.lr=0.5", "lora.target_modules=q_proj"],
    )
    assert cfg.federation.rounds == 7 and cfg.lora.rank == 2 and cfg.train.lr == 0.5
    assert cfg.lora.target_modules == ["q_proj"]


def test_int_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match="federation.rounds must be int, got 2.5"):
        load_config(None, ["rounds=2.5"])


def test_all_problems_in_one_error():
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            [
                "lora.rank=0",
                "federation.rnds=3",
                "no_such_key=1",
                "strategy.name=nope",
                "train.batch_size=x",
            ],
        )
    problems = err.value.problems
    assert len(problems) == 5
    text = str(err.value)
    assert "did you mean 'rounds'" in text
    assert "valid keys at the top level: attack, compress, data, devices, dp, eval" in text
    assert "unknown strategy 'nope'; registered: fedavg" in text


def test_unknown_section_key_lists_valid_keys():
    with pytest.raises(
        ConfigError, match=r"valid keys at \[lora\]: alpha, dropout, rank, target_modules"
    ):
        load_config(None, ["lora.rnak=3"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        parse_overrides(["rounds"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_relative_paths(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    toml = tmp_path / "sub" / "s.toml"
    toml.write_text('[data]\npath = "d.jsonl"\n')
    assert load_config(toml).data.path == str(tmp_path / "sub" / "d.jsonl")
    monkeypatch.chdir(tmp_path)
    assert load_config(toml, ["data.path=x.jsonl"]).data.path == str(tmp_path / "x.jsonl")


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(REPO / "simulations" / "default.toml", ["strategy.options.weighted=false"])
    text = dump_toml(config_to_dict(cfg))
    assert tomllib.loads(text) == config_to_dict(cfg)
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert load_config(path) == cfg
