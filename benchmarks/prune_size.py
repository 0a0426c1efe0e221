"""Parameters, forward time and memory of a structurally pruned model at several ratios.

Prunes SmolLM2-135M (or the tiny model) with :mod:`fedpeft.prune.structure` at each ratio
(share of KV groups and FFN channels removed per layer, first and last layers whole; which
groups go does not change the size, so weight magnitude picks them) and measures, side by
side in one run: parameters, weight memory, forward time at batch 8 x 64 tokens (median of 5)
and peak RSS growth of one forward+backward through a LoRA-free copy. Writes
``benchmarks/results/prune_size.json``.

    .venv/bin/python benchmarks/prune_size.py [--model smollm2-135m] [--ratios 0 0.25 0.5 0.75]
        [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from _bench import add_quick, results_path

from fedpeft.client.memory import MIB, MemoryMeter
from fedpeft.config import ModelConfig
from fedpeft.models import load_model
from fedpeft.prune.importance import GroupScores, choose_keep, reduce_groups
from fedpeft.prune.structure import layer_shapes, prune_layers


def magnitude_scores(model: torch.nn.Module) -> GroupScores:
    """Group scores from |W| (o_proj columns per KV group, down_proj columns per channel)."""
    scores = GroupScores(beta=0.0)
    for i, (layer, shape) in enumerate(zip(model.model.layers, layer_shapes(model), strict=True)):
        o = layer.self_attn.o_proj.weight.detach().abs()
        down = layer.mlp.down_proj.weight.detach().abs()
        scores.add(i, reduce_groups(o, 1, shape.attn_groups), down.sum(dim=0))
    return scores


def forward_s(model: torch.nn.Module, ids: torch.Tensor, repeats: int = 5) -> float:
    """Median seconds of one forward pass."""
    times = []
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def activation_mib(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """MiB of tensors autograd saves for the backward pass of one LoRA training step.

    Counted exactly by :class:`fedpeft.client.memory.MemoryMeter` (``saved_tensors_hooks``,
    each storage once, the model's own weights left out): the activation memory that
    training adds on top of the weights.
    """
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    meter = MemoryMeter(peft_model, "default", torch.device("cpu"))
    with meter.forward():
        loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    return meter.activations / MIB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.0, 0.25, 0.5, 0.75])
    add_quick(ap)
    args = ap.parse_args()
    if args.quick:
        args.model, args.ratios = "tiny", [0.0, 0.5]
    torch.set_num_threads(2)
    # the tiny model needs more than 2 layers: the first and last stay whole
    layers = {"tiny_layers": 4} if args.model == "tiny" else {}
    base = load_model(ModelConfig(name=args.model, **layers)).base_model
    scores = magnitude_scores(base)
    vocab = int(base.config.vocab_size)
    ids = torch.randint(0, vocab, (8, 64), generator=torch.Generator().manual_seed(0))
    rows = []
    for ratio in args.ratios:
        model = copy.deepcopy(base)
        prune_layers(model, choose_keep(scores, layer_shapes(model), ratio))
        params = sum(p.numel() for p in model.parameters())
        mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        fwd = forward_s(model, ids)
        rows.append({"ratio": ratio, "params": params, "weights_mib": mb, "forward_s": fwd,
                     "activations_mib": activation_mib(model, ids)})  # fmt: skip
        del model
    ref = rows[0]
    print(f"\n{args.model}: structured pruning (first/last layers whole), batch 8 x 64, CPU")
    head = f"{'ratio':>6}{'params':>14}{'vs 0':>7}{'weights MiB':>13}{'forward s':>11}{'vs 0':>7}"
    print(head + f"{'activ. MiB':>11}{'vs 0':>7}")
    for r in rows:
        print(
            f"{r['ratio']:>6.2f}{r['params']:>14,}{r['params'] / ref['params']:>7.2f}"
            f"{r['weights_mib']:>13.1f}{r['forward_s']:>11.3f}"
            f"{r['forward_s'] / ref['forward_s']:>7.2f}"
            f"{r['activations_mib']:>11.0f}{r['activations_mib'] / ref['activations_mib']:>7.2f}"
        )
    blob = {"model": args.model, "rows": rows}
    results_path("prune_size.json").write_text(json.dumps(blob, indent=2))


if __name__ == "__main__":
    main()
