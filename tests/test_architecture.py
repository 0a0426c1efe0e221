"""The package's layering, and extensions that take one file (docs/architecture.md).

- No import cycle among fedpeft's modules, counting imports inside functions; the server
  does not import the simulation.
- The coordinator and the clients ask an update family (fedpeft.families) instead of
  branching on message types.
- A throwaway heterogeneous-rank strategy, a throwaway FedSpine bandit and a throwaway
  seed/scalar variant, each one file written here, plug in and run a round; a throwaway
  upload codec is two edits to a copy of the package.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

from fedpeft.cache import ProcessCache
from fedpeft.simulation.runner import simulate
from fedpeft.testing import check_strategy

ROOT = Path(__file__).resolve().parents[1] / "fedpeft"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _import_graph() -> dict[str, set[str]]:
    """Module -> the fedpeft modules it imports anywhere in its file (functions included)."""
    mods = _modules()

    def owner(name: str) -> str | None:  # the module a dotted name lives in
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                         for a in node.names]  # fmt: skip
            for name in names:
                target = owner(name) if name.startswith("fedpeft") else None
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_fedpeft_modules():
    graph = _import_graph()
    assert len(graph) > 100 and "fedpeft.algorithms.registry" in graph
    assert "fedpeft.errors" in graph["fedpeft.algorithms.registry"]
    assert _cycles(graph) == []


def test_the_server_does_not_import_the_simulation():
    graph = _import_graph()
    server = [m for m in graph if m.startswith("fedpeft.server")]
    assert server
    leaks = {m: sorted(t for t in graph[m] if t.startswith("fedpeft.simulation")) for m in server}
    assert {m: t for m, t in leaks.items() if t} == {}


FAMILY_TYPES = {"TrainInstruction", "ZoInstruction", "LoraUpdate", "ZoUpdate", "LoraPlan", "ZoPlan"}


def _type_branches(path: Path, root: Path = ROOT.parent) -> list[str]:
    """``isinstance`` calls in ``path`` that test for a message or plan type of a family."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance":
            named = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
            if named & FAMILY_TYPES:
                out.append(f"{path.relative_to(root)}:{node.lineno}")
    return out


def test_the_type_branch_finder_finds_a_planted_branch(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        "def f(ins, x):\n    y = isinstance(x, int)\n"
        "    return isinstance(ins, (ZoInstruction, int)) and y\n"
    )
    assert _type_branches(planted, tmp_path) == ["planted.py:3"]


def test_server_and_client_ask_the_update_family_instead_of_branching_on_types():
    files = [*(ROOT / "server").glob("*.py"), *(ROOT / "client").glob("*.py")]
    assert files
    hits = [hit for f in files for hit in _type_branches(f)]
    assert hits == [], hits


ZERO_PAD = """
from dataclasses import dataclass
from fedpeft.algorithms.capabilities import Capabilities
from fedpeft.algorithms.base import AggregateResult, adapter_from_state, adapter_state
from fedpeft.algorithms.hetero import UnitGlobal, example_weights, ordered, padded_sum
from fedpeft.algorithms.hetero import plans_from_global, ranks_for
from fedpeft.wire.messages import LoraFactors


class ZeroPad:
    '''Zero-padded FedIT over mixed ranks (the FLoRA paper's baseline), in one file.'''

    capabilities = Capabilities(family="lora", heterogeneous_ranks=True)

    @dataclass(frozen=True)
    class Config:
        weighted: bool = True

    def __init__(self, config, ctx):
        self.config, self.ctx = config, ctx
        self.glob = UnitGlobal(ctx)

    def configure_train(self, server_round, clients):
        ranks = ranks_for(self.ctx, server_round, clients, {})
        return plans_from_global(self.ctx, self.glob.adapter, ranks)

    def aggregate_train(self, server_round, updates):
        ups, modules = ordered(updates, "zero-pad")
        w = example_weights(ups, self.config.weighted)
        rank = next(iter(self.glob.adapter.values())).rank
        out = {m: LoraFactors(a=padded_sum(ups, m, w, rank, "A").float(),
                              b=padded_sum(ups, m, w, rank, "B").float(), alpha=float(rank))
               for m in modules}
        return self.glob.update(out, {})

    def state_dict(self):
        return self.glob.state()

    def load_state_dict(self, state):
        self.glob.load(state)
"""


