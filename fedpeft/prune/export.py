"""A device's deployed model, written so that ``transformers`` and ``peft`` load it alone.

A pruned device keeps different numbers of attention groups and FFN channels in each layer.
``transformers``' LLaMA and GPT-2 configurations have one head count and one FFN width for all
layers, so no stock configuration describes the smaller tensors. The export therefore writes
the device's model at the base model's shapes with what pruning removed set to zero (the
output projection's inputs from removed heads and channels, the removed heads' and
channels' own projections), and its adapter at full shape with zeros where the device's
factors have no row or column. That model computes what the device's pruned model computes
(up to float rounding: tested to 1e-5 in loss), and ``device.json`` says how many parameters
the device itself holds.

    fedpeft export-device RUN_DIR --client 3 --out device3/
    # then, without fedpeft:
    model = AutoModelForCausalLM.from_pretrained("device3/model")
    model = PeftModel.from_pretrained(model, "device3/adapter")
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from fedpeft.cache import PROCESS_CACHE, ProcessCache
from fedpeft.config.load import load_config
from fedpeft.errors import ConfigError
from fedpeft.lora.handle import ModelHandle
from fedpeft.models import get_model
from fedpeft.prune.deployed import DeviceModel, base_params, device_models, plain_copy
from fedpeft.prune.layout import PruneLayout
from fedpeft.prune.structure import Keep
from fedpeft.wire.messages import LoraFactors

__all__ = ["export_device", "padded_adapter", "zero_removed"]


def _removed(layout: PruneLayout, module: str, keeps: list[Keep], size: int) -> torch.Tensor:
    """Boolean mask over ``module``'s pruned side (``size`` features): True where removed."""
    role = layout.role(module)
    assert role is not None
    mask = torch.ones(size, dtype=torch.bool)
    mask[layout.feature_index(role, keeps[role.layer])] = False
    return mask


def zero_removed(model: Any, layout: PruneLayout, keeps: list[Keep]) -> None:
    """Zero, in place and at unchanged shapes, what pruning ``model`` to ``keeps`` removes."""
    full = layout.full()
    gpt2 = layout.arch == "gpt2"  # Conv1D stores (in, out)
    with torch.no_grad():
        for name, mod in model.named_modules():
            role = layout.role(name)
            if role is None or not hasattr(mod, "weight") or keeps[role.layer] == full[role.layer]:
                continue
            w = mod.weight.T if gpt2 else mod.weight  # (out, in) view
            if role.side == "out":
                gone = _removed(layout, name, keeps, w.shape[0])
                w[gone, :] = 0
                if getattr(mod, "bias", None) is not None:
                    mod.bias[gone] = 0
            else:
                w[:, _removed(layout, name, keeps, w.shape[1])] = 0


def padded_adapter(device: DeviceModel) -> dict[str, LoraFactors]:
    """The device's adapter at the base model's shapes: its factors where its structure keeps
    a row (``B``) or column (``A``), zeros elsewhere."""
    full = device.layout.full()
    keeps = device.keeps()
    out = {}
    for m, f in device.adapter.items():
        rows, cols = device.layout.factor_index(m, keeps)
        rows_full, cols_full = device.layout.factor_index(m, full)
        a, b = f.a, f.b
        if rows is not None and rows_full is not None:
            b = torch.zeros(len(rows_full), f.b.shape[1], dtype=f.b.dtype)
            b[list(rows)] = f.b
        if cols is not None and cols_full is not None:
            a = torch.zeros(f.a.shape[0], len(cols_full), dtype=f.a.dtype)
            a[:, list(cols)] = f.a
        out[m] = LoraFactors(a=a, b=b, alpha=f.alpha)
    return out


def export_device(
    run: str | Path, client: str, out: str | Path, cache: ProcessCache = PROCESS_CACHE
) -> Path:
    """Write client ``client``'s deployed model at the end of run folder ``run`` to ``out``
    (``model/``, ``adapter/``, ``device.json``); returns ``out``.

    Raises
    ------
    ConfigError
        If the run kept no device models (not a pruning strategy), or none for ``client``.
    """
    from fedpeft.server.app import run_strategy
    from fedpeft.server.checkpoint import CHECKPOINT, load_checkpoint

    run, out = Path(run), Path(out)
    cfg = load_config(run / "config.toml")
    handle = get_model(cfg.model, cache)
    strategy, _, _ = run_strategy(cfg, handle, cache)
    strategy.load_state_dict(load_checkpoint(run / CHECKPOINT)["strategy"])
    models = device_models(strategy)
    if client not in models:
        have = sorted(models) or "none: its strategy keeps no device models"
        raise ConfigError(
            f"client {client!r} has no device model in {str(run)!r}; devices that have one: {have}"
        )
    device = models[client]
    model = copy.deepcopy(plain_copy(handle))  # its own tensors, not the shared base's
    zero_removed(model, device.layout, device.keeps())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out / "model"))
    handle.tokenizer.save_pretrained(str(out / "model"))
    own = ModelHandle(model, handle.tokenizer, handle.fingerprint, handle.name, handle.device)
    own.save_adapter(device.spec, padded_adapter(device), out / "adapter")
    from fedpeft.prune.deployed import pruned_handle

    kept = base_params(pruned_handle(handle, device.layout, device.keeps()).base_model)
    info = {
        "client": client,
        "rank": device.spec.rank,
        "removed_share": device.layout.removed_share(device.keeps()),
        "params_deployed": kept,
        "params_base": base_params(handle.base_model),
        "written_at_base_shapes": True,
    }
    (out / "device.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out
