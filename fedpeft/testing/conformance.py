"""Conformance checks a strategy must pass, as one public call for plug-in authors.

:func:`check_strategy` builds the strategy (a registered name, ``path/to/file.py:Class`` or
``package.module:Class``) on synthetic updates and runs every check below, like
scikit-learn's estimator checks; it raises :class:`ConformanceError` listing each check that
failed and why, and returns the names of those it ran. The checks test the interface's
promises and what the strategy's :class:`~fedpeft.algorithms.capabilities.Capabilities` say,
not one algorithm's maths:

- ``plans``: every plan is for a sampled client and covers the global's modules;
- ``structure``: the aggregate keeps modules and layer shapes, finite values;
- ``identical``: identical updates give that update's layer change back (seed/scalar: twice
  the same upload gives the coefficients of one);
- ``depends``: the result changes when the clients' updates change (a strategy that ignores
  updates fails);
- ``linear``: a strategy declared linear returns the sent factors plus the weighted mean of
  the clients' changes, exactly (weights: ``num_examples``, or equal if not
  ``example_weighted``);
- ``weights``: an example-weighted strategy moves toward a client given most of the weight;
  one that is not ignores ``num_examples``;
- ``order``: the result does not depend on the order of the replies;
- ``no_mutation``: the updates passed in are not changed;
- ``state``: ``state_dict`` through a checkpoint file, loaded into a fresh strategy, gives
  the same plans and aggregates afterwards;
- ``refusals``: no updates, other modules (and other ranks, for a one-rank strategy) raise
  :class:`~fedpeft.errors.AggregationError`; a heterogeneous-rank strategy aggregates ranks 4
  and 2 into a finite, nonzero change of the layer's shape.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import torch

from fedpeft.algorithms.base import StrategyContext
from fedpeft.algorithms.capabilities import Capabilities
from fedpeft.algorithms.registry import build_strategy, strategy_capabilities
from fedpeft.algorithms.wrappers.server_opt import ServerOptimizer
from fedpeft.config import ServerOptConfig
from fedpeft.errors import AggregationError, FedpeftError
from fedpeft.prune.layout import LayerLayout, PruneLayout
from fedpeft.seeding import torch_generator
from fedpeft.wire.messages import Adapter, ClientInfo, Header, LoraFactors, LoraSpec, LoraUpdate
from fedpeft.wire.zo import ZoSpec, ZoUpdate

__all__ = ["ConformanceError", "check_strategy"]

SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
MODULES = ("m.q_proj", "m.v_proj")
OUT, IN = 12, 10
# a pruning strategy's layout; the modules above lie outside it (nothing is pruned)
LAYOUT = PruneLayout("llama", (LayerLayout(groups=2, per_group=2, head_dim=4, ffn=16),) * 3)
ZO_SEEDS, ZO_STEPS, ZO_BLOCKS = 64, 10, 3


class ConformanceError(FedpeftError):
    """One or more conformance checks failed; ``failures`` maps each to its reason."""

    def __init__(self, strategy: str, failures: Mapping[str, str]) -> None:
        self.failures = dict(failures)
        lines = "\n".join(f"  - {k}: {v}" for k, v in self.failures.items())
        super().__init__(f"strategy {strategy!r} fails {len(failures)} check(s):\n{lines}")


def _initial(seed: int = 0) -> Adapter:
    g = torch_generator(seed, "conformance-initial")
    return {
        m: LoraFactors(
            torch.randn(SPEC.rank, IN, generator=g) * 0.1,
            torch.randn(OUT, SPEC.rank, generator=g) * 0.1,
            SPEC.alpha,
        )
        for m in MODULES
    }


def _clients(n: int) -> list[ClientInfo]:
    return [ClientInfo(Header("r", 0, "fp", "", 1000, str(i)), "cpu") for i in range(n)]


class _Harness:
    """Builds the strategy (wrapped in a server optimizer if one is given) and synthetic
    updates of its family."""

    def __init__(
        self, name: str, options: Mapping[str, Any], server_opt: ServerOptConfig | None = None
    ) -> None:
        self.name, self.options = name, dict(options)
        self.caps: Capabilities = strategy_capabilities(name, self.options)
        self.zo = self.caps.family == "zo"
        self.server_opt = server_opt if server_opt is not None and server_opt.active else None
        if self.server_opt is not None:  # its step is not the mean change; one shape only
            self.caps = replace(self.caps, linear=False, heterogeneous_ranks=False)

    def build(self) -> Any:
        if self.zo:
            zspec = ZoSpec(
                algorithm=_zo_algorithm(self.name),
                target="full",
                num_seeds=ZO_SEEDS,
                pool_seed=1,
                lr=0.1,
                local_steps=ZO_STEPS,
            )
            ctx = StrategyContext(initial={}, spec=SPEC, seed=0, zo=zspec, zo_blocks=ZO_BLOCKS)
        else:
            layout = LAYOUT if self.caps.needs_layout else None
            ctx = StrategyContext(initial=_initial(), spec=SPEC, seed=0, layout=layout)
        strategy = build_strategy(self.name, self.options, ctx)
        if self.server_opt is None:
            return strategy
        return ServerOptimizer(strategy, self.server_opt, self.caps.example_weighted)

    def updates(
        self, strategy: Any, rnd: int, n: int, seed: int, examples: Sequence[int] | None = None
    ) -> list[Any]:
        """One update per client, each the plan it was given plus a random change."""
        plans = strategy.configure_train(rnd, _clients(n))
        sizes = list(examples) if examples is not None else [10 + 7 * i for i in range(n)]
        out: list[Any] = []
        for i, (cid, plan) in enumerate(sorted(plans.items())):
            g = torch_generator(seed, "conformance-update", rnd, i)
            header = Header("r", rnd, "fp", "h", sizes[i], cid)
            if self.zo:
                out.append(_zo_update(header, plan, g, _zo_algorithm(self.name)))
                continue
            factors = {}
            for m, f in plan.adapter.items():
                a = f.a + torch.randn(f.a.shape, generator=g) * 0.1 if "A" in plan.parts else f.a
                b = f.b + torch.randn(f.b.shape, generator=g) * 0.1 if "B" in plan.parts else f.b
                factors[m] = LoraFactors(a.clone(), b.clone(), f.alpha)
            out.append(LoraUpdate(header, factors))
        return out


def _zo_algorithm(name: str) -> str:
    from fedpeft.algorithms.registry import resolve

    return str(getattr(resolve(name), "zo_algorithm", "fedkseed"))


def _zo_update(header: Header, plan: Any, g: torch.Generator, algorithm: str) -> ZoUpdate:
    seeds = torch.randint(0, ZO_SEEDS, (ZO_STEPS,), generator=g).numpy().astype(np.uint16)
    blocks = np.zeros(0, np.uint16)
    if algorithm != "fedkseed":  # (block, seed) pairs, no repeats
        pairs = torch.randperm(ZO_BLOCKS * ZO_SEEDS, generator=g)[:12].numpy()
        blocks, seeds = (pairs // ZO_SEEDS).astype(np.uint16), (pairs % ZO_SEEDS).astype(np.uint16)
    scalars = torch.randn(len(seeds), generator=g).numpy().astype(np.float32)
    return ZoUpdate(
        header=header,
        seeds=seeds,
        scalars=scalars,
        blocks=blocks,
        synced_version=plan.sync.to_version,
    )


def _value(result: Any) -> dict[str, torch.Tensor]:
    """What a result means: each layer's change ``(alpha / r) B A`` or the coefficients."""
    if result.zo is not None:
        return {"coeffs": torch.from_numpy(np.asarray(result.zo.coeffs, np.float64))}
    return {
        m: (f.alpha / f.a.shape[0]) * (f.b.double() @ f.a.double())  # (out, r) @ (r, in)
        for m, f in result.adapter.items()
    }


