"""A client round's peak training memory, measured.

On CUDA the peak is the allocator's own count: ``torch.cuda.max_memory_allocated`` since the
round began (its statistics are reset when the meter starts). On CPU no allocator keeps such a
count, so the meter adds up what training actually holds at its peak, each part measured on
the tensors themselves, not estimated from a formula:

- **weights**: every parameter and buffer of the model that trains (a pruned device's own
  smaller model, with its LoRA factors; a quantized base's packed blocks and their constants),
  each storage once, plus what a trainer holds beside the model (:meth:`MemoryMeter.hold`: a
  seed/scalar runtime's snapshot of the tuned tensors);
- **activations**: the tensors autograd saved for backward during a micro-batch's forward
  (seen through ``torch.autograd.graph.saved_tensors_hooks``; storages counted once, the
  weights' own left out), largest micro-batch of the round; with gradient checkpointing, what
  the checkpointed layers keep instead (their inputs, seen by forward pre-hooks) plus what is
  saved outside them;
- **gradients**: the trainable parameters' ``.grad`` after backward, largest of the round;
- **optimizer state**: the optimizer's state tensors after a step (AdamW: two moments per
  trainable parameter), largest of the round.

``peak = weights + activations + gradients + optimizer state``: the four coexist at the end
of the largest micro-batch's forward of a step after the first. What the sum leaves out is
transient (a layer's temporary buffers between saves, the allocator's slack); what it counts
is what scales with the arm a device plays (structure, rank, batch and sequence length), which
is what a memory budget decides. All in MiB.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from fedpeft.quantization import quantized_extra_tensors

__all__ = ["MIB", "MemoryMeter", "storage_bytes"]

MIB = float(2**20)


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(data pointer, bytes) of the storage behind ``t`` (a view shares its base's)."""
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    return sum(dict(_storage(t) for t in tensors).values())


class MemoryMeter:
    """Measures one round's peak training memory of ``model`` (see the module docstring).

    Parameters
    ----------
    model : torch.nn.Module
        The model that trains this round (the caller swaps it with :meth:`use` when a pruned
        device's structure changes).
    adapter : str
        The name of the LoRA adapter that trains.
    device : torch.device
        Where it trains: ``cuda`` reads the allocator's peak, anything else adds up tensors.
    """

    def __init__(self, model: torch.nn.Module, adapter: str, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.weights = 0
        self.activations = 0
        self.gradients = 0
        self.optimizer = 0
        self._weight_ptrs: set[int] = set()
        # with gradient checkpointing: the layers whose inputs are kept for the recompute
        # (autograd's hooks do not see them: checkpointing saves through its own hooks)
        self.checkpointed: list[torch.nn.Module] = []
        self.use(model, adapter)
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

    def use(self, model: torch.nn.Module, adapter: str) -> None:
        """Measure ``model`` with LoRA adapter ``adapter`` from now on (its weights count if
        they are the larger). Other adapters a shared simulation model holds for other
        clients are not this device's and are left out."""
        tensors: list[torch.Tensor] = [
            p
            for n, p in model.named_parameters()
            if "lora_" not in n or f".{adapter}." in n or n.endswith(f".{adapter}")
        ]
        tensors += list(model.buffers())
        tensors += quantized_extra_tensors(model)
        self._weight_ptrs = {_storage(t)[0] for t in tensors}
        self.weights = max(self.weights, storage_bytes(tensors))

    def hold(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors the trainer keeps besides the model (a seed/scalar runtime's snapshot
        of the tuned weights, say) as part of the weights."""
        extra = [t for t in tensors if _storage(t)[0] not in self._weight_ptrs]
        self.weights += storage_bytes(extra)
        self._weight_ptrs |= {_storage(t)[0] for t in extra}

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Count the tensors autograd saves for backward inside this block (one micro-batch)."""
        if self.cuda:
            yield
            return
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr, nbytes = _storage(t)
            if ptr not in self._weight_ptrs and ptr != 0:
                seen[ptr] = nbytes
            return t

        def keep_inputs(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
            for t in [*args, *kwargs.values()]:
                if isinstance(t, torch.Tensor):
                    pack(t)

        hooks = [
            m.register_forward_pre_hook(keep_inputs, with_kwargs=True) for m in self.checkpointed
        ]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                yield
        finally:
            for h in hooks:
                h.remove()
        self.activations = max(self.activations, sum(seen.values()))

    def after_backward(self, params: Iterable[torch.Tensor]) -> None:
        """Count the gradients of ``params`` (call after the step's last backward)."""
        if not self.cuda:
            grads = [p.grad for p in params if p.grad is not None]
            self.gradients = max(self.gradients, storage_bytes(grads))

    def after_step(self, opt: torch.optim.Optimizer) -> None:
        """Count ``opt``'s state tensors (call after a step)."""
        if not self.cuda:
            state: list[Any] = [v for s in opt.state.values() for v in s.values()]
            tensors = [v for v in state if isinstance(v, torch.Tensor)]
            self.optimizer = max(self.optimizer, storage_bytes(tensors))

    def report(self) -> dict[str, float]:
        """``peak_mem_mb`` (and, on CPU, its four parts) in MiB."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return {"peak_mem_mb": torch.cuda.max_memory_allocated(self.device) / MIB}
        parts = {
            "mem_weights_mb": self.weights / MIB,
            "mem_activations_mb": self.activations / MIB,
            "mem_gradients_mb": self.gradients / MIB,
            "mem_optimizer_mb": self.optimizer / MIB,
        }
        return {"peak_mem_mb": sum(parts.values()), **parts}