def test_a_heterogeneous_rank_strategy_is_one_file(tiny_config, tmp_path):
    (tmp_path / "zero_pad.py").write_text(ZERO_PAD)
    name = f"{tmp_path / 'zero_pad.py'}:ZeroPad"
    check_strategy(name)
    cfg = tiny_config(f"strategy.name={name!r}", "ranks.mode=tiers", "ranks.tiers=[2,4]",
                      "federation.rounds=1")  # fmt: skip
    summary = simulate(cfg, tmp_path / "run", quiet=True, cache=ProcessCache())
    assert summary["rounds"] == 1


GREEDY = """
from dataclasses import dataclass, field
import numpy as np


@dataclass
class AlwaysFirst:
    '''A throwaway bandit: every device plays arm 0, and it counts what it was told.'''
    arms: list
    seed: int
    told: dict = field(default_factory=dict)

    def select(self, device, allowed):
        return allowed[0]

    def update(self, device, arm, reward):
        self.told[device] = self.told.get(device, 0) + 1

    def state_dict(self):
        return {"told": dict(self.told)}

    def load_state_dict(self, state):
        self.told = dict(state["told"])
"""


def test_a_fedspine_bandit_is_one_file(tiny_config, tmp_path):
    (tmp_path / "greedy.py").write_text(GREEDY)
    bandit = f"strategy.options.bandit='{tmp_path / 'greedy.py'}:AlwaysFirst'"
    cfg = tiny_config("strategy.name=fedspine", "federation.rounds=2", bandit)
    simulate(cfg, tmp_path / "run", quiet=True, cache=ProcessCache())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ratios = {v for r in rows[1:] for k, v in r.items() if k.startswith("arm_ratio/")}
    ranks = {v for r in rows[1:] for k, v in r.items() if k.startswith("arm_rank/")}
    assert rows[-1]["round"] == 2 and ratios and ranks, rows[1]
    assert ratios == {0.0} and ranks == {8.0}, (ratios, ranks)  # arm 0 of the defaults


SPARSE_MEZO = """
from dataclasses import dataclass
from fedpeft.algorithms.fedkseed import FedKSeed
from fedpeft.zo.trainer import ZoTrainer


@dataclass(frozen=True)
class SmallWeights:
    '''Sparse MeZO's mask (Liu et al. 2024): perturb the smallest-magnitude weights only.'''
    keep: float

    def __call__(self, name, initial):
        k = max(1, int(self.keep * initial.numel()))
        return initial.abs() <= initial.abs().flatten().kthvalue(k).values


class SparseMezo(FedKSeed):
    '''FedKSeed whose directions touch a quarter of each tensor, in one file.'''
    trainer = ZoTrainer(mask=SmallWeights(0.25))
"""


