"""Server optimizers over a linear LoRA strategy (``[server_opt]``): FedAvgM, FedAdam, FedYogi,
FedAdagrad.

Adaptive federated optimization (Reddi et al., ICLR 2021, "Adaptive Federated Optimization",
Algorithm 2) treats the round's mean client change as a pseudo-gradient and steps the global
model with a server optimizer. Per round ``t``, with ``x`` the factors every client was sent,
``d_k`` client ``k``'s change to what it trained and ``p_k`` its weight (``num_examples``
shares, or ``1 / m``, as the wrapped strategy weights)::

    D_t = sum_k p_k d_k                                   # (d,) the mean change
    avgm:    m_t = beta m_{t-1} + D_t;                step = eta m_t       (Hsu et al. 2019)
    adagrad: m_t = b1 m_{t-1} + (1 - b1) D_t;  v_t = v_{t-1} + D_t^2
    adam:    m_t as adagrad;                   v_t = b2 v_{t-1} + (1 - b2) D_t^2
    yogi:    m_t as adagrad;                   v_t = v_{t-1} - (1 - b2) D_t^2 sign(v_{t-1} - D_t^2)
    adaptive: step = eta m_t / (sqrt(v_t) + tau),     m_{-1} = 0, v_{-1} = tau^2

and the wrapped strategy aggregates ONE update, ``x + step``, carrying the round's examples:
a linear strategy returns exactly that (its mean of one update), so the optimizer composes
with any strategy whose capability says ``linear`` without knowing its state. As in the
paper, there is no bias correction.

Where it deviates: the moments are kept per coordinate of the flat factors and only the
coordinates the clients trained this round (the plan's ``parts``) are stepped or have their
moments updated. FFA-LoRA (``B`` only) thus never moves its frozen ``A``, and RoLoRA's
alternating rounds move only the factor that round trained.

How it interacts with the strategies: FedIT (``fedavg``) averages ``A`` and ``B`` on their own,
so the pseudo-gradient lives in factor space and the optimizer steps ``A`` and ``B``
separately; the product ``B A`` then carries the same cross terms as FedAvg's does. With
FFA-LoRA ``A`` is fixed, the layer change ``(alpha / r) B A`` is linear in ``B``, and the
optimizer is an exact server optimizer on the layer update itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from fedpeft.algorithms.base import AggregateResult, Strategy, weights_of
from fedpeft.changes import (
    clients_behind,
    combined_update,
    flat_change,
    sent_factors,
    shared_sent,
    trained_mask,
)
from fedpeft.config import ServerOptConfig
from fedpeft.errors import AggregationError
from fedpeft.wire.messages import Adapter, ClientInfo, LoraUpdate

__all__ = ["ServerOptimizer", "server_step"]


def server_step(
    cfg: ServerOptConfig,
    delta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """One optimizer step on the mean change ``delta`` (flat float64); updates ``m`` and ``v``
    in place on the ``mask`` coordinates and returns the step (zero elsewhere)."""
    d = delta[mask]
    if cfg.name == "avgm":
        m[mask] = cfg.momentum * m[mask] + d
        step = cfg.step_size * m[mask]
    else:
        m[mask] = cfg.beta1 * m[mask] + (1 - cfg.beta1) * d
        d2, vm = d * d, v[mask]
        if cfg.name == "adagrad":
            v[mask] = vm + d2
        elif cfg.name == "adam":
            v[mask] = cfg.beta2 * vm + (1 - cfg.beta2) * d2
        elif cfg.name == "yogi":
            v[mask] = vm - (1 - cfg.beta2) * d2 * torch.sign(vm - d2)
        else:
            raise AggregationError(f"unknown server optimizer {cfg.name!r}")
        step = cfg.step_size * m[mask] / (v[mask].sqrt() + cfg.tau)
    out = torch.zeros_like(delta)
    out[mask] = step
    return out


class ServerOptimizer:
    """A linear LoRA strategy whose mean step is replaced by a server optimizer's.

    Parameters
    ----------
    inner : Strategy
        A linear LoRA strategy (capability ``linear``): it aggregates the one combined update.
    config : ServerOptConfig
        The ``[server_opt]`` section.
    example_weighted : bool
        The inner strategy's capability: weight clients by ``num_examples`` (else ``1 / m``).
    """

    def __init__(self, inner: Strategy, config: ServerOptConfig, example_weighted: bool) -> None:
        self.inner = inner
        self.config = config
        self.example_weighted = example_weighted
        # (m, v): (d,) float64 each; m the first moment (avgm: momentum), v the second
        self.moments: tuple[torch.Tensor, torch.Tensor] | None = None
        self._sent: dict[str, tuple[Adapter, str]] = {}

    def configure_train(self, server_round: int, clients: Sequence[ClientInfo]) -> Any:
        """The inner plans; remembers what each client was sent."""
        plans = self.inner.configure_train(server_round, clients)
        self._sent = sent_factors(plans)
        return plans

    def aggregate_train(self, server_round: int, updates: Sequence[LoraUpdate]) -> AggregateResult:
        """Step the sent factors by the optimizer; the inner strategy aggregates that one update."""
        ordered = sorted(updates, key=lambda u: u.header.client_id)
        if not ordered:
            raise AggregationError(f"server_opt.name = {self.config.name!r} got no updates")
        cids = [u.header.client_id for u in ordered]
        unknown = [c for c in cids if c not in self._sent]
        if unknown:
            raise AggregationError(f"updates from clients {unknown} that were not planned")
        sent = shared_sent(
            {c: a for c, (a, _) in self._sent.items()},
            cids,
            f"server_opt.name = {self.config.name!r} steps from the factors every client was "
            "sent; this strategy sends different ones (use fedavg, ffa or rolora)",
        )
        mask = trained_mask(sent, self._sent[cids[0]][1])  # (d,)
        weights = (
            weights_of(ordered) if self.example_weighted else [1 / len(ordered)] * len(ordered)
        )
        delta = torch.zeros(mask.shape, dtype=torch.float64)  # (d,)
        for w, u in zip(weights, ordered, strict=True):
            try:
                delta += w * flat_change(u.factors, sent)
            except (KeyError, RuntimeError) as err:
                raise AggregationError(
                    f"client {u.header.client_id} sent other modules or shapes than it was "
                    f"sent ({err}); server_opt needs the sent structure back"
                ) from err
        if self.moments is None:
            self.moments = (torch.zeros_like(delta), torch.full_like(delta, self.config.tau**2))
        m, v = self.moments
        if m.shape != delta.shape:
            raise AggregationError(
                f"the global adapter changed size ({m.numel()} -> {delta.numel()} values); "
                "server_opt needs one fixed structure (a one-rank strategy)"
            )
        step = server_step(self.config, delta, m, v, mask)
        examples = sum(u.header.num_examples for u in ordered)
        one = combined_update(ordered[0], sent, step, examples, clients_behind(ordered))
        result = self.inner.aggregate_train(server_round, [one])
        metrics = {
            "server_opt_pseudo_grad_norm": float(delta.norm()),
            "server_opt_step_norm": float(step.norm()),
        }
        return replace(result, metrics={**result.metrics, **metrics})

    def state_dict(self) -> dict[str, Any]:
        """The inner strategy's state and the optimizer's moments."""
        moments = (
            {}
            if self.moments is None
            else {"m": self.moments[0].clone(), "v": self.moments[1].clone()}
        )
        return {"inner": self.inner.state_dict(), "moments": moments, "name": self.config.name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises
        ------
        AggregationError
            If the state is of another optimizer.
        """
        if state.get("name") != self.config.name:
            raise AggregationError(
                f"the checkpoint's server optimizer is {state.get('name')!r}, this run's "
                f"server_opt.name is {self.config.name!r}: resume with the run's own config"
            )
        self.inner.load_state_dict(state["inner"])
        saved = state["moments"]
        self.moments = (
            (
                torch.as_tensor(saved["m"]).double().clone(),
                torch.as_tensor(saved["v"]).double().clone(),
            )
            if saved
            else None
        )
