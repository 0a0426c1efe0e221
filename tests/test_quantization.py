"""Quantized base models (bitsandbytes NF4 / FP4 / int8 on the tiny model, CPU): LoRA and
seed/scalar over LoRA train on them, exactly restored perturbations, adapters that peft loads
back onto the same quantized base, nodes of another quantization refused or admitted by name,
gradient checkpointing, and the memory a quantized base saves."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fedpeft.cache import ProcessCache
from fedpeft.client.app import make_client_app
from fedpeft.client.memory import MemoryMeter
from fedpeft.config import ModelConfig
from fedpeft.config.load import load_config
from fedpeft.errors import ConfigError
from fedpeft.models import fingerprint_mismatch, load_model
from fedpeft.server.app import run_server
from fedpeft.server.results import RunReporter
from fedpeft.simulation.inprocess import InProcessGrid
from fedpeft.simulation.runner import simulate
from fedpeft.wire.messages import LoraSpec
from fedpeft.wire.zo import ZoSpec
from fedpeft.zo.local import LocalZo
from fedpeft.zo.runtime import ZoRuntime

bnb = pytest.importorskip("bitsandbytes", reason="pip install 'fedpeft[quant]'")


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run):
    return [r["eval_loss"] for r in _rows(run) if r.get("eval_loss") is not None]


@pytest.mark.parametrize(
    ("kind", "layer"), [("nf4", "Linear4bit"), ("fp4", "Linear4bit"), ("int8", "Linear8bitLt")]
)
def test_a_quantized_base_holds_bitsandbytes_layers_and_says_so_in_its_fingerprint(kind, layer):
    full = load_model(ModelConfig(name="tiny"))
    quant = load_model(ModelConfig(name="tiny", quantization=kind))
    q_proj = quant.base_model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer
    assert type(quant.base_model.lm_head) is torch.nn.Linear  # the head stays full precision
    assert quant.fingerprint == f"{full.fingerprint}/{kind}"
    ids = torch.tensor([[70, 71, 72, 73, 74]])
    with torch.no_grad():
        a, b = full.base_model(input_ids=ids).logits, quant.base_model(input_ids=ids).logits
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < 0.2, rel  # the same model, rounded


@pytest.mark.sim
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_lora_trains_on_a_quantized_base_and_the_loss_goes_down(kind, tiny_config, tmp_path):
    cfg = tiny_config(f"model.quantization={kind}", "federation.rounds=3")
    simulate(cfg, tmp_path, quiet=True, cache=ProcessCache())
    losses = _losses(tmp_path)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05, losses
    full = tiny_config("federation.rounds=3")
    simulate(full, tmp_path / "full", quiet=True, cache=ProcessCache())
    # the base's linear layers hold 1 (int8) or 1/2 (4-bit) byte per weight, not 4
    assert _rows(tmp_path)[1]["peak_mem_mb_max"] < _rows(tmp_path / "full")[1]["peak_mem_mb_max"]


@pytest.mark.sim
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_seed_scalar_over_lora_trains_on_a_quantized_base_with_forward_passes_only(
    kind, tiny_config, tmp_path
):
    cfg = tiny_config(
        f"model.quantization={kind}", "strategy.name=fedkseed", "zo.target=lora",
        "zo.num_seeds=64", "zo.local_steps=30", "zo.lr=0.05", "zo.eps=1e-3",
        "federation.rounds=3",
    )  # fmt: skip
    simulate(cfg, tmp_path, quiet=True, cache=ProcessCache())
    losses = _losses(tmp_path)
    assert losses[-1] < losses[0], losses
    row = _rows(tmp_path)[1]
    assert row["peak_mem_mb_max"] > 0
    full = tiny_config(f"model.quantization={kind}", "federation.rounds=1")
    simulate(full, tmp_path / "adamw", quiet=True, cache=ProcessCache())
    # no activations kept, no gradients, no optimizer state: less than an AdamW LoRA step
    assert row["peak_mem_mb_max"] < _rows(tmp_path / "adamw")[1]["peak_mem_mb_max"]


def _perturb_and_restore_is_exact(handle) -> bool:
    """Five seeds' +eps, -eps and fused restore over the LoRA factors of ``handle``: the
    factors and every base tensor (packed blocks and constants included) come back bit for
    bit."""
    spec = ZoSpec(
        algorithm="fedkseed", target="lora", num_seeds=16, pool_seed=3, eps=1e-3, lr=1e-4,
        local_steps=2, master="always",
        lora=LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")),
    )  # fmt: skip
    rt = ZoRuntime(handle, spec)
    before = [p.detach().clone() for p in rt.params]
    base = {k: v.clone() for k, v in handle.base_model.state_dict().items() if "lora_" not in k}
    local = LocalZo(rt, rt.spec)
    for k in range(5):
        local.begin(rt.seed(k))
        local.perturb(1e-3)
        local.perturb(-1e-3)
        local.update(0.0)
    after = {k: v for k, v in handle.base_model.state_dict().items() if "lora_" not in k}
    return (
        all(torch.equal(a, b) for a, b in zip(before, rt.params, strict=True))
        and base.keys() == after.keys()
        and all(torch.equal(base[k], after[k]) for k in base)
    )


def test_perturb_and_restore_of_lora_factors_is_exact_on_an_nf4_base():
    handle = load_model(ModelConfig(name="tiny", quantization="nf4", double_quant=True))
    assert _perturb_and_restore_is_exact(handle)


@pytest.mark.sim
def test_the_adapter_loads_with_peft_onto_the_same_quantized_base_and_gives_the_reported_loss(
    tiny_config, tmp_path
):
    from peft import PeftModel

    from fedpeft.data.clients import get_task
    from fedpeft.evaluation import EvalSet, eval_loss

    cfg = tiny_config("model.quantization=nf4", "model.double_quant=true")
    simulate(cfg, tmp_path, quiet=True, cache=ProcessCache())
    reported = _losses(tmp_path)[-1]
    handle = load_model(cfg.model)  # a fresh nf4 base, as a user would load it
    model = PeftModel.from_pretrained(handle.base_model, str(tmp_path / "adapter")).eval()
    evalset = EvalSet.build(cfg, get_task(cfg.data, 0, ProcessCache()).eval, handle.tokenizer)
    with torch.no_grad():
        loss, _ = eval_loss(model, evalset.examples, cfg.eval.batch_size,
                            handle.tokenizer.pad_token_id, torch.device("cpu"))  # fmt: skip
    assert abs(loss - reported) <= 1e-5, (loss, reported)
    with torch.no_grad(), model.disable_adapter():
        untrained, _ = eval_loss(model, evalset.examples, cfg.eval.batch_size,
                                 handle.tokenizer.pad_token_id, torch.device("cpu"))  # fmt: skip
    assert untrained - loss > 0.05  # the adapter is what changed the loss


def test_fingerprints_name_both_quantizations():
    assert fingerprint_mismatch("abc/nf4", "abc/nf4") is None
    why = fingerprint_mismatch("abc/nf4", "abc")
    assert why is not None and "'nf4' on the node and 'none' on the coordinator" in why
    assert fingerprint_mismatch("abc/nf4", "abc", accepted=["nf4"]) is None
    assert fingerprint_mismatch("abc/nf4-dq", "abc", accepted=["nf4"]) is not None
    other = fingerprint_mismatch("abd", "abc", accepted=["nf4"])
    assert other is not None and "different weights" in other


def _run(cfg, tmp_path, node_configs, cache):
    grid = InProcessGrid(make_client_app(cfg, cache), node_configs)
    reporter = RunReporter(tmp_path, cfg.federation.rounds, quiet=True)
    run_server(grid, cfg, tmp_path, reporter, cache)
    return _rows(tmp_path)


@pytest.mark.sim
def test_a_node_of_another_quantization_is_refused_unless_the_scenario_admits_it(
    tiny_config, tmp_path
):
    nodes = [{"partition-id": 0}, {"partition-id": 1, "quantization": "nf4"}, {"partition-id": 2}]
    # client 1 never joins: wait for it briefly, not federation.connect_timeout_s's default
    cfg = tiny_config(
        "federation.rounds=1", "federation.min_clients=2", "federation.connect_timeout_s=1"
    )
    rows = _run(cfg, tmp_path / "refused", nodes, ProcessCache())
    refused = rows[0]["discovery"]["refused"]
    assert rows[0]["discovery"]["joined"] == ["0", "2"], rows[0]["discovery"]
    (why,) = refused.values()
    assert "client 1" in why and "'nf4' on the node and 'none' on the coordinator" in why, why
    assert "model.node_quantizations" in why
    mixed = tiny_config("federation.rounds=1", "model.node_quantizations=['nf4']")
    rows = _run(mixed, tmp_path / "mixed", nodes, ProcessCache())
    assert rows[0]["discovery"]["joined"] == ["0", "1", "2"]
    peaks = rows[1]["client_peak_mem_mb"]
    assert peaks["1"] < peaks["0"] == peaks["2"]  # client 1 holds the 4-bit base


@pytest.mark.sim
def test_a_simulation_mixes_quantizations_by_partition(tiny_config, tmp_path):
    cfg = tiny_config(
        "simulation.node_quantization=['nf4', 'none']", "model.node_quantizations=['nf4']"
    )
    simulate(cfg, tmp_path, quiet=True, cache=ProcessCache())
    rows = _rows(tmp_path)
    peaks = rows[1]["client_peak_mem_mb"]
    assert peaks["0"] < peaks["1"] and peaks["2"] == peaks["0"], peaks
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["model.quantization=nf4", "strategy.name=fedkseed"],
         "zo.target = 'full' perturbs every base weight in place, and a nf4 base"),
        (["model.quantization=int8", "strategy.name=fedspine"], "'fedspine' prunes the base"),
        (["model.quantization=nf4", "strategy.name=flora"], "'flora' merges adapters into"),
        (["simulation.node_quantization=['int8']"],
         "simulation.node_quantization has ['int8'], which the coordinator would refuse"),
        (["simulation.node_quantization=['int8']", "strategy.name=fedkseed"],
         "zo.target = 'full' perturbs every base weight in place, and a int8 base"),
        (["train.gradient_checkpointing=true", "strategy.name=fedkseed", "zo.target=lora"],
         "train.gradient_checkpointing trades recomputation"),
    ],
)  # fmt: skip
def test_combinations_a_quantized_base_cannot_take_are_refused_at_load(overrides, problem, repo):
    with pytest.raises(ConfigError) as err:
        load_config(repo / "simulations" / "tiny.toml", overrides)
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_a_quantized_base_without_bitsandbytes_is_refused_at_load(repo, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    with pytest.raises(ConfigError) as err:
        load_config(repo / "simulations" / "tiny.toml", ["model.quantization=nf4"])
    assert any("bitsandbytes, which is not installed" in p for p in err.value.problems)
    load_config(repo / "simulations" / "tiny.toml", [])  # nothing quantized: no need for it


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["model.quantization=q3"], "model.quantization must be one of"),
        (["model.double_quant=true"], "model.double_quant = true needs model.quantization"),
        (["model.node_quantizations=['nf5']"], "model.node_quantizations: ['nf5'] not among"),
    ],
)
def test_bad_quantization_settings_are_refused_with_the_valid_ones(overrides, problem, repo):
    with pytest.raises(ConfigError) as err:
        load_config(repo / "simulations" / "tiny.toml", overrides)
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


@pytest.mark.sim
def test_gradient_checkpointing_gives_the_same_model_with_fewer_activations(tiny_config, tmp_path):
    """Recomputing in backward changes no number the model sees (dropout is seeded per round
    and replayed by the recompute), and the meter counts what checkpointing keeps instead:
    each decoder layer's input."""
    runs = {}
    for on in (False, True):
        cfg = tiny_config(f"train.gradient_checkpointing={str(on).lower()}", "model.tiny_layers=4")
        simulate(cfg, tmp_path / str(on), quiet=True, cache=ProcessCache())
        runs[on] = _rows(tmp_path / str(on))
    assert [r.get("eval_loss") for r in runs[True]] == [r.get("eval_loss") for r in runs[False]]
    plain, ckpt = runs[False][1], runs[True][1]
    assert 0 < ckpt["peak_mem_mb_max"] < plain["peak_mem_mb_max"]


