"""The Python API: docs/api.md's code runs as a notebook; results match the CLI's run folder;
arguments are checked; the caller's model object and environment are left as they were."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import torch

import fedpeft
from fedpeft.config import ModelConfig
from fedpeft.models import load_model

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "simulations" / "tiny.toml"
SMALL = {
    "federation.rounds": 1,
    "federation.num_clients": 2,
    "train.local_steps": 2,
    "eval.examples": 8,
    "eval.max_new_tokens": 4,
    "data.max_examples_per_client": 32,
}


def test_docs_api_runs_as_a_notebook(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(), re.S)
    assert len(blocks) == 3
    env = dict(os.environ)
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), scope)  # noqa: S102 (our own docs)
    out = capsys.readouterr().out
    assert re.search(r"eval loss \d+\.\d{4} -> \d+\.\d{4} in 2 rounds", out), out
    assert "rank 4 modules 4" in out and "2 rows;" in out
    assert scope["after"] < scope["before"]
    assert "the run's own eval loss: True" in out  # a run folder's model, loaded back
    assert len(scope["answers"]) == 1
    assert dict(os.environ) == env  # the library wrote no environment variable


def test_the_result_is_what_the_run_folder_holds(tmp_path):
    from safetensors.torch import load_file

    res = fedpeft.simulate(TINY, overrides=SMALL, out_dir=tmp_path, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert res.rows == rows and res.out_dir == tmp_path
    assert res.summary == json.loads((tmp_path / "summary.json").read_text())
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    q = next(m for m in res.adapter if m.endswith("layers.0.self_attn.q_proj"))
    key = f"base_model.model.{q}.lora_A.weight"
    assert torch.equal(saved[key], res.adapter[q].a)
    assert res.config.federation.rounds == 1 and res.zo_coeffs is None


def test_a_seed_scalar_run_returns_its_coefficients():
    res = fedpeft.simulate(
        REPO / "simulations" / "tiny_fedkseed.toml",
        progress=False,
        overrides={**SMALL, "zo.local_steps": 4, "zo.target": "lora"},
    )
    assert res.zo_coeffs is not None and res.zo_coeffs.shape == (1, 1024)
    assert float(abs(res.zo_coeffs).sum()) > 0 and res.adapter is not None


def test_a_loaded_config_with_overrides_and_the_callers_model_is_not_changed():
    cfg = fedpeft.load_config(TINY, {"federation.rounds": 3})
    handle = load_model(ModelConfig(name="tiny"))
    before = copy.deepcopy(handle.base_model.state_dict())
    modules = [n for n, _ in handle.base_model.named_modules()]
    res = fedpeft.simulate(cfg, overrides=SMALL, model=(handle.base_model, handle.tokenizer),
                           progress=False)  # fmt: skip
    assert res.config.federation.rounds == 1  # the override won
    after = handle.base_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()
    assert [n for n, _ in handle.base_model.named_modules()] == modules  # no adapter injected


def test_the_same_model_passed_in_gives_the_run_with_model_name():
    by_name = fedpeft.simulate(TINY, overrides=SMALL, progress=False)
    handle = load_model(ModelConfig(name="tiny"))
    passed = fedpeft.simulate(TINY, overrides=SMALL, progress=False,
                              model=(handle.base_model, handle.tokenizer))  # fmt: skip
    assert passed.rows[-1]["eval_loss"] == by_name.rows[-1]["eval_loss"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"data": "records.jsonl"}, "data must be a datasets.Dataset or a list of records"),
     ({"data": []}, "data has no records"),
     ({"model": object()}, "model must be a transformers causal LM"),
     ({"model": load_model(ModelConfig(name="tiny")).base_model,
       "overrides": {"simulation.backend": "ray"}}, "model= lives in this process"),
     ({"overrides": {"federation.roundz": 2}}, "did you mean 'rounds'")],
)  # fmt: skip
def test_bad_arguments_are_configuration_errors(kwargs, message):
    with pytest.raises(fedpeft.ConfigError, match=re.escape(message)):
        fedpeft.simulate(TINY, progress=False, **kwargs)
