"""Prune-then-tune on the device (FedSpine's client side): LoRA training on a structurally
pruned copy of the base model, pruning further in stages from LoRA-gradient importance.

Per round, for an instruction with a :class:`~fedpeft.wire.prune.PrunePlan`:

1. Build the starting structure (``plan.keep``; the whole model when empty): a copy of the
   shared base model whose unpruned tensors are *shared*, not copied, and whose pruned
   layers get new, smaller tensors (:func:`fedpeft.prune.structure.prune_layers`). The
   instruction's adapter already has this structure's shapes. This copy stands in for the
   device's own pruned model, which a real device keeps between rounds; its cost is
   reported as ``prune_setup_s`` and left out of ``train_s``.
2. For each stage ratio ``plan.ratio * s / plan.stages`` the structure does not meet yet:
   tune ``warmup_steps`` steps while LoRAPrune scores (:mod:`fedpeft.prune.importance`)
   accumulate from the LoRA gradients, then cut every unprotected layer to that ratio's
   counts, keeping its best-scored groups, and cut the LoRA factors to match (a fresh
   optimizer follows each cut: the moments of removed rows would not fit). Kinds with no
   adapted module (e.g. FFN channels when only attention is adapted) are scored by weight
   magnitude ``|W|``.
3. Tune the remaining local steps; report the final structure with the factors.

``probe_loss_start`` / ``probe_loss_end``: the loss of the round's first batch at the first
local step (received factors, starting structure; the training forward itself, so free), and
that batch's loss after training (trained factors, final structure, eval mode; one extra
forward). The FedSpine strategy turns their difference into the bandit's reward.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import torch

from fedpeft.client.memory import MemoryMeter
from fedpeft.client.trainer import (
    ClientData,
    batch_stream,
    local_steps,
    reply_header,
    run_steps,
)
from fedpeft.data.tokenize import collate
from fedpeft.lora.handle import ModelHandle
from fedpeft.prune.deployed import base_params, pruned_handle
from fedpeft.prune.importance import GroupScores, element_importance
from fedpeft.prune.layout import PruneLayout, cut_adapter
from fedpeft.prune.schedule import needs_pruning, shrink, stage_ratios, target_counts
from fedpeft.seeding import derive_seed, scoped_torch_seed
from fedpeft.wire.messages import LoraUpdate, TrainInstruction

__all__ = ["PruneTrainer"]


def _weight_out_in(layout: PruneLayout, module: Any) -> torch.Tensor:
    w: torch.Tensor = module.weight.detach()
    return w.T if layout.arch == "gpt2" else w  # GPT-2 Conv1D stores (in, out)


def _accumulate(
    table: dict[tuple[int, str], torch.Tensor], key: tuple[int, str], scores: torch.Tensor
) -> None:
    """Add ``scores`` (float64) into ``table[key]``."""
    table[key] = table[key] + scores.double() if key in table else scores.double()


class _Scorer:
    """Accumulates LoRAPrune group scores of the current structure, step after step."""

    def __init__(self, sub: ModelHandle, name: str, layout: PruneLayout) -> None:
        self.sub, self.name, self.layout = sub, name, layout
        self.scores = GroupScores()

    def after_backward(self) -> None:
        """Fold this step's LoRA gradients into the smoothed scores."""
        step: dict[tuple[int, str], torch.Tensor] = {}
        with torch.no_grad():
            for module, layer in self.sub.lora_layers(self.name):
                role = self.layout.role(module)
                a, b = layer.lora_A[self.name].weight, layer.lora_B[self.name].weight
                if role is None or a.grad is None or b.grad is None:
                    continue
                w = _weight_out_in(self.layout, layer.get_base_layer())
                imp = element_importance(w, a, b, a.grad, b.grad, layer.scaling[self.name])
                kind, s = self.layout.group_scores(role, imp)
                _accumulate(step, (role.layer, kind), s)
        for layer_idx in sorted({i for i, _ in step}):
            self.scores.add(layer_idx, step.get((layer_idx, "attn")), step.get((layer_idx, "ffn")))

    def fill_magnitude(self) -> None:
        """Score kinds that no adapted module reached by ``|W|`` of the layer's modules."""
        model = self.sub.peft_model(self.name).base_model.model
        found: dict[tuple[int, str], torch.Tensor] = {}
        with torch.no_grad():
            for module, mod in model.named_modules():
                role = self.layout.role(module)
                if role is None or not hasattr(mod, "weight"):
                    continue
                kind, s = self.layout.group_scores(role, _weight_out_in(self.layout, mod).abs())
                table = self.scores.attn if kind == "attn" else self.scores.ffn
                if role.layer not in table:
                    _accumulate(found, (role.layer, kind), s)
        for (i, kind), s in found.items():
            (self.scores.attn if kind == "attn" else self.scores.ffn)[i] = s