def test_the_meter_counts_a_quantized_bases_blocks_and_constants():
    handle = load_model(ModelConfig(name="tiny", quantization="nf4", double_quant=True))
    meter = MemoryMeter(handle.base_model, "", handle.device)
    params = sum(p.untyped_storage().nbytes() for p in handle.base_model.parameters())
    absmax = sum(
        p.quant_state.absmax.untyped_storage().nbytes()
        for p in handle.base_model.parameters()
        if getattr(p, "quant_state", None) is not None
    )
    assert absmax > 0 and meter.weights >= params + absmax


def test_a_quantized_handle_is_its_own_cache_entry(tiny_config):
    from fedpeft.models import get_model

    cache = ProcessCache()
    cfg = tiny_config()
    full = get_model(cfg.model, cache)
    quant = get_model(dataclasses.replace(cfg.model, quantization="nf4"), cache)
    assert full is not quant and full.fingerprint != quant.fingerprint
    assert type(full.base_model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_on_cuda_a_quantized_base_trains_lora_and_restores_perturbations_exactly(
    kind, tiny_config, tmp_path
):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine; benchmarks/gpu_check.py runs it where one is")
    cfg = tiny_config(f"model.quantization={kind}", "model.device=cuda", "model.dtype=auto")
    simulate(cfg, tmp_path, quiet=True, cache=ProcessCache())
    losses = _losses(tmp_path)
    assert losses[-1] < losses[0], losses
    handle = load_model(ModelConfig(name="tiny", device="cuda", quantization=kind))
    assert _perturb_and_restore_is_exact(handle)


def test_a_deployed_nodes_quantization_flag_sets_its_model_section():
    from flwr.app import Context, RecordDict

    from fedpeft.client.app import node_overrides

    ctx = Context(1, 1, {"quantization": "nf4-dq", "dtype": "bfloat16"}, RecordDict(), {})
    got = node_overrides(ctx)
    assert got["model.quantization"] == "nf4" and got["model.double_quant"] is True
    assert got["model.dtype"] == "bfloat16"
    plain = node_overrides(Context(1, 1, {"quantization": "int8"}, RecordDict(), {}))
    assert plain["model.quantization"] == "int8" and plain["model.double_quant"] is False
