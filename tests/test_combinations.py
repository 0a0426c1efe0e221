"""Every combination of feature sections is decided when the scenario loads.

Two layers: the combinations once found to fail late, crash or be silently ignored, each
refused by ``fedpeft validate`` with a message naming its keys; and every pair of feature
sections, each pair either refused by ``fedpeft validate`` or run for a round on the tiny
model (in-process, and on Ray for the backend's pairs).
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from fedpeft.cache import ProcessCache
from fedpeft.cli import main
from fedpeft.config.load import load_config
from fedpeft.config.rules import RULES, combinations_markdown
from fedpeft.errors import ConfigError
from fedpeft.simulation.runner import simulate

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "simulations" / "tiny.toml")
PLUGIN = str(REPO / "strategies" / "median.py") + ":CoordinateMedian"
FEDKSEED = ["strategy.name=fedkseed", "zo.num_seeds=64", "zo.local_steps=2", "zo.lr=1e-4"]
# a round as small as it gets: 3 clients, 1 local step, no evaluation beyond the two passes
SMALL = [
    "federation.num_clients=3", "federation.rounds=1", "federation.min_clients=2",
    "train.local_steps=1", "train.batch_size=4", "data.max_examples_per_client=16",
    "eval.examples=4", "eval.every=0", "eval.max_new_tokens=2", "eval.validation_examples=4",
]  # fmt: skip

# (overrides, the problem's start: it names the keys). The combinations the restructuring
# issue reproduced as failing late, crashing or being ignored.
REFUSED = [
    (["strategy.name=fedkseed", "strategy.options.pro=true", "dp.noise_multiplier=1.0"],
     "dp.noise_multiplier > 0, but 'fedkseed' with these strategy.options uses per-client"),
    (["strategy.name=fedkseed-pro", "dp.noise_multiplier=1.0"],
     "dp.noise_multiplier > 0, but 'fedkseed-pro'"),
    (["ranks.mode=tiers", "ranks.tiers=[2,4]"],
     "ranks.mode = 'tiers' assigns clients different ranks, but 'fedavg' is a one-rank"),
    ([*FEDKSEED, "ranks.mode=tiers", "ranks.tiers=[2,4]"],
     "ranks.mode = 'tiers' assigns clients different ranks, but 'fedkseed' is a seed/scalar"),
    (["strategy.name=ferret", "ranks.mode=map", 'ranks.map={"1"=2}'],
     "ranks.mode = 'map' assigns clients different ranks, but 'ferret' is a seed/scalar"),
    ([*FEDKSEED, "compress.up=int8"], "compress.up = 'int8' is not an upload codec of 'fedkseed'"),
    (["strategy.name=ferret", "compress.up=topk"],
     "compress.up = 'topk' is not an upload codec of 'ferret'"),
    ([*FEDKSEED, "compress.down=fp16"], "compress.down = 'fp16' encodes LoRA factors"),
    (["strategy.name=fedspine", "compress.up=int8"],
     "compress.up = 'int8' is not an upload codec of 'fedspine'"),
    (["strategy.name=flora", "ranks.mode=tiers", "ranks.tiers=[2,4]", "dp.noise_multiplier=1"],
     "dp.noise_multiplier > 0 clips and averages the clients' changes to one set of factors, "
     "but ranks.mode = 'tiers' gives clients different ranks"),
    (["strategy.name=fedspine", "dp.noise_multiplier=1"],
     "dp.noise_multiplier > 0 clips and averages the clients' changes to one set of factors, "
     "but strategy 'fedspine' prunes"),
    (["strategy.name=flora", "ranks.mode=tiers", "ranks.tiers=[2,4]", "robust.rule=median"],
     "robust rules compare the clients' changes coordinate by coordinate, but ranks.mode"),
    (["strategy.name=hetlora", "ranks.mode=tiers", "ranks.tiers=[2,4]", "robust.clip_norm=1"],
     "robust rules compare the clients' changes coordinate by coordinate, but ranks.mode"),
    (["secagg.enabled=true", "attack.kind=sign_flip"],
     "attack.kind = 'sign_flip' rewrites updates in flight, which secagg hides"),
    (["secagg.enabled=true", "federation.centralized=true"],
     "secagg hides each client's update in a sum of several; federation.centralized"),
    (["secagg.enabled=true", "federation.fraction_train=0.25", "federation.min_clients=1"],
     "secagg needs at least 2 clients per round; federation.fraction_train = 0.25"),
    (["attack.kind=scale", "federation.centralized=true"],
     "attack.kind = 'scale' makes some clients attackers; federation.centralized = true"),
    (["federation.centralized=true", "federation.min_clients=2"],
     "federation.centralized = true runs one client holding all the data, but "
     "federation.min_clients = 2"),
    (['devices.tiers=["tx2","nosuch"]'], "devices.tiers: unknown ['nosuch']; known:"),
    (["secagg.enabled=true", f"strategy.name={PLUGIN!r}"],
     "secagg.enabled gives the coordinator only the sum of the clients' changes, but"),
    (["strategy.name=fedspine", "ranks.mode=tiers", "ranks.tiers=[2,4]"],
     "ranks.mode = 'tiers', but 'fedspine' picks each client's rank itself"),
    (["zo.num_seeds=64"], "[zo] sets seed/scalar training, but 'fedavg' trains LoRA factors"),
    ([*FEDKSEED, "robust.clip_norm=1"], "robust.clip_norm is for LoRA updates"),
    ([*FEDKSEED, "robust.rule=krum"], "robust.rule = 'krum' combines LoRA updates"),
    (["robust.scalar_clip=1"], "robust.scalar_clip is for seed/scalar strategies"),
    ([*FEDKSEED, "attack.kind=alie"], "attack.kind = 'alie' shifts LoRA factors"),
    (["attack.kind=scale", "compress.up=int8"], "attack.kind = 'scale' rewrites plain updates"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "problem"), REFUSED)
def test_each_combination_found_failing_late_is_refused_at_load(overrides, problem):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_validate_reports_every_problem_at_once_and_exits_2():
    cmd = [sys.executable, "-m", "fedpeft.cli", "validate", "--config", TINY,
           "secagg.enabled=true", "compress.up=int8", "robust.rule=median",
           'devices.tiers=["nosuch"]']  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 2, done.stderr
    for part in ("robust rules need each client's update; secagg hides them",
                 "secagg sends fixed-point vectors, not codec payloads",
                 "devices.tiers: unknown ['nosuch']"):  # fmt: skip
        assert part in done.stderr, done.stderr


def test_a_plugin_is_judged_by_its_capabilities_not_its_name(tmp_path):
    """A copy of the median plug-in that declares itself linear passes the secagg rule."""
    text = (REPO / "strategies" / "median.py").read_text()
    linear = text.replace('capabilities = Capabilities(family="lora", example_weighted=False)',
                          'capabilities = Capabilities(family="lora", linear=True)')  # fmt: skip
    assert linear != text
    (tmp_path / "lin.py").write_text(linear)
    load_config(TINY, ["secagg.enabled=true", f"strategy.name='{tmp_path / 'lin.py'}:"
                       "CoordinateMedian'"])  # fmt: skip
    with pytest.raises(ConfigError, match="is not linear"):
        load_config(TINY, ["secagg.enabled=true", f"strategy.name={PLUGIN!r}"])


# One representative setting per feature section, each valid on its own.
SECTIONS: dict[str, list[str]] = {
    "ranks": ["strategy.name=flora", "ranks.mode=tiers", "ranks.tiers=[2,4]"],
    "compress": ["compress.up=topk", "compress.ratio=0.5"],
    "zo": FEDKSEED,
    "devices": ['devices.tiers=["tx2","agx"]'],
    "validation": ["validation.max_update_norm=500", "validation.round_retries=1"],
    "robust": ["robust.rule=trimmed_mean", "robust.trim_fraction=0.34"],
    "attack": ["attack.kind=sign_flip", "attack.fraction=0.34"],
    "dp": ["dp.noise_multiplier=0.3"],
    "secagg": ["secagg.enabled=true"],
    "pruning": ["strategy.name=fedspine"],
    "centralized": ["federation.centralized=true", "federation.min_clients=1"],
    "server_opt": ["server_opt.name=adam", "server_opt.lr=0.01"],
    "schedule": ["train.lr_schedule=cosine", "train.lr_end_factor=0.1"],
    "quantization": ["model.quantization=nf4", "train.gradient_checkpointing=true"],
    "streaming": ["federation.aggregation=stream", "federation.window=2"],
    "population": [
        "federation.discovery=sampled",
        "federation.clients_per_round=2",
        "federation.records_per_client=8",
        "federation.partition=dirichlet",
    ],
    "backend": ["simulation.backend=ray", "simulation.ray_num_cpus=1"],
}
PAIRS = list(itertools.combinations(SECTIONS, 2))


def _pair_config(a: str, b: str) -> list[str]:
    # the second section's strategy wins where both name one (e.g. ranks + zo: tiers + fedkseed)
    return [*SMALL, *SECTIONS[a], *SECTIONS[b]]


def _run_or_refused(overrides: list[str], tmp_path: Path, capsys) -> str:
    """``fedpeft validate`` (in this process: a subprocess per pair costs seconds of imports);
    a scenario it accepts must then train one round."""
    code = main(["validate", "--config", TINY, *overrides])
    err = capsys.readouterr().err
    if code == 2:
        assert err.startswith("fedpeft: configuration error: "), err
        return "refused"
    assert code == 0, err
    summary = simulate(load_config(TINY, overrides), tmp_path, quiet=True, cache=ProcessCache())
    assert summary["rounds"] == 1, summary
    return "ran"


def test_every_section_alone_runs_a_round(tmp_path, capsys):
    for name, overrides in SECTIONS.items():
        if name != "backend":
            assert _run_or_refused([*SMALL, *overrides], tmp_path / name, capsys) == "ran", name


@pytest.mark.parametrize(("a", "b"), [p for p in PAIRS if "backend" not in p])
def test_every_pair_of_sections_is_refused_at_load_or_runs(a, b, tmp_path, capsys):
    _run_or_refused(_pair_config(a, b), tmp_path, capsys)


def _accepted(overrides: list[str], capsys) -> bool:
    code = main(["validate", "--config", TINY, *overrides])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    return code == 0


@pytest.mark.ray
def test_every_pair_with_the_ray_backend_is_refused_at_load_or_runs(tmp_path, capsys):
    """Each (section, backend) pair goes through ``fedpeft validate``; the accepted ones are
    packed greedily into as few scenarios as validate together, and each of those runs a
    round on Ray (a Ray start costs ~10 s here, a pair alone would cost 11 of them). Every
    accepted pair is part of one scenario that ran; a scenario holds every feature its pairs
    hold."""
    others = [name for name in SECTIONS if name != "backend"]
    accepted = [x for x in others if _accepted(_pair_config(x, "backend"), capsys)]
    assert len(accepted) >= 8, accepted  # most sections work on Ray
    groups: list[list[str]] = []
    for name in accepted:
        for group in groups:
            merged = [*SMALL, *SECTIONS["backend"], *(o for g in group for o in SECTIONS[g]),
                      *SECTIONS[name]]  # fmt: skip
            if _accepted(merged, capsys):
                group.append(name)
                break
        else:
            groups.append([name])
    assert sorted(x for g in groups for x in g) == sorted(accepted)
    for i, group in enumerate(groups):
        overrides = [*SMALL, *SECTIONS["backend"], *(o for g in group for o in SECTIONS[g])]
        summary = simulate(load_config(TINY, overrides), tmp_path / str(i), quiet=True)
        assert summary["rounds"] == 1, group


def test_docs_combinations_is_generated_from_the_rules():
    doc = (REPO / "docs" / "combinations.md").read_text()
    assert doc == combinations_markdown(), "regenerate: fedpeft rules > docs/combinations.md"
    assert len(RULES) == doc.count("\n| `")


CAPABILITY_SECTIONS = ("ranks", "compress", "robust", "attack", "dp", "secagg", "server_opt")
ZO_NAMES = ("fedkseed", "fedkseed-pro", "ferret")


def _strategies() -> list[str]:
    from fedpeft.algorithms.registry import registered

    return [*registered(), PLUGIN]


@pytest.mark.parametrize("section", CAPABILITY_SECTIONS)
@pytest.mark.parametrize("strategy", _strategies())
def test_every_strategy_with_each_section_its_capabilities_decide(
    strategy, section, tmp_path, capsys
):
    """The capabilities each strategy declares are true: what they let through runs."""
    own = [o for o in SECTIONS[section] if not o.startswith("strategy.name")]
    zo = FEDKSEED[1:] if strategy in ZO_NAMES else []
    own += ["eval.personalized=true"] if strategy == "fedsa" else []  # its clients keep B
    _run_or_refused([*SMALL, f"strategy.name={strategy!r}", *zo, *own], tmp_path, capsys)
