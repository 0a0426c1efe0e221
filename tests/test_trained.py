"""A finished run's model, loaded as the run loaded it (`fedpeft generate`, `load_trained`), its
base recorded, its split inspected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedpeft
from fedpeft.cache import ProcessCache
from fedpeft.cli import main
from fedpeft.config.load import load_config
from fedpeft.errors import ModelError
from fedpeft.simulation.runner import simulate

SMALL = (
    "federation.num_clients=3", "federation.rounds=2", "train.local_steps=3",
    "eval.examples=16", "eval.max_new_tokens=8", "data.max_examples_per_client=40",
)  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, repo) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = load_config(repo / "simulations" / "tiny.toml", list(SMALL))
    simulate(cfg, out, quiet=True, cache=ProcessCache())
    return out


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_a_loaded_lora_run_reproduces_its_own_eval_loss(lora_run):
    trained = fedpeft.load_trained(lora_run)
    assert trained.evaluate()["eval_loss"] == _summary(lora_run)["after"]["eval_loss"]


def test_a_loaded_seed_scalar_run_reproduces_its_own_eval_loss(tmp_path, repo):
    cfg = load_config(repo / "simulations" / "tiny_fedkseed.toml", ["federation.rounds=2"])
    simulate(cfg, tmp_path, quiet=True, cache=ProcessCache())
    trained = fedpeft.load_trained(tmp_path)
    try:
        loss = trained.evaluate()["eval_loss"]
    finally:
        trained.close()
    # the coordinator moved its weights round by round; the loader rebuilds them in one pass
    # from the base: the same model up to float rounding
    assert loss == pytest.approx(_summary(tmp_path)["after"]["eval_loss"], rel=1e-6)
    assert loss != _summary(tmp_path)["before"]["eval_loss"]  # the coefficients were applied


def test_generate_answers_with_the_trained_model(lora_run, capsys):
    assert main(["generate", str(lora_run), "Define the noun 'harbour'.", "--max-new-tokens",
                 "4"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("> Define the noun 'harbour'.\n")
    trained = fedpeft.load_trained(lora_run)
    ids = trained.prompt_ids("Define the noun 'harbour'.")
    assert ids == trained.prompt_ids("Define the noun 'harbour'.\n", raw=True)  # the template
    assert trained.generate(["Define the noun 'harbour'."], 4)[0] in out


def test_the_run_records_its_true_base_and_how_to_load_it(lora_run):
    record = json.loads((lora_run / "base_model.json").read_text())
    assert record["model.name"] == "tiny" and len(record["fingerprint"]) == 16
    assert (lora_run / "adapter" / "base_model.json").read_text() == (
        lora_run / "base_model.json"
    ).read_text()
    card = (lora_run / "adapter" / "README.md").read_text()
    assert f"fedpeft generate {lora_run}" in card and "fedpeft.load_trained" in card


def test_another_base_model_is_refused(lora_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy)
    record = json.loads((copy / "base_model.json").read_text())
    (copy / "base_model.json").write_text(json.dumps({**record, "fingerprint": "0" * 16}))
    with pytest.raises(ModelError, match="not the one the run trained on"):
        fedpeft.load_trained(copy)


def test_predictions_before_and_after_training_are_saved(lora_run):
    rows = [json.loads(x) for x in (lora_run / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    assert set(rows[0]) == {"prompt", "reference", "before", "after"}


def test_data_inspect_sizes_sum_to_the_records_the_clients_trained_on(lora_run, capsys, repo):
    split = json.loads((lora_run / "split.json").read_text())
    first = json.loads((lora_run / "metrics.jsonl").read_text().splitlines()[1])
    assert len(first["client_ids"]) == 3  # every client trained in round 1 ...
    assert split["records_used"] == first["num_examples"]  # ... on the records split.json says
    assert sum(c["train"] for c in split["clients"]) == split["records_used"]
    assert all(sum(c["keys"].values()) == c["train"] for c in split["clients"])
    assert 0 < split["skew_mean"] <= split["skew_max"] <= 1  # natural: skewed
    toml = str(repo / "simulations" / "tiny.toml")
    assert main(["data", "inspect", "--config", toml, *SMALL, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == split  # the CLI prints what the run wrote
    iid = ["federation.partition=iid", "federation.num_clients=2"]
    assert main(["data", "inspect", "--config", toml, *SMALL, *iid]) == 0
    text = capsys.readouterr().out
    assert text.startswith("split: iid by 'domain', 2 clients") and "skew" in text
