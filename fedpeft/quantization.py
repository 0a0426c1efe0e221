"""Quantized base models (QLoRA-style) through ``bitsandbytes``.

``quantize(model, kind, compute_dtype, double_quant)`` replaces every ``nn.Linear`` of a loaded
causal LM (all but the output head, which transformers' own bitsandbytes loader leaves in full
precision too) by a ``bitsandbytes`` layer holding the same weights quantized:

- ``nf4`` / ``fp4``: 4-bit NormalFloat or FloatingPoint blocks of 64 with one absmax per block
  (Dettmers et al. 2023, QLoRA), ``bnb.nn.Linear4bit``; ``double_quant`` quantizes the absmax
  constants too (about 0.37 bits per parameter saved). Matrix products run in ``compute_dtype``.
- ``int8``: LLM.int8() rows with outlier columns kept in 16 bits (Dettmers et al. 2022),
  ``bnb.nn.Linear8bitLt``.

Why in code and not through ``from_pretrained(quantization_config=...)``: transformers refuses
to combine a quantization config with a GGUF file (the demo model ships as GGUF) and the tiny
test model is built in code. The layers, their quantization kernels and peft's LoRA wrappers
for them (``peft.tuners.lora.bnb``) are bitsandbytes' and peft's own; this module only swaps
the modules and sets the flags (``is_loaded_in_4bit`` / ``is_loaded_in_8bit``) by which peft
picks its k-bit LoRA layers and ``prepare_model_for_kbit_training`` recognises the model.

bitsandbytes 0.50 runs both kinds on CPU (slowly) and on CUDA; the quantization happens where
the layer is moved, so the model must already be on its device.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from fedpeft.config.sections import QUANTIZATIONS, quantization_label
from fedpeft.errors import ModelError

__all__ = ["QUANTIZATIONS", "quantization_label", "quantize", "quantized_extra_tensors"]

_KEEP = ("lm_head",)  # left in full precision (transformers' bitsandbytes loader does the same)


def _bnb() -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ModelError(
            "model.quantization needs bitsandbytes: run `pip install 'fedpeft[quant]'` "
            f"(bitsandbytes>=0.49), or set model.quantization = 'none' ({err})"
        ) from err
    return bnb


def _replacement(bnb: Any, old: nn.Linear, kind: str, compute_dtype: torch.dtype, dq: bool) -> Any:
    has_bias = old.bias is not None
    weight = old.weight.data.detach().clone()
    new: Any
    if kind == "int8":
        new = bnb.nn.Linear8bitLt(
            old.in_features, old.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0
        )
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(
            old.in_features,
            old.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=dq,
            quant_type=kind,
        )
        new.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=dq, quant_type=kind, module=new
        )
        # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit layer for a fused inference
        # kernel at its first no-grad forward (rounding the block constants to bfloat16, so the
        # model changes after its first evaluation) and then uses that kernel, which has no
        # backward, for training too. Keep the canonical layout: dequantize-and-matmul, which
        # has a backward, in every mode.
        new.support_avx512bf16_for_cpu = False
    if has_bias:
        new.bias = nn.Parameter(old.bias.data.detach().clone(), requires_grad=False)
    return new.to(old.weight.device)  # moving the layer quantizes its weight


def quantize(
    model: nn.Module, kind: str, compute_dtype: torch.dtype, double_quant: bool = False
) -> nn.Module:
    """Quantize ``model``'s linear layers in place (see the module docstring); returns it.

    Raises
    ------
    ModelError
        If ``kind`` is unknown, bitsandbytes is missing, or the model has nothing to quantize.
    """
    if kind not in QUANTIZATIONS:
        raise ModelError(f"quantization must be one of {QUANTIZATIONS}, got {kind!r}")
    if kind == "none":
        return model
    bnb = _bnb()
    if kind == "int8":
        # LLM.int8() multiplies in float16 and bitsandbytes logs so at every float32 forward;
        # docs/edge.md says it once.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name not in _KEEP:
                setattr(parent, name, _replacement(bnb, child, kind, compute_dtype, double_quant))
                swapped += 1
    if swapped == 0:
        raise ModelError(f"quantization={kind!r}: the model has no nn.Linear layer to quantize")
    flag = "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit"
    setattr(model, flag, True)
    model.requires_grad_(False)
    return model


def quantized_extra_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Tensors a quantized model holds outside its parameters and buffers (4-bit blocks'
    absmax and nested statistics, int8 rows' scales), for memory accounting."""
    out: list[torch.Tensor] = []
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            out += [t for t in (state.absmax, state.code) if isinstance(t, torch.Tensor)]
            nested = getattr(state, "state2", None)
            if nested is not None:
                out += [t for t in (nested.absmax, nested.code) if isinstance(t, torch.Tensor)]
        scales = getattr(p, "SCB", None)
        if isinstance(scales, torch.Tensor):
            out.append(scales)
    return out
