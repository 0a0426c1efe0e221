"""The small commands: validate, config-help, strategies, data wordnet (run in process)."""

from __future__ import annotations

import dataclasses
import gzip
import json

import pytest

from fedpeft.algorithms.registry import registered
from fedpeft.cli import main
from fedpeft.config import RunConfig
from fedpeft.config.load import load_config


def test_validate_prints_the_resolved_scenario_which_loads_back_the_same(repo, capsys, tmp_path):
    assert main(["validate", "--config", str(repo / "simulations" / "tiny.toml"), "rounds=3",
                 "lora.rank=2", "train.weight_decay=0.5"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "rank = 2\n" in text and "weight_decay = 0.5\n" in text
    (tmp_path / "resolved.toml").write_text(text)
    again = load_config(tmp_path / "resolved.toml", [])
    assert again.federation.rounds == 3 and again.lora.rank == 2 and again.model.name == "tiny"
    want = load_config(
        repo / "simulations" / "tiny.toml", ["rounds=3", "lora.rank=2", "train.weight_decay=0.5"]
    )
    assert again == want


def test_validate_refuses_a_bad_value_naming_the_key(repo, capsys):
    rc = main(["validate", "--config", str(repo / "simulations" / "tiny.toml"), "lora.rank=0"])
    assert rc == 2
    assert "lora.rank must be >= 1, got 0" in capsys.readouterr().err


def test_config_help_lists_every_key_with_its_default(capsys):
    assert main(["config-help"]) == 0
    text = capsys.readouterr().out
    defaults = RunConfig()
    for section in dataclasses.fields(RunConfig):
        value = getattr(defaults, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for f in dataclasses.fields(value):
            assert f"{section.name}.{f.name} = " in text, f"{section.name}.{f.name}"
    assert "lora.rank = 8" in text


def test_strategies_lists_every_registered_strategy_once(capsys):
    assert main(["strategies"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines if line and not line.startswith(" ")]
    assert names == registered()
    assert {"fedavg", "fedkseed", "ferret", "flora", "ffa"} <= set(names)


# Three WordNet 3.0 data lines, one per part of speech used (format of wndb(5WN)); the
# fourth file holds only a license header line, which starts with two spaces.
WORDNET = {
    "noun": "08536535 15 n 01 harbor 0 000 | a sheltered port where ships can take on or "
    'discharge cargo; "the ships docked in the harbor"\n',
    "verb": "01835496 38 v 01 travel 0 000 | change location; move, travel, or proceed\n",
    "adj": "00001740 00 a 01 able(p) 0 000 | (usually followed by `to') having the necessary "
    "means or skill\n",
    "adv": "  1 This software and database is being provided to you\n",
}


def test_data_wordnet_builds_the_task_file(tmp_path, capsys):
    src = tmp_path / "wn"
    src.mkdir()
    for pos, text in WORDNET.items():
        (src / f"data.{pos}").write_text(text, encoding="latin-1")
    out = tmp_path / "wordnet.jsonl.gz"
    assert main(["data", "wordnet", "--src", str(src), "--out", str(out)]) == 0
    recs = [json.loads(x) for x in gzip.decompress(out.read_bytes()).decode().splitlines()]
    got = [{k: r[k] for k in ("id", "prompt", "response", "domain")} for r in recs]
    assert got == [
        {"id": "n08536535", "prompt": "Define the noun 'harbor'.",
         "response": "a sheltered port where ships can take on or discharge cargo",
         "domain": "noun.location"},
        {"id": "v01835496", "prompt": "Define the verb 'travel'.",
         "response": "change location; move, travel, or proceed", "domain": "verb.motion"},
        {"id": "a00001740", "prompt": "Define the adjective 'able'.",
         "response": "(usually followed by `to') having the necessary means or skill",
         "domain": "adj.all"},
    ]  # fmt: skip
    assert {r["split"] for r in recs} <= {"train", "eval"}
    assert "3" in capsys.readouterr().out  # the count of records written


def test_data_wordnet_without_the_source_files_says_what_is_missing(tmp_path, capsys):
    out = tmp_path / "x.jsonl.gz"
    assert main(["data", "wordnet", "--src", str(tmp_path), "--out", str(out)]) != 0
    assert "data.noun" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("command", ["validate", "config-help", "strategies"])
def test_help_of_each_command(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0 and "usage: fedpeft" in capsys.readouterr().out


@pytest.mark.ray
@pytest.mark.parametrize("backend", ["inprocess", "ray"])
def test_quiet_simulate_prints_nothing_the_user_did_not_cause(repo, tmp_path, backend):
    """`fedpeft simulate --quiet` in a fresh process: no deprecation notes from torch,
    transformers or Flower, no Ray or Flower log lines (errors would still be shown)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", "--config",
           str(repo / "simulations" / "tiny.toml"), "--out", str(tmp_path / "run"), "--quiet",
           "--backend", backend, "federation.rounds=1", "train.local_steps=2",
           "simulation.ray_num_cpus=1"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "", done.stderr
    assert (tmp_path / "run" / "summary.json").is_file()