def _close(x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], tol: float) -> bool:
    return set(x) == set(y) and all(torch.allclose(x[k], y[k], atol=tol, rtol=0) for k in x)


def _distance(x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> float:
    return sum(float((x[k] - y[k]).norm()) for k in x)


def _check(ok: bool, reason: str) -> None:
    if not ok:
        raise AssertionError(reason)


# ---------------------------------------------------------------------------- the checks
def _plans(h: _Harness) -> None:
    plans = h.build().configure_train(1, _clients(4))
    _check(
        bool(plans) and set(plans) <= {"0", "1", "2", "3"},
        f"configure_train planned {sorted(plans)} for clients 0-3",
    )
    for cid, plan in plans.items():
        if not h.zo:
            _check(
                set(plan.adapter) == set(MODULES),
                f"client {cid}'s plan covers "
                f"{sorted(plan.adapter)}, not the global's modules {list(MODULES)}",
            )


def _structure(h: _Harness) -> None:
    s = h.build()
    res = s.aggregate_train(1, h.updates(s, 1, 3, 0))
    if h.zo:
        _check(res.zo is not None and np.isfinite(res.zo.coeffs).all(), "no finite coefficients")
        return
    _check(set(res.adapter) == set(MODULES), f"the aggregate has modules {sorted(res.adapter)}")
    for m, f in res.adapter.items():
        _check(f.a.shape[1] == IN and f.b.shape[0] == OUT, f"{m}: layer shape changed")
        _check(res.spec is not None and f.rank == res.spec.rank, f"{m}: rank is not spec.rank")
        _check(bool(torch.isfinite(f.a).all() and torch.isfinite(f.b).all()), f"{m}: not finite")


def _identical(h: _Harness) -> None:
    s = h.build()
    one = h.updates(s, 1, 1, 0)[0]
    same = [
        replace(
            copy.deepcopy(one), header=replace(one.header, client_id=str(i), num_examples=10 + i)
        )
        for i in range(3)
    ]
    if h.zo or h.server_opt is not None:
        # three identical uploads give what one does (seed/scalar: its coefficients; a server
        # optimizer: its step on that one change)
        ref = h.build()
        ref.configure_train(1, _clients(1))
        want = _value(ref.aggregate_train(1, [one]))
        s2 = h.build()
        s2.configure_train(1, _clients(3))
        got = _value(s2.aggregate_train(1, same))
    else:
        got = _value(s.aggregate_train(1, same))
        want = {
            m: (f.alpha / f.a.shape[0]) * (f.b.double() @ f.a.double())
            for m, f in one.factors.items()
        }
    _check(_close(got, want, 1e-5), "identical updates do not give that update back")


def _depends(h: _Harness) -> None:
    a, b = h.build(), h.build()
    ra = _value(a.aggregate_train(1, h.updates(a, 1, 3, 0)))
    rb = _value(b.aggregate_train(1, h.updates(b, 1, 3, 1)))
    _check(not _close(ra, rb, 1e-9), "other updates give the same result: updates are ignored")


def _linear(h: _Harness) -> None:
    if not h.caps.linear or h.zo:
        return  # seed/scalar linearity is the coefficients' weighted sum (``weights``)
    s = h.build()
    ups = h.updates(s, 1, 3, 0)
    plans = h.build().configure_train(1, _clients(3))
    n = np.array([u.header.num_examples for u in ups], np.float64)
    p = n / n.sum() if h.caps.example_weighted else np.full(len(ups), 1 / len(ups))
    res = s.aggregate_train(1, ups)
    for m in MODULES:
        sent = plans[ups[0].header.client_id].adapter[m]
        for part in ("a", "b"):
            base = _scaled(sent, part)
            changes = [
                pk * (_scaled(u.factors[m], part) - base) for pk, u in zip(p, ups, strict=True)
            ]
            want = base + sum(changes)
            got = _scaled(res.adapter[m], part)
            _check(
                torch.allclose(got, want, atol=1e-6),
                f"{m}.{part} is not the sent factor "
                f"plus the {'example-' if h.caps.example_weighted else 'equally '}weighted "
                "mean change, as a linear strategy's must be",
            )


def _scaled(f: LoraFactors, part: str) -> torch.Tensor:
    """``A``, or ``(alpha / r) B``: the factors in the layer's scale (a strategy may keep its
    global at another alpha, e.g. alpha = r, the unit scale)."""
    return f.a.double() if part == "a" else (f.alpha / f.rank) * f.b.double()


def _weights(h: _Harness) -> None:
    def result(sizes: list[int]) -> dict[str, torch.Tensor]:
        s = h.build()
        return _value(s.aggregate_train(1, h.updates(s, 1, 3, 0, sizes)))

    even, heavy = result([10, 10, 10]), result([10_000, 10, 10])
    if not h.caps.example_weighted:
        _check(
            _close(even, heavy, 1e-9),
            "num_examples changed the result of a strategy that declares example_weighted = False",
        )
        return
    s = h.build()
    alone = _value(s.aggregate_train(1, h.updates(s, 1, 3, 0)[:1]))
    _check(
        _distance(heavy, alone) < _distance(even, alone),
        "giving client 0 nearly all the "
        "examples did not move the result toward its update: num_examples is ignored",
    )


def _order(h: _Harness) -> None:
    a, b = h.build(), h.build()
    ups = h.updates(a, 1, 4, 0)
    h.updates(b, 1, 4, 0)
    _check(
        _close(
            _value(a.aggregate_train(1, ups)),
            _value(b.aggregate_train(1, list(reversed(ups)))),
            0.0,
        ),
        "the result depends on the order of the replies",
    )


def _no_mutation(h: _Harness) -> None:
    s = h.build()
    ups = h.updates(s, 1, 3, 0)
    before = copy.deepcopy(ups)
    s.aggregate_train(1, ups)
    _check(
        repr(before) == repr(ups)
        and all(_same_update(x, y) for x, y in zip(before, ups, strict=True)),
        "aggregate_train changed the updates it was given",
    )


def _same_update(x: Any, y: Any) -> bool:
    if isinstance(x, ZoUpdate):
        return bool(np.array_equal(x.scalars, y.scalars) and np.array_equal(x.seeds, y.seeds))
    return all(
        torch.equal(f.a, y.factors[m].a) and torch.equal(f.b, y.factors[m].b)
        for m, f in x.factors.items()
    )


def _state(h: _Harness) -> None:
    from fedpeft.server.checkpoint import load_checkpoint, save_checkpoint

    first = h.build()
    first.aggregate_train(1, h.updates(first, 1, 3, 0))
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.safetensors"
        save_checkpoint(path, first.state_dict())
        resumed = h.build()
        resumed.load_state_dict(load_checkpoint(path))
    ua, ub = h.updates(first, 2, 3, 5), h.updates(resumed, 2, 3, 5)
    _check(
        all(_same_update(x, y) for x, y in zip(ua, ub, strict=True)),
        "a fresh strategy loaded from state_dict plans round 2 differently",
    )
    _check(
        _close(_value(first.aggregate_train(2, ua)), _value(resumed.aggregate_train(2, ub)), 0.0),
        "a fresh strategy loaded from state_dict aggregates round 2 differently",
    )


def _refusals(h: _Harness) -> None:
    def refused(updates: list[Any]) -> bool:
        s = h.build()
        s.configure_train(1, _clients(max(1, len(updates))))
        try:
            s.aggregate_train(1, updates)
        except AggregationError:
            return True
        return False

    _check(refused([]), "no updates did not raise AggregationError")
    if h.zo:
        return
    s = h.build()
    ups = h.updates(s, 1, 2, 0)
    other = dict(ups[1].factors)
    other["m.k_proj"] = other.pop("m.v_proj")
    _check(
        refused([ups[0], replace(ups[1], factors=other)]),
        "an update of other modules did not raise AggregationError",
    )
    half = {
        m: LoraFactors(f.a[:2].clone(), f.b[:, :2].clone(), f.alpha)
        for m, f in ups[1].factors.items()
    }
    mixed = [ups[0], replace(ups[1], factors=half)]
    if not h.caps.heterogeneous_ranks:
        _check(
            refused(mixed),
            "a one-rank strategy accepted an update of another rank without AggregationError",
        )
        return
    res = h.build().aggregate_train(1, mixed)  # ranks 4 and 2: the layer shape is kept
    for m, f in res.adapter.items():
        ok = f.a.shape[1] == IN and f.b.shape[0] == OUT and f.a.shape[0] == f.b.shape[1]
        _check(
            ok and bool(torch.isfinite(f.delta()).all()) and float(f.delta().norm()) > 0,
            f"{m}: mixed ranks 4 and 2 did not aggregate into a finite, nonzero change of the "
            "layer's shape",
        )


CHECKS: dict[str, Callable[[_Harness], None]] = {
    "plans": _plans,
    "structure": _structure,
    "identical": _identical,
    "depends": _depends,
    "linear": _linear,
    "weights": _weights,
    "order": _order,
    "no_mutation": _no_mutation,
    "state": _state,
    "refusals": _refusals,
}


def check_strategy(
    strategy: str,
    options: Mapping[str, Any] | None = None,
    server_opt: ServerOptConfig | None = None,
) -> list[str]:
    """Run every conformance check on ``strategy`` built with ``options`` (wrapped in the
    server optimizer ``server_opt``, a ``[server_opt]`` section, when one is given).

    Returns
    -------
    list[str]
        The names of the checks run (all passed).

    Raises
    ------
    ConformanceError
        Listing each failed check and why (a check that crashes fails with its exception).
    StrategyError
        If the strategy cannot be found or built.
    """
    h = _Harness(strategy, options or {}, server_opt)
    failures: dict[str, str] = {}
    for name, check in CHECKS.items():
        try:
            check(h)
        except AssertionError as err:
            failures[name] = str(err)
        except Exception as err:  # a crash is a failure of that check, named as such
            failures[name] = f"raised {type(err).__name__}: {err}"
    if failures:
        raise ConformanceError(strategy, failures)
    return list(CHECKS)