def _probe_loss(sub: ModelHandle, name: str, batch: dict[str, torch.Tensor]) -> float:
    model = sub.peft_model(name)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = float(model(**batch).loss)
    model.train(was_training)
    return loss


class PruneTrainer:
    """LoRA training with structured pruning (see the module docstring)."""

    def fit(self, handle: ModelHandle, ins: TrainInstruction, data: ClientData) -> LoraUpdate:
        """Prune in stages, tune, and return the factors of the final structure."""
        plan = ins.prune
        if plan is None:
            raise ValueError("PruneTrainer needs an instruction with a pruning plan")
        t_setup = time.perf_counter()
        layout, protect = plan.layout, plan.protect
        keeps = plan.start()
        sub = pruned_handle(handle, layout, keeps)
        name = sub.ensure_adapter(ins.lora)
        sub.set_factors(name, ins.adapter)
        setup_s = time.perf_counter() - t_setup

        t0 = time.perf_counter()
        steps = local_steps(ins.train, len(data.examples))
        stream = batch_stream(ins, data)
        first = next(stream)
        batches: Iterator[list[int]] = itertools.chain([first], stream)
        losses: list[float] = []
        done, cuts = 0, 0
        meter = MemoryMeter(sub.base_model, name, handle.device)  # the device's own model
        gc = ins.train.gradient_checkpointing
        with scoped_torch_seed(derive_seed(ins.seed, "dropout")):
            for ratio in stage_ratios(plan.ratio, plan.stages):
                counts = target_counts(layout, ratio, protect)
                if not needs_pruning(keeps, counts):
                    continue
                scorer = _Scorer(sub, name, layout.pruned(keeps))
                n = max(0, min(plan.warmup_steps, steps - done - 1))
                with sub.training(name, gc):
                    run_steps(sub, name, ins, data, batches, n, losses, None,
                              scorer.after_backward, meter=meter)  # fmt: skip
                done += n
                scorer.fill_magnitude()
                new = shrink(keeps, scorer.scores, counts)
                factors = cut_adapter(sub.get_factors(name), layout, keeps, new)
                sub, keeps, cuts = pruned_handle(handle, layout, new), new, cuts + 1
                name = sub.ensure_adapter(ins.lora)
                sub.set_factors(name, factors)
                meter.use(sub.base_model, name)
            with sub.training(name, gc):
                run_steps(sub, name, ins, data, batches, steps - done, losses, meter=meter)
            loss_end = None
            if plan.measure and losses:  # the first batch again, after training
                pad = handle.tokenizer.pad_token_id
                probe = collate([data.examples[i] for i in first], pad, handle.device)
                loss_end = _probe_loss(sub, name, probe)
        loss_start = losses[0] if losses else None  # the first micro-batch is the probe batch
        full_params = base_params(handle.base_model)
        kept_params = base_params(sub.base_model)
        metrics = {
            "train_loss": sum(losses) / len(losses) if losses else float("nan"),
            "steps": float(steps),
            "train_s": time.perf_counter() - t0,
            "prune_setup_s": setup_s,
            "prune_ratio": layout.removed_share(keeps),
            "prune_cuts": float(cuts),
            "prune_params": kept_params / max(full_params, 1),
            **meter.report(),
        }
        if loss_start is not None and loss_end is not None:
            metrics["probe_loss_start"], metrics["probe_loss_end"] = loss_start, loss_end
        return LoraUpdate(
            header=reply_header(ins, handle, data),
            factors=sub.get_factors(name),
            metrics=metrics,
            keep=layout.encode(keeps),
        )
