"""Structured pruning groups of LLaMA-family and GPT-2 models, and physical pruning.

A **group** is a set of weights that must go together for the model to stay well formed:

- attention, LLaMA family: one key/value head with the ``n_heads / n_kv_heads`` query heads
  that share it (grouped-query attention), i.e. rows of ``q_proj``, ``k_proj``, ``v_proj`` and
  the matching columns of ``o_proj``. Removing whole KV groups keeps every layer's
  query-per-KV ratio, which ``repeat_kv`` relies on;
- attention, GPT-2: one head, i.e. its query, key and value columns of ``c_attn`` and rows of
  ``c_proj`` (GPT-2's ``Conv1D`` stores weights as ``(in, out)``);
- FFN: one intermediate channel, i.e. rows of ``gate_proj`` and ``up_proj`` and the column of
  ``down_proj`` (LLaMA), or the column of ``c_fc`` and row of ``c_proj`` (GPT-2).

:func:`prune_layers` slices the weights in place: the model gets physically smaller (fewer
parameters, faster forward, less memory). At least one attention group and one FFN channel
stay in every layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedpeft.errors import ModelError

__all__ = [
    "Keep",
    "LayerShape",
    "arch_of",
    "attn_sizes",
    "decoder_layers",
    "ffn_width",
    "layer_shapes",
    "prune_layers",
]


@dataclass(frozen=True)
class LayerShape:
    """The prunable sizes of one decoder layer."""

    attn_groups: int  # KV groups (LLaMA) or heads (GPT-2)
    ffn_channels: int


@dataclass(frozen=True)
class Keep:
    """What one layer keeps: indices of attention groups and FFN channels (sorted)."""

    attn: tuple[int, ...]
    ffn: tuple[int, ...]


def arch_of(model: Any) -> str:
    kind = getattr(getattr(model, "config", None), "model_type", "")
    if kind == "gpt2":
        return "gpt2"
    if hasattr(decoder_layers(model, "llama")[0], "mlp") and hasattr(
        decoder_layers(model, "llama")[0].mlp, "gate_proj"
    ):
        return "llama"
    raise ModelError(f"structured pruning supports LLaMA-family and GPT-2 models, not {kind!r}")


def decoder_layers(model: Any, arch: str) -> list[Any]:
    inner = (
        getattr(model, "model", None) if arch == "llama" else getattr(model, "transformer", None)
    )
    blocks = getattr(inner, "layers", None) if arch == "llama" else getattr(inner, "h", None)
    if blocks is None:
        raise ModelError(f"cannot find the decoder layers of a {type(model).__name__}")
    return list(blocks)


def attn_sizes(model: Any, layer: Any, arch: str) -> tuple[int, int, int]:
    """(groups, q heads per group, head_dim) of one layer's attention."""
    attn = layer.self_attn if arch == "llama" else layer.attn
    hd = int(attn.head_dim)
    if arch == "gpt2":
        return int(attn.c_proj.weight.shape[0]) // hd, 1, hd
    n_kv = int(attn.k_proj.weight.shape[0]) // hd
    return n_kv, int(attn.q_proj.weight.shape[0]) // hd // n_kv, hd


def ffn_width(layer: Any, arch: str) -> int:
    """FFN channels of one decoder layer."""
    mlp = layer.mlp
    return int(mlp.gate_proj.weight.shape[0] if arch == "llama" else mlp.c_fc.weight.shape[1])


def layer_shapes(model: Any) -> list[LayerShape]:
    """The prunable sizes of every layer, in order."""
    arch = arch_of(model)
    return [
        LayerShape(
            attn_groups=attn_sizes(model, layer, arch)[0], ffn_channels=ffn_width(layer, arch)
        )
        for layer in decoder_layers(model, arch)
    ]


def _rows(weight: torch.Tensor, idx: torch.Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(weight.detach().index_select(dim, idx).clone(), requires_grad=False)


def _slice_linear(lin: Any, idx: torch.Tensor, dim: int) -> None:
    """Keep ``idx`` along ``dim`` of an ``nn.Linear`` (0: out, 1: in) or a GPT-2 ``Conv1D``."""
    w = lin.weight
    lin.weight = _rows(w, idx.to(w.device), dim)
    bias = getattr(lin, "bias", None)
    out_dim = 0 if isinstance(lin, nn.Linear) else 1
    if bias is not None and dim == out_dim:
        lin.bias = _rows(bias, idx.to(bias.device), 0)
    if isinstance(lin, nn.Linear):
        lin.out_features, lin.in_features = int(lin.weight.shape[0]), int(lin.weight.shape[1])
    else:  # Conv1D: weight (in, out), nf = out
        lin.nf = int(lin.weight.shape[1])


def _head_rows(groups: Sequence[int], per_group: int, hd: int) -> torch.Tensor:
    heads = [g * per_group + j for g in groups for j in range(per_group)]
    return torch.tensor([h * hd + d for h in heads for d in range(hd)], dtype=torch.long)


def _check_keep(keep: Keep, shape: LayerShape, i: int) -> None:
    for name, idx, n in (
        ("attn", keep.attn, shape.attn_groups),
        ("ffn", keep.ffn, shape.ffn_channels),
    ):
        if not idx or list(idx) != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= n:
            raise ModelError(
                f"layer {i}: keep.{name} must be sorted distinct indices in 0..{n - 1}, "
                f"at least one; got {list(idx)[:8]}"
            )


def prune_layers(model: Any, keep: Mapping[int, Keep]) -> Any:
    """Physically remove what ``keep`` leaves out, layer by layer (in place; returns ``model``).

    Raises
    ------
    ModelError
        For an unsupported model, a layer index out of range or invalid indices.
    """
    arch = arch_of(model)
    layers = decoder_layers(model, arch)
    shapes = layer_shapes(model)
    for i, k in sorted(keep.items()):
        if not 0 <= i < len(layers):
            raise ModelError(f"layer {i} does not exist (the model has {len(layers)})")
        _check_keep(k, shapes[i], i)
        layer = layers[i]
        groups, per, hd = attn_sizes(model, layer, arch)
        q_idx = _head_rows(k.attn, per, hd)
        ffn = torch.tensor(k.ffn, dtype=torch.long)
        with torch.no_grad():
            if arch == "llama":
                a = layer.self_attn
                kv_idx = _head_rows(k.attn, 1, hd)
                _slice_linear(a.q_proj, q_idx, 0)
                _slice_linear(a.k_proj, kv_idx, 0)
                _slice_linear(a.v_proj, kv_idx, 0)
                _slice_linear(a.o_proj, q_idx, 1)
                _slice_linear(layer.mlp.gate_proj, ffn, 0)
                _slice_linear(layer.mlp.up_proj, ffn, 0)
                _slice_linear(layer.mlp.down_proj, ffn, 1)
            else:
                a = layer.attn
                embed = int(a.c_proj.weight.shape[1])
                qkv = torch.cat([q_idx + j * embed for j in range(3)])
                _slice_linear(a.c_attn, qkv, 1)
                _slice_linear(a.c_proj, q_idx, 0)
                a.num_heads, a.split_size = len(k.attn), len(k.attn) * hd
                _slice_linear(layer.mlp.c_fc, ffn, 1)
                _slice_linear(layer.mlp.c_proj, ffn, 0)
    return model
