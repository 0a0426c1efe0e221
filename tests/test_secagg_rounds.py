"""Secure aggregation inside training rounds: same model as in the clear, dropouts, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from safetensors import safe_open

from fedpeft.client.app import make_client_app
from fedpeft.errors import ConfigError
from fedpeft.secagg.flower import from_record
from fedpeft.server.app import run_server
from fedpeft.server.results import RunReporter
from fedpeft.simulation.inprocess import InProcessGrid
from fedpeft.simulation.runner import simulate

# 4 clients of 24 examples each: equal weights, and one may drop (4 - 1 >= threshold 2)
EQUAL = ("federation.num_clients=4", "data.max_examples_per_client=24")


def _rows(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118


@pytest.mark.parametrize("strategy", ["ffa", "fedavg"])
def test_secure_rounds_give_the_model_of_the_clear_rounds(tiny_config, tmp_path, cache, strategy):
    """Every client holds 24 examples, so the unweighted secure mean is FedAvg's mean."""
    clear = tiny_config(*EQUAL, f"strategy.name={strategy}")
    secure = tiny_config(*EQUAL, f"strategy.name={strategy}", "secagg.enabled=true")
    simulate(clear, tmp_path / "clear", quiet=True, cache=cache)
    simulate(secure, tmp_path / "secure", quiet=True, cache=cache)
    a = _tensors(tmp_path / "clear" / "adapter" / "adapter_model.safetensors")
    b = _tensors(tmp_path / "secure" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    if strategy == "ffa":  # the frozen A is exactly what was sent
        assert all(torch.equal(a[k], b[k]) for k in a if "lora_A" in k)
    clear_rows, rows = _rows(tmp_path / "clear"), _rows(tmp_path / "secure")
    for c, s in zip(clear_rows, rows, strict=True):
        assert s["eval_loss"] == pytest.approx(c["eval_loss"], abs=1e-6)
    assert rows[1]["secagg_survivors"] == 4 and rows[1]["clients"] == 4
    assert (
        rows[1]["num_examples"] == 96 and rows[1]["payload_up"] == 0
    )  # no tensor left a client in the clear
    assert rows[1]["secagg_bytes_up"] > 0


def _unequal_data(path) -> str:
    """WordNet records regrouped so that the 4 clients (one group each, natural split) hold
    16, 32, 64 and 96 training examples, plus held-out records."""
    import gzip

    from fedpeft.simulation.partition import partition  # noqa: F401  (the split used)

    src = Path(__file__).resolve().parents[1] / "simulations" / "data" / "wordnet.jsonl.gz"
    with gzip.open(src, "rt") as fh:
        rows = [json.loads(next(fh)) for _ in range(260)]
    out, i = [], 0
    for group, size in enumerate((16, 32, 64, 96)):
        for r in rows[i : i + size]:
            out.append({**r, "domain": f"g{group}", "split": "train"})
        i += size
    out += [{**r, "domain": "g0", "split": "eval"} for r in rows[i : i + 32]]
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return str(path)


ZO_SMALL = ("zo.num_seeds=64", "zo.local_steps=4", "zo.lr=1e-4", "zo.eps=1e-3")


@pytest.mark.parametrize(
    ("strategy", "atol"),
    # LoRA: one round, so the adapter is the aggregate itself (B up to ~0.06: float32 steps of
    # 3.7e-9; measured max difference 3.7e-9). A second round's local AdamW at lr 1e-2 turns
    # that last-bit difference into up to 1.6e-6 (fedavg), a property of the training, not of
    # the aggregation. Seed/scalar coefficients are float32 (up to ~0.04 here), two rounds:
    # measured max difference 2.2e-8.
    [("fedavg", 1e-8), ("ffa", 1e-8), ("rolora", 1e-8), ("fedkseed", 1e-7), ("ferret", 1e-7)],
)
def test_secure_equals_clear_with_clients_of_16_32_64_96_examples(
    tiny_config, tmp_path, strategy, atol
):
    """Example-weighted: each client contributes p_k x_k; the clear strategy weights the same."""
    from fedpeft.cache import ProcessCache

    zo = strategy in ("fedkseed", "ferret")
    data = ("federation.num_clients=4", f"data.path={_unequal_data(tmp_path / 'u.jsonl')!r}",
            "data.max_examples_per_client=0", "federation.partition=natural",
            f"strategy.name={strategy}",
            *(ZO_SMALL if zo else ["federation.rounds=1"]))  # fmt: skip
    simulate(tiny_config(*data), tmp_path / "clear", quiet=True, cache=ProcessCache())
    simulate(tiny_config(*data, "secagg.enabled=true"), tmp_path / "secure", quiet=True,
             cache=ProcessCache())  # fmt: skip
    rows = _rows(tmp_path / "secure")
    assert rows[1]["num_examples"] == 16 + 32 + 64 + 96 and rows[1]["secagg_survivors"] == 4
    if zo:
        a = _tensors(tmp_path / "clear" / "zo_state.safetensors")
        b = _tensors(tmp_path / "secure" / "zo_state.safetensors")
    else:
        a = _tensors(tmp_path / "clear" / "adapter" / "adapter_model.safetensors")
        b = _tensors(tmp_path / "secure" / "adapter" / "adapter_model.safetensors")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, worst
    # an unweighted mean would be far off: the clients' changes differ
    assert max(float(a[k].abs().max()) for k in a if "lora_A" not in k) > 100 * atol


@pytest.mark.parametrize(
    ("scenario", "graph", "atol"),
    [
        ("tiny_fedkseed.toml", (), 0.0),
        # Ferret's (block, seed) vectors over a sparse graph: 2 neighbours each, 2 shares.
        # Measured: max |secure - clear| = 1.8e-8 on coefficients up to 0.038 (fixed point)
        ("tiny_ferret.toml", ("secagg.neighbours=2", "secagg.threshold=2", "zo.directions=64"),
         1e-7),
    ],
)  # fmt: skip
def test_secure_seed_scalar_rounds_match_the_clear_run(tmp_path, repo, scenario, graph, atol):
    """Fresh process caches: a zeroth-order runtime reused across runs syncs in another order."""
    from fedpeft.cache import ProcessCache
    from fedpeft.config.load import load_config

    path = repo / "simulations" / scenario
    clear = load_config(path, ["federation.rounds=2", *EQUAL, *graph[2:]])
    secure = load_config(path, ["federation.rounds=2", *EQUAL, "secagg.enabled=true", *graph])
    simulate(clear, tmp_path / "clear", quiet=True, cache=ProcessCache())
    simulate(secure, tmp_path / "secure", quiet=True, cache=ProcessCache())
    a = _tensors(tmp_path / "clear" / "zo_state.safetensors")["coeffs"]
    b = _tensors(tmp_path / "secure" / "zo_state.safetensors")["coeffs"]
    assert torch.allclose(a, b, rtol=1e-6, atol=atol) and bool(a.abs().sum() > 0)
    assert torch.equal(a == 0, b == 0)  # directions no client used stay exactly 0
    rows = _rows(tmp_path / "secure")
    assert all(r["secagg_survivors"] == 4 and r["payload_up"] == 0 for r in rows[1:])
    want = (2, 2) if graph else (3, 2)  # 4 clients: all 3 others, a majority by default
    assert {(r["secagg_neighbours"], r["secagg_threshold"]) for r in rows[1:]} == {want}


def _dropping(wrap, real: ClientApp, victim: int, stage: str) -> ClientApp:
    def secagg(msg: Message, ctx: Context) -> Message:
        mine = int(ctx.node_config["partition-id"]) == victim
        if mine and from_record(msg.content)["stage"] == stage:
            raise RuntimeError("the device lost power")
        return real(msg, ctx)

    return wrap(real, {"query.secagg": secagg})


@pytest.mark.parametrize("stage", ["keys", "share", "mask", "unmask"])
def test_a_client_dropping_during_secure_aggregation_loses_only_its_update(
    tiny_config, tmp_path, cache, wrap_app, stage
):
    cfg = tiny_config("federation.rounds=1", *EQUAL, "strategy.name=ffa", "secagg.enabled=true")
    n = cfg.federation.num_clients
    grid = InProcessGrid(
        _dropping(wrap_app, make_client_app(cfg, cache), 1, stage),
        [{"partition-id": i} for i in range(n)],
    )
    run_server(grid, cfg, tmp_path, RunReporter(tmp_path, 1, quiet=True), cache)
    row = _rows(tmp_path)[1]
    if stage == "unmask":  # its vector is in the sum; only its shares are missing
        assert row["secagg_survivors"] == 4 and row["failures"] == {}
        return
    assert row["secagg_survivors"] == 3 and row["client_ids"] == ["0", "2", "3"]
    assert row["failures"]["1"].startswith("timeout: dropped out of secure aggregation")
    # the same model as a clear round in which client 1 never answered
    clear = tiny_config("federation.rounds=1", *EQUAL, "strategy.name=ffa")
    grid2 = InProcessGrid(
        _dropping(wrap_app, make_client_app(clear, cache), 1, "-"),
        [{"partition-id": i} for i in range(n)],
    )

    real_train = grid2.send_and_receive

    def drop_train(messages, *, timeout=None):
        msgs = list(messages)
        replies = list(real_train(msgs, timeout=timeout))
        if any(m.metadata.message_type == "train.lora" for m in msgs):
            node1 = next(
                nd
                for nd in grid2.get_node_ids()
                if grid2.context(nd).node_config["partition-id"] == 1
            )
            replies = [r for r in replies if r.metadata.src_node_id != node1]
        return replies

    grid2.send_and_receive = drop_train  # type: ignore[method-assign]
    run_server(
        grid2, clear, tmp_path / "clear", RunReporter(tmp_path / "clear", 1, quiet=True), cache
    )
    assert row["eval_loss"] == pytest.approx(_rows(tmp_path / "clear")[1]["eval_loss"], abs=1e-6)


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ("strategy.name=hetlora", "'hetlora' is not linear"),
        ("robust.rule=median", "robust rules need each client's update; secagg hides them"),
        ("compress.up=int8", "not codec payloads: set compress.up = 'none'"),
    ],
)
def test_secagg_refuses_what_it_cannot_sum(tiny_config, override, reason):
    with pytest.raises(ConfigError, match=reason):
        tiny_config("secagg.enabled=true", override)


