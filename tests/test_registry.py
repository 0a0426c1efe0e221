"""Strategy registry and out-of-tree loading fail loudly and say what to do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from fedpeft.algorithms.base import StrategyContext
from fedpeft.algorithms.capabilities import Capabilities, capabilities_of
from fedpeft.algorithms.fedavg import FedAvg
from fedpeft.algorithms.registry import (
    build_strategy,
    check_strategy_config,
    register_strategy,
    registered,
    resolve,
)
from fedpeft.errors import StrategyError
from fedpeft.wire.messages import LoraSpec

PLUGIN_FILE = Path(__file__).resolve().parents[1] / "strategies" / "median.py"


def _ctx(make_update):
    return StrategyContext(
        initial=make_update().factors, spec=LoraSpec(4, 8.0, ("q_proj",)), seed=0
    )


def test_fedavg_is_registered():
    assert "fedavg" in registered()
    assert resolve("fedavg") is FedAvg


def test_duplicate_name_is_refused():
    class Other(FedAvg):
        pass

    with pytest.raises(StrategyError, match="already registered by fedpeft.algorithms.fedavg"):
        register_strategy("fedavg", Other)


def test_class_without_config_is_refused():
    class NoConfig:
        def configure_train(self): ...
        def aggregate_train(self): ...
        def state_dict(self): ...
        def load_state_dict(self): ...

    with pytest.raises(StrategyError, match="needs a `Config` dataclass"):
        register_strategy("noconfig", NoConfig)


def test_class_missing_methods_is_refused():
    class Half:
        @dataclass
        class Config:
            pass

        def configure_train(self): ...

    with pytest.raises(StrategyError, match="lacks the Strategy methods"):
        register_strategy("half", Half)


def test_class_without_capabilities_is_refused_and_capabilities_are_checked():
    class Unsaid:
        Config = FedAvg.Config
        configure_train = aggregate_train = state_dict = load_state_dict = FedAvg.state_dict

    with pytest.raises(StrategyError, match="needs `capabilities = Capabilities"):
        register_strategy("unsaid", Unsaid)
    with pytest.raises(StrategyError, match="must include 'none' and only"):
        Capabilities(codecs=frozenset({"zip"}))
    with pytest.raises(StrategyError, match="cannot declare heterogeneous_ranks"):
        Capabilities(family="zo", heterogeneous_ranks=True)
    Unsaid.capabilities = staticmethod(lambda options: "linear")  # type: ignore[attr-defined]
    with pytest.raises(StrategyError, match="returned 'linear', not a Capabilities"):
        capabilities_of(Unsaid)


def test_capabilities_may_follow_the_options():
    from fedpeft.algorithms.fedkseed import FedKSeed

    assert not capabilities_of(FedKSeed).client_statistics
    assert capabilities_of(FedKSeed, FedKSeed.Config(pro=True)).client_statistics


@pytest.mark.parametrize("bad", ["FedAvg", "has space", "9lives"])
def test_malformed_names_are_refused(bad):
    with pytest.raises(StrategyError, match="must match"):
        register_strategy(bad, FedAvg)


def test_unknown_name_lists_registered():
    with pytest.raises(StrategyError, match="registered: .*fedavg"):
        resolve("fedavgg")


def test_load_plugin_from_file(make_update):
    strat = build_strategy(f"{PLUGIN_FILE}:CoordinateMedian", {}, _ctx(make_update))
    assert type(strat).__name__ == "CoordinateMedian"


def test_load_from_dotted_path(make_update):
    strat = build_strategy(
        "fedpeft.algorithms.fedavg:FedAvg", {"weighted": False}, _ctx(make_update)
    )
    assert isinstance(strat, FedAvg) and strat.config.weighted is False


def test_missing_plugin_file_and_attribute():
    with pytest.raises(StrategyError, match="does not exist"):
        resolve("no/such/file.py:X")
    with pytest.raises(StrategyError, match="has no 'Nope'; it defines"):
        resolve(f"{PLUGIN_FILE}:Nope")


def test_bad_options_are_listed_with_valid_keys():
    problems = check_strategy_config("fedavg", {"weightd": True, "weighted": "yes"})
    text = "\n".join(problems)
    assert "unknown key 'strategy.options.weightd'" in text and "valid keys" in text
    assert "weighted must be bool" in text


def test_a_strategy_installed_as_an_entry_point_is_found_by_name(install_plugin):
    """A package that declares ``[project.entry-points."fedpeft.strategies"]`` is found by the
    name it declares: here a distribution's metadata written to a folder on ``sys.path``, as
    pip leaves it, pointing at a copy of the shipped median plug-in."""
    import torch

    from fedpeft.wire.messages import Header, LoraFactors, LoraUpdate

    install_plugin(PLUGIN_FILE, "ep_median_plugin", "ep-median = ep_median_plugin:CoordinateMedian")
    cls = resolve("ep-median")
    assert cls.__name__ == "CoordinateMedian" and cls.__module__ == "ep_median_plugin"
    spec = LoraSpec(1, 1.0, ("q_proj",))
    sent = {"m": LoraFactors(torch.zeros(1, 2), torch.zeros(2, 1), 1.0)}
    strat = build_strategy("ep-median", {}, StrategyContext(initial=sent, spec=spec, seed=0))
    ups = [
        LoraUpdate(Header("r", 1, "f", "h", 10, str(i)),
                   {"m": LoraFactors(torch.full((1, 2), v), torch.full((2, 1), -v), 1.0)})
        for i, v in enumerate((1.0, 5.0, 2.0))
    ]  # fmt: skip
    got = strat.aggregate_train(1, ups).adapter["m"]
    assert got.a.tolist() == [[2.0, 2.0]] and got.b.tolist() == [[-2.0], [-2.0]]  # medians
    with pytest.raises(StrategyError, match="unknown strategy 'ep-absent'"):
        resolve("ep-absent")
