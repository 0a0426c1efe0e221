"""peft glue: named LoRA adapters on one shared base model, factor I/O, init and saving.

A :class:`ModelHandle` wraps a frozen base model with peft once and keeps one named adapter per
:class:`~fedpeft.wire.types.LoraSpec` (rank, alpha, targets). A client round loads the global
factors into that adapter, trains it and reads the factors back; nothing is copied or reloaded.

Shapes follow peft: ``A`` is ``(r, in_features)``, ``B`` is ``(out_features, r)`` and the layer
computes ``W x + (alpha / r) * B (A x)``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from fedpeft.errors import ModelError
from fedpeft.seeding import torch_generator
from fedpeft.wire.messages import Adapter, LoraFactors, LoraSpec

__all__ = ["ModelHandle", "init_factors", "peft_quiet"]


def init_factors(
    shapes: dict[str, tuple[int, int]], spec: LoraSpec, seed: int
) -> dict[str, LoraFactors]:
    """The starting adapter: peft's default init, drawn from explicit generators.

    ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (what peft's ``kaiming_uniform_(a=sqrt(5))`` gives) and
    ``B = 0``, so the initial adapter changes nothing. Each module draws from a generator seeded
    by ``(seed, "lora-init", module)``, independent of module order.

    Parameters
    ----------
    shapes : dict[str, tuple[int, int]]
        Module name to ``(out_features, in_features)``.
    spec : LoraSpec
        Rank and alpha.
    seed : int
        Run seed.

    Returns
    -------
    dict[str, LoraFactors]
        Float32 factors per module.
    """
    out: dict[str, LoraFactors] = {}
    for name in sorted(shapes):
        d_out, d_in = shapes[name]
        bound = 1.0 / math.sqrt(d_in)
        g = torch_generator(seed, "lora-init", name)
        a = (torch.rand(spec.rank, d_in, generator=g) * 2 - 1) * bound  # (r, in)
        b = torch.zeros(d_out, spec.rank)  # (out, r)
        out[name] = LoraFactors(a=a, b=b, alpha=spec.alpha)
    return out


def adapter_name(spec: LoraSpec) -> str:
    """peft adapter name for a spec: rank plus the structural hash."""
    return f"r{spec.rank}_{spec.config_hash()}"


@contextlib.contextmanager
def peft_quiet() -> Iterator[None]:
    """Wrap a peft model: peft (0.17) asks transformers (5) ``is_gradient_checkpointing``,
    which transformers marks deprecated; that warning is theirs, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
        yield


class ModelHandle:
    """A base model (frozen, loaded once) plus its tokenizer and named LoRA adapters.

    Parameters
    ----------
    model : nn.Module
        A Hugging Face causal LM, already on its device and frozen.
    tokenizer : Any
        Its tokenizer (pad token set).
    fingerprint : str
        :func:`fedpeft.models.fingerprint` of the base weights.
    name : str
        Written to ``adapter_config.json`` as ``base_model_name_or_path``.
    device : torch.device
        Where the model lives.
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any, fingerprint: str, name: str, device: torch.device
    ) -> None:
        self.base_model = model
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.name = name
        self.device = device
        self._peft: Any = None
        self._specs: dict[str, LoraSpec] = {}
        self.zo_active: Any = None  # the zeroth-order runtime whose values the weights hold

    # ------------------------------------------------------------------ adapters
    def ensure_adapter(self, spec: LoraSpec) -> str:
        """Create the adapter for ``spec`` if missing; return its name."""
        from peft import LoraConfig, get_peft_model

        name = adapter_name(spec)
        if name in self._specs:
            return name
        conf = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,  # type: ignore[arg-type]  # peft annotates int, accepts float
            lora_dropout=spec.dropout,
            target_modules=list(spec.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            if self._peft is None:
                with peft_quiet():
                    self._peft = get_peft_model(self.base_model, conf, adapter_name=name)
            else:
                self._peft.add_adapter(name, conf)
        except ValueError as err:
            raise ModelError(
                f"cannot add LoRA to {self.name!r} with "
                f"target_modules={list(spec.target_modules)}: {err}"
            ) from err
        self._specs[name] = spec
        return name

    def peft_model(self, name: str) -> Any:
        """The peft model with adapter ``name`` active (and the only trainable part)."""
        if name not in self._specs:
            raise ModelError(f"no adapter {name!r}; known: {sorted(self._specs)}")
        self._peft.set_adapter(name)
        return self._peft

    def lora_layers(self, name: str) -> Iterator[tuple[str, Any]]:
        """``(module name, peft LoRA layer)`` of every module adapted by ``name``."""
        return self._layers(name)

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The base model computes without any LoRA adapter inside this block."""
        if self._peft is None:
            yield
            return
        with self._peft.disable_adapter():
            yield

    def _layers(self, name: str) -> Iterator[tuple[str, Any]]:
        from peft.tuners.lora import LoraLayer

        self.peft_model(name)
        for module_name, module in self._peft.base_model.model.named_modules():
            if isinstance(module, LoraLayer) and name in module.lora_A:
                yield module_name, module

    def module_shapes(self, name: str) -> dict[str, tuple[int, int]]:
        """``(out_features, in_features)`` of every adapted module."""
        return {
            m: (int(layer.out_features), int(layer.in_features)) for m, layer in self._layers(name)
        }

    def set_factors(self, name: str, adapter: Adapter) -> None:
        """Copy ``adapter`` into the named peft adapter (cast to its dtype and device).

        Raises
        ------
        ModelError
            If the module set or a shape differs from the adapter's.
        """
        layers = dict(self._layers(name))
        if set(layers) != set(adapter):
            missing, extra = sorted(set(layers) - set(adapter)), sorted(set(adapter) - set(layers))
            raise ModelError(
                f"adapter modules do not match the model: missing {missing[:3]}, extra {extra[:3]}"
            )
        with torch.no_grad():
            for module_name, layer in layers.items():
                f = adapter[module_name]
                wa, wb = layer.lora_A[name].weight, layer.lora_B[name].weight
                if wa.shape != f.a.shape or wb.shape != f.b.shape:
                    raise ModelError(
                        f"{module_name}: model has A{tuple(wa.shape)} B{tuple(wb.shape)}, "
                        f"adapter has A{tuple(f.a.shape)} B{tuple(f.b.shape)}"
                    )
                wa.copy_(f.a.to(wa.device, wa.dtype))
                wb.copy_(f.b.to(wb.device, wb.dtype))

    def get_factors(self, name: str) -> dict[str, LoraFactors]:
        """Detached CPU copies of the named adapter's factors."""
        alpha = self._specs[name].alpha
        return {
            m: LoraFactors(
                a=layer.lora_A[name].weight.detach().cpu().clone(),
                b=layer.lora_B[name].weight.detach().cpu().clone(),
                alpha=alpha,
            )
            for m, layer in self._layers(name)
        }

    def trainable_parameters(self, name: str, parts: str = "AB") -> list[nn.Parameter]:
        """The factors of adapter ``name`` that train (``parts``: AB, A or B); the rest frozen."""
        params: list[nn.Parameter] = []
        for _, layer in self._layers(name):
            for part, table in (("A", layer.lora_A), ("B", layer.lora_B)):
                w = table[name].weight
                w.requires_grad_(part in parts)
                if part in parts:
                    params.append(w)
        return params

    @contextlib.contextmanager
    def merged(self, base: Adapter | None) -> Iterator[None]:
        """Inside this block the base weights hold ``W + scale B A`` for every module of ``base``.

        FLoRA merges the global stacked adapter into the frozen base before each round's fresh
        LoRA. The original weights are copied aside and put back bit for bit on exit.
        """
        if not base:
            yield
            return
        from peft.tuners.lora import LoraLayer

        modules = dict(self._peft.base_model.model.named_modules())
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for m in sorted(base):
                    layer = modules.get(m)
                    if not isinstance(layer, LoraLayer):
                        raise ModelError(f"cannot merge into {m!r}: not an adapted linear layer")
                    w = cast(torch.Tensor, layer.get_base_layer().weight)  # (out, in)
                    f = base[m]
                    delta = f.scale * (f.b.double() @ f.a.double())  # (out, R) @ (R, in)
                    if tuple(delta.shape) != tuple(w.shape):
                        raise ModelError(
                            f"{m}: cannot merge {tuple(delta.shape)} into {tuple(w.shape)}"
                        )
                    saved.append((w, w.detach().clone()))
                    w.add_(delta.to(w.device, w.dtype))
            yield
        finally:
            with torch.no_grad():
                for w, original in saved:
                    w.copy_(original)

    @contextlib.contextmanager
    def training(self, name: str, checkpointing: bool = False) -> Iterator[Any]:
        """The peft model in train mode for a block, back in eval mode afterwards.

        ``checkpointing``: transformers' gradient checkpointing (non-reentrant: the LoRA
        factors get gradients without the inputs requiring any) inside the block only, so the
        process's shared model is left as it was."""
        model = self.peft_model(name)
        model.train()
        base: Any = self.base_model  # a transformers PreTrainedModel
        use_cache = getattr(base.config, "use_cache", None)
        if checkpointing:  # transformers >= 5 calls it activation checkpointing
            base.config.use_cache = False  # no key/value cache in training (it would warn)
            base.activation_checkpointing_enable({"use_reentrant": False})
        try:
            yield model
        finally:
            if checkpointing:
                base.activation_checkpointing_disable()
                base.config.use_cache = use_cache
            model.eval()

    def checkpointed_layers(self) -> list[nn.Module]:
        """The layers whose inputs gradient checkpointing keeps (the decoder layers)."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        return [m for m in self.base_model.modules() if isinstance(m, GradientCheckpointingLayer)]

    def save_adapter(self, spec: LoraSpec, adapter: Adapter, path: str | Path) -> Path:
        """Write ``adapter`` in peft's format so ``PeftModel.from_pretrained(base, path)`` loads it.

        Returns
        -------
        Path
            The folder written (``adapter_config.json`` + ``adapter_model.safetensors``).
        """
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        name = self.ensure_adapter(spec)
        self.set_factors(name, adapter)
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(
            self._peft, adapter_name=name, save_embedding_layers=False
        )
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()},
            str(out / "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )
        conf = self._peft.peft_config[name]
        conf.base_model_name_or_path = self.name
        conf.save_pretrained(str(out))
        return out
