"""Each device's deployed model, and its evaluation: the deployment view of a pruning run.

FedSpine prunes so that a weak device can run a smaller model. What that device deploys is
its own model: the base model pruned to the device's current structure, with the device's
rank slice of the global adapter cut to that structure (:class:`DeviceModel`). A strategy
that keeps such models per device exposes ``device_models()``; the coordinator evaluates
each on the held-out records at every loss evaluation (:func:`device_evaluator`), next to
the global model on the whole base model.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedpeft.cache import PROCESS_CACHE, ProcessCache
from fedpeft.config import RunConfig
from fedpeft.evaluation import EvalSet, Evaluator
from fedpeft.lora.handle import ModelHandle
from fedpeft.prune.layout import PruneLayout
from fedpeft.prune.structure import Keep, prune_layers
from fedpeft.wire.messages import Adapter, LoraSpec

__all__ = [
    "DeviceEval",
    "DeviceModel",
    "base_params",
    "device_evaluator",
    "device_models",
    "plain_copy",
    "pruned_handle",
]


@dataclass(frozen=True)
class DeviceModel:
    """A device's deployed model.

    Attributes
    ----------
    spec : LoraSpec
        Its adapter's spec (the device's rank).
    adapter : Adapter
        Its slice of the global adapter, cut to its structure.
    layout : PruneLayout
        The base model's prunable structure.
    keep : bytes
        Its structure (``layout.encode``); empty: the whole model.
    """

    spec: LoraSpec
    adapter: Adapter
    layout: PruneLayout
    keep: bytes

    def keeps(self) -> list[Keep]:
        """The kept groups per layer."""
        return self.layout.decode(self.keep) if self.keep else self.layout.full()


# per device: {"loss": eval loss, "params": base parameters kept, "forward_s": seconds of
# forward (with the adapter) per held-out example on the coordinator's machine, and with
# ``with_metric`` "metric": the task metric of its generations}
DeviceEval = Callable[[Mapping[str, DeviceModel], bool], dict[str, dict[str, float]]]


def base_params(model: Any) -> int:
    """Parameters of a model without its LoRA factors."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def plain_copy(handle: ModelHandle) -> Any:
    """A copy of the base model without LoRA layers whose tensors are the base's own (shared)."""
    from peft.tuners.lora import LoraLayer

    base = handle.base_model
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    model = copy.deepcopy(base, memo)
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):  # set on the shared model by peft's injection
        del model.peft_config
    return model


def pruned_handle(handle: ModelHandle, layout: PruneLayout, keeps: Sequence[Keep]) -> ModelHandle:
    """A handle on ``handle``'s base model pruned to ``keeps``."""
    full = layout.full()
    model = plain_copy(handle)
    prune_layers(model, {i: k for i, k in enumerate(keeps) if k != full[i]})
    return ModelHandle(model, handle.tokenizer, handle.fingerprint, handle.name, handle.device)


def device_models(strategy: Any) -> Mapping[str, DeviceModel]:
    """The device models of ``strategy``, or of the strategy a wrapper (DP, robust rules, a
    server optimizer) holds as ``inner``; empty when it keeps none."""
    s = strategy
    while s is not None:
        found = getattr(s, "device_models", None)
        if callable(found):
            models: Mapping[str, DeviceModel] = found()
            return models
        s = getattr(s, "inner", None)
    return {}


def device_evaluator(
    cfg: RunConfig, handle: ModelHandle, evalset: EvalSet, cache: ProcessCache = PROCESS_CACHE
) -> DeviceEval:
    """Evaluate device models on ``evalset`` with ``handle``'s base model pruned to each
    device's structure (the unpruned tensors shared, not copied), timing their forward.
    Devices with the same structure and rank hold the same model (the global adapter's
    slice): it is evaluated once."""

    def evaluate(
        models: Mapping[str, DeviceModel], with_metric: bool = False
    ) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        seen: dict[tuple[bytes, int], str] = {}  # devices with one structure and rank: one model
        metric = f"eval_{cfg.data.metric}"
        for cid, m in sorted(models.items()):
            twin = seen.setdefault((m.keep, m.spec.rank), cid)
            if twin != cid:
                out[cid] = dict(out[twin])
                continue
            sub = pruned_handle(handle, m.layout, m.keeps())
            evaluator = Evaluator(cfg, sub, evalset, cache)
            t0 = time.perf_counter()
            got = evaluator(m.spec, m.adapter, False)
            forward_s = (time.perf_counter() - t0) / max(len(evalset.examples), 1)
            params = float(base_params(sub.base_model))
            out[cid] = {"loss": got["eval_loss"], "params": params, "forward_s": forward_s}
            if with_metric and cfg.data.metric != "none":  # generation, not timed
                out[cid]["metric"] = evaluator(m.spec, m.adapter, True)[metric]
        return out

    return evaluate
