"""The data is checked before any model loads: `fedpeft validate` and every simulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedpeft.models
from fedpeft.cache import ProcessCache
from fedpeft.cli import main
from fedpeft.config.load import load_config
from fedpeft.data.check import data_problems
from fedpeft.errors import ConfigError, by_reason
from fedpeft.simulation.runner import simulate


def _records(n: int, keys: int) -> list[dict[str, str]]:
    return [
        {"q": f"question {i}", "a": f"answer {i}", "topic": f"t{i % keys}",
         "split": "eval" if i % 10 == 0 else "train"}
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture
def scenario(tmp_path: Path) -> Path:
    """A small own-data scenario: 60 records, 3 topics, 3 clients by topic."""
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(60, 3)))
    toml = tmp_path / "mine.toml"
    toml.write_text(
        'name = "mine"\n[model]\nname = "tiny"\n'
        '[data]\npath = "mine.jsonl"\nprompt_template = "{q}\\n"\nresponse_template = "{a}"\n'
        '[federation]\nnum_clients = 3\nrounds = 1\npartition = "natural"\n'
        'partition_key = "topic"\n'
    )
    return toml


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model load fails the test: the checks must come first."""

    def refuse(cfg: object) -> None:
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(fedpeft.models, "load_model", refuse)


MISTAKES = {
    "missing file": ("data.path=nowhere.jsonl", "does not exist; set data.path"),
    "template field": ("data.response_template={answer}", "data.response_template uses field "
                       "'answer', which 60 of the 60 records lack"),
    "split field": ("data.split_field=part", "data.split_field 'part' is not a field"),
    "impossible split": ("federation.num_clients=4", "natural partition needs >= 4 distinct key "
                         "values, found 3"),
}  # fmt: skip


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_validate_exits_2_on_a_data_mistake_without_loading_a_model(
    scenario, no_model, capsys, mistake
):
    override, message = MISTAKES[mistake]
    assert main(["validate", "--config", str(scenario), override]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_validate_passes_good_data_without_loading_a_model(scenario, no_model, capsys):
    assert main(["validate", "--config", str(scenario)]) == 0
    assert 'partition_key = "topic"' in capsys.readouterr().out


def test_every_distinct_problem_is_reported_once(scenario):
    cfg = load_config(
        scenario,
        ["data.prompt_template={question}", "data.response_template={answer}",
         "federation.partition_key=kind"],
    )  # fmt: skip
    problems = data_problems(cfg, ProcessCache())
    assert len(problems) == 3, problems
    assert sum("'question'" in p for p in problems) == 1
    assert sum("partition_key 'kind'" in p for p in problems) == 1


def test_a_simulation_refuses_bad_data_before_writing_its_run_folder(scenario, no_model, tmp_path):
    cfg = load_config(scenario, ["federation.num_clients=4"])
    with pytest.raises(ConfigError, match="natural partition needs >= 4"):
        simulate(cfg, tmp_path / "run", quiet=True, cache=ProcessCache())
    assert not (tmp_path / "run").exists()


def test_reasons_are_grouped_so_each_is_said_once() -> None:
    failures = {"10": "timed out", "2": "timed out", "1": "bad norm", "0": "timed out"}
    assert by_reason(failures) == "clients 0, 2, 10: timed out; client 1: bad norm"
