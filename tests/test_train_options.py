"""The [train] options a client applies, each against a value computed here."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedpeft.client.trainer import ClientData, LoraTrainer, local_steps
from fedpeft.config import TrainConfig
from fedpeft.data.tasks import TextPair
from fedpeft.data.tokenize import encode_pairs
from fedpeft.lora.handle import init_factors
from fedpeft.wire.messages import Header, LoraSpec, TrainInstruction

SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


@pytest.mark.parametrize(
    ("epochs", "n", "batch", "accum", "want"),
    [(2.0, 10, 4, 1, 5), (2.0, 10, 4, 2, 3), (0.5, 10, 4, 1, 2), (0.01, 10, 4, 1, 1)],
)
def test_epochs_give_ceil_of_epochs_times_examples_over_examples_per_step(
    epochs, n, batch, accum, want
):
    train = TrainConfig(epochs=epochs, batch_size=batch, grad_accum=accum, local_steps=99)
    assert local_steps(train, n) == want
    assert local_steps(dataclasses.replace(train, epochs=0.0), n) == 99


def _data(handle, n=8):
    # equal-length targets, so a mean over micro-batch means equals the mean over the batch
    pairs = [TextPair(prompt=f"word {i}", target=f"meaning {i}") for i in range(n)]
    return ClientData("0", encode_pairs(handle.tokenizer, pairs, 32, False))


def _fit(handle, start, **train):
    cfg = TrainConfig(**{"local_steps": 1, "batch_size": 4, "lr": 1e-2, **train})
    ins = TrainInstruction(
        header=Header("run", 1, "fp", SPEC.config_hash(), 0, "0"),
        lora=SPEC,
        train=cfg,
        adapter=start,
        seed=5,
    )
    return LoraTrainer().fit(handle, ins, _data(handle))


def _start(handle):
    shapes = handle.module_shapes(handle.ensure_adapter(SPEC))
    start = init_factors(shapes, SPEC, 0)
    g = torch.Generator().manual_seed(1)
    return {m: dataclasses.replace(f, b=torch.randn(f.b.shape, generator=g) * 0.1)
            for m, f in start.items()}  # fmt: skip


def test_weight_decay_is_decoupled_adamw_decay(tiny_handle):
    """One AdamW step: theta_1(wd) - theta_1(0) = -lr * wd * theta_0 (Loshchilov & Hutter)."""
    start = _start(tiny_handle)
    plain = _fit(tiny_handle, start, max_grad_norm=0.0)
    decayed = _fit(tiny_handle, start, weight_decay=0.5, max_grad_norm=0.0)
    for m, f in start.items():
        for part in ("a", "b"):
            diff = getattr(decayed.factors[m], part) - getattr(plain.factors[m], part)
            assert torch.allclose(diff, -1e-2 * 0.5 * getattr(f, part), atol=1e-6)


def test_grad_accum_of_two_half_batches_equals_one_full_batch(tiny_handle):
    start = _start(tiny_handle)
    full = _fit(tiny_handle, start, batch_size=4, grad_accum=1, max_grad_norm=0.0)
    halves = _fit(tiny_handle, start, batch_size=2, grad_accum=2, max_grad_norm=0.0)
    assert full.metrics["steps"] == halves.metrics["steps"] == 1.0
    for m in start:
        assert torch.allclose(full.factors[m].a, halves.factors[m].a, atol=1e-5)
        assert torch.allclose(full.factors[m].b, halves.factors[m].b, atol=1e-5)
        assert not torch.equal(full.factors[m].b, start[m].b)


def test_max_grad_norm_clips_the_gradient_before_the_step(tiny_handle, monkeypatch):
    """The clip sees every trained factor and the configured norm, before the step."""
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        seen.append((len(params), max_norm, all(p.grad is not None for p in params)))
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    start = _start(tiny_handle)
    _fit(tiny_handle, start, max_grad_norm=0.25, local_steps=2)
    assert seen == [(2 * len(start), 0.25, True)] * 2  # A and B of every module, per step
    seen.clear()
    _fit(tiny_handle, start, max_grad_norm=0.0)
    assert seen == []