def test_distributed_dp_under_secure_aggregation(tiny_config, tmp_path, cache):
    """Clients clip and add their own noise; the released change equals central DP's clipped
    mean, with noise of std z C sqrt(m / min_clients) / k per trained coordinate."""
    from fedpeft.privacy import clip_and_noise

    base = ("federation.rounds=1", *EQUAL, "strategy.name=ffa", "dp.clip_norm=0.05")
    central = tiny_config(*base, "dp.noise_multiplier=1e-9")
    quiet = tiny_config(*base, "dp.noise_multiplier=1e-9", "secagg.enabled=true")
    loud = tiny_config(*base, "dp.noise_multiplier=1", "secagg.enabled=true")
    for name, cfg in (("central", central), ("quiet", quiet), ("loud", loud)):
        simulate(cfg, tmp_path / name, quiet=True, cache=cache)
    start = tiny_config(*base, "federation.rounds=1")
    a = _tensors(tmp_path / "central" / "adapter" / "adapter_model.safetensors")
    b = _tensors(tmp_path / "quiet" / "adapter" / "adapter_model.safetensors")
    c = _tensors(tmp_path / "loud" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)  # same clipped mean
    assert all(torch.equal(a[k], c[k]) for k in a if "lora_A" in k)  # frozen A: no noise
    noise = torch.cat([(c[k] - a[k]).reshape(-1) for k in a if "lora_B" in k])
    m, k, fewest = 4, 4, start.federation.min_clients
    unit = start.lora.alpha / start.lora.rank  # FFA keeps B at unit scale: s B (s = alpha / r)
    want = unit * 1.0 * 0.05 * (m / fewest) ** 0.5 / k
    assert float(noise.std()) == pytest.approx(want, rel=0.15)  # 768 draws: sd of sd ~2.6 %
    assert abs(float(noise.mean())) < 4.5 * want / noise.numel() ** 0.5  # 4.5 sigma: urandom
    eps = [r.get("dp_epsilon") for r in _rows(tmp_path / "loud")]
    assert eps[1] == pytest.approx(4.377, abs=1e-3)
    # the client-side step alone: clipped to the norm, frozen coordinates untouched
    v = clip_and_noise(np.array([3.0, 4.0, 9.0]), 1.0, 0.0, np.array([True, True, False]))
    assert v.tolist() == pytest.approx([0.6, 0.8, 0.0])


RAY_SMALL = ("model.name=tiny", "model.device=cpu", "federation.rounds=2", "train.local_steps=2",
             "data.max_examples_per_client=32", "eval.examples=8", "eval.max_new_tokens=4",
             "simulation.ray_num_cpus=1")  # fmt: skip


@pytest.mark.ray
def test_secure_scenario_on_ray_equals_in_process(repo, tmp_path):
    """The session's state lives in each node's Context.state, which Flower carries between
    the Ray actors that handle the stages (it used to live in one actor's process)."""
    from fedpeft.cache import ProcessCache
    from fedpeft.config.load import load_config

    cfg = load_config(repo / "simulations" / "secure.toml", RAY_SMALL)
    simulate(cfg, tmp_path / "inprocess", quiet=True, cache=ProcessCache())
    simulate(cfg, tmp_path / "ray", backend="ray", quiet=True)
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "inprocess" / adapter).read_bytes() == (
        tmp_path / "ray" / adapter
    ).read_bytes()
    rows = _rows(tmp_path / "ray")
    assert [r["secagg_survivors"] for r in rows[1:]] == [cfg.federation.num_clients] * 2