def test_a_seed_scalar_variant_is_one_file(tiny_config, tmp_path):
    """A masked-direction variant plugs in as one file: its clients and the coordinator's
    replay move only the coordinates its mask marks, and a node without the mask is refused."""
    import importlib.util

    import pytest
    from safetensors import safe_open

    from fedpeft.config import ModelConfig
    from fedpeft.errors import ProtocolError
    from fedpeft.models import load_model
    from fedpeft.wire.zo import ZoSpec
    from fedpeft.zo.runtime import ZoRuntime

    path = tmp_path / "sparse_mezo.py"
    path.write_text(SPARSE_MEZO)
    name = f"{path}:SparseMezo"
    check_strategy(name)
    cfg = tiny_config(f"strategy.name={name!r}", "zo.target='full'", "zo.local_steps=4",
                      "zo.num_seeds=64", "zo.lr=1e-3", "federation.rounds=1")  # fmt: skip
    simulate(cfg, tmp_path / "run", quiet=True, cache=ProcessCache())
    with safe_open(str(tmp_path / "run" / "zo_state.safetensors"), "pt") as f:
        meta, coeffs = f.metadata(), f.get_tensor("coeffs").numpy()
    spec = ZoSpec(**json.loads(meta["spec"]))
    assert spec.mask == "SmallWeights(keep=0.25)" and abs(coeffs).sum() > 0

    module = importlib.util.spec_from_file_location("sparse_mezo_copy", path)
    assert module is not None and module.loader is not None
    plugin = importlib.util.module_from_spec(module)
    module.loader.exec_module(plugin)
    mask = plugin.SmallWeights(0.25)
    base, tuned = (load_model(ModelConfig(name="tiny")) for _ in range(2))
    rt = ZoRuntime(tuned, spec, mask)
    rt.set_global(coeffs, int(meta["version"]))
    moved = kept = 0
    before = dict(base.base_model.named_parameters())
    for n, p in zip(rt.names, rt.params, strict=True):
        changed = p.detach() != before[n].detach()
        allowed = mask(n, before[n].detach().float())
        assert not (changed & ~allowed).any(), n  # nothing outside the mask moved
        moved, kept = moved + int(changed.sum()), kept + int(allowed.sum())
    assert 0 < moved <= kept < sum(rt.numels) / 2
    with pytest.raises(ProtocolError, match="masked by SmallWeights"):
        ZoRuntime(load_model(ModelConfig(name="tiny")), spec)  # a node without the mask


# The two edits a new upload codec takes (docs/architecture.md): its name in CODECS, and its
# encode/decode branches. Here a 1-bit "sign" codec: sign(x) as packed bits, one mean |x|.
SIGN_ENCODE = """    if codec.name == "sign":
        m = np.asarray([float(x.abs().mean()) if x.numel() else 0.0], np.float32)
        return {"g": np.packbits((x.reshape(-1) > 0).numpy()), "s": m}
"""
SIGN_DECODE = """    if codec.name == "sign":
        bits = np.unpackbits(_field(fields, "g", np.uint8, where))[:n]
        s = float(_field(fields, "s", np.float32, where)[0])
        return torch.from_numpy((bits.astype(np.float32) * 2 - 1) * s).reshape(shape)
"""
ENCODE_AT = "    flat = x.reshape(-1)\n    idx = _topk_indices("
DECODE_AT = '    out = torch.zeros(n, dtype=torch.float32)\n    if codec.name == "topk":'
SIGN_CODEC_EDITS = {
    "fedpeft/config/sections.py": [
        ('CODECS = ("none", "fp16", "int8", "topk", "compeft")',
         'CODECS = ("none", "fp16", "int8", "topk", "compeft", "sign")'),
    ],
    "fedpeft/wire/codecs.py": [(ENCODE_AT, SIGN_ENCODE + ENCODE_AT),
                               (DECODE_AT, SIGN_DECODE + DECODE_AT)],
}  # fmt: skip


def test_a_new_upload_codec_is_two_files(tmp_path):
    """A copy of the package with only the two edits runs a round with ``compress.up=sign``:
    every client's upload is the 1-bit codec's size, and the round learns."""
    import os
    import shutil
    import subprocess
    import sys

    copy = tmp_path / "pkg"
    shutil.copytree(ROOT, copy / "fedpeft", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "simulations").symlink_to(ROOT.parent / "simulations")
    for rel, edits in SIGN_CODEC_EDITS.items():
        path = copy / rel
        text = path.read_text()
        for old, new in edits:
            assert text.count(old) == 1, (rel, old)  # the anchor is still there, once
            text = text.replace(old, new)
        path.write_text(text)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", "--config", "simulations/tiny.toml",
           "--out", str(out), "compress.up=sign", "federation.rounds=2", "eval.examples=8",
           "data.max_examples_per_client=32", "eval.max_new_tokens=4"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(copy)}
    done = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["failures"] == {} for r in rows[1:]), rows[1]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    from safetensors.torch import load_file

    factors = load_file(str(out / "adapter" / "adapter_model.safetensors")).values()
    per_client = sum((t.numel() + 7) // 8 + 4 for t in factors)  # sign bits + one float32
    assert rows[1]["payload_up"] == rows[1]["clients"] * per_client, (rows[1], per_client)
