"""Every benchmark script, run at its smallest size (``--quick``), with its values checked.

Each script runs in its own process, as a user runs it, and writes its JSON result into a
temporary folder (``FEDPEFT_BENCH_RESULTS``). The numbers a quick run measures (seconds,
losses) mean nothing, so the checks are on what must hold at any size: sizes computed here
by hand from the tiny model's shape, invariants (same initial model, same eval loss), and the
properties each table exists to show (fewer bytes, an attacker's update rejected, a planted
bug killed).

The tiny model (``fedpeft.models._tiny``): hidden 64, 4 query heads and 2 key/value heads of
16 (k/v width 32), FFN 128, vocabulary 384, untied head.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"

# per layer: q 64x64, k 64x32, v 64x32, o 64x64, gate/up/down 64x128, two norms of 64
LAYER = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
TINY_PARAMS = 2 * 384 * 64 + 2 * LAYER + 64  # embeddings, head, 2 layers, final norm
# LoRA on q_proj (64 -> 64) and v_proj (64 -> 32), both layers: A (r x 64) + B (out x r)
TINY_LORA = {r: 2 * (r * 64 + 64 * r + r * 64 + 32 * r) for r in (4, 8)}

pytestmark = pytest.mark.sim


def _run(tmp_path: Path, script: str, *args: str) -> tuple[str, Path]:
    """Run ``benchmarks/<script> --quick``; its output and its results folder."""
    results = tmp_path / "results"
    env = {**os.environ, "FEDPEFT_BENCH_RESULTS": str(results), "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out, results


def _json(results: Path, name: str) -> Any:
    return json.loads((results / name).read_text())


def test_hand_counted_sizes_of_the_tiny_model() -> None:
    """The counts below are the tiny model's own (and what the rest of this file relies on)."""
    from fedpeft.config import ModelConfig
    from fedpeft.models import load_model

    model = load_model(ModelConfig(name="tiny")).base_model
    assert sum(p.numel() for p in model.parameters()) == TINY_PARAMS == 123_200
    assert TINY_LORA == {4: 1_792, 8: 3_584}


def test_overhead(tmp_path: Path) -> None:
    out, results = _run(tmp_path, "overhead.py")
    got = _json(results, "overhead.json")
    assert list(got["results"]) == ["inprocess"]
    ip = got["results"]["inprocess"]
    # 4 clients each send back the tiny.toml rank-4 adapter in float32, plus Flower's framing
    assert ip["bytes_up_per_round"] >= 4 * 4 * TINY_LORA[4]
    assert ip["peak_rss_mib"] > 100 and 0 < ip["round_s"] < ip["wall_s"]
    assert "4 clients x 1 rounds" in out


def test_memory(tmp_path: Path) -> None:
    out, results = _run(tmp_path, "memory.py")
    got = _json(results, "memory_tiny.json")["results"]
    one, three = got["1"]["peak_rss_mib"], got["3"]["peak_rss_mib"]
    assert one > 100
    assert three < 1.5 * one  # clients share one base model: not three copies
    table = _json(results, "memory_precision_tiny.json")["results"]
    assert set(table) == {"float32", "nf4"}
    f32, nf4 = table["float32"], table["nf4"]
    # inference holds the weights: the tiny model's float32 parameters, 4 bytes each, and the
    # rotary embedding's two buffers of 8 inverse frequencies
    assert f32["inference"]["peak_mem_mib"] * 2**20 == 4 * TINY_PARAMS + 2 * 8 * 4
    assert nf4["inference"]["peak_mem_mib"] < f32["inference"]["peak_mem_mib"]
    for cases in (f32, nf4):
        lora, ckpt, zo = cases["lora"], cases["lora+ckpt"], cases["zo-lora"]
        assert ckpt["peak_mem_mib"] < lora["peak_mem_mib"]  # fewer activations kept
        assert ckpt["loss_after"] == lora["loss_after"]  # and the same model
        assert zo["peak_mem_mib"] < ckpt["peak_mem_mib"]  # forward passes only
        assert zo["peak_mem_mib"] < 1.2 * cases["inference"]["peak_mem_mib"]
    assert "refused" in nf4["zo-full"]  # a packed base cannot be perturbed in place
    assert f32["zo-full"]["peak_mem_mib"] > f32["zo-lora"]["peak_mem_mib"]
    assert "vs infer" in out


def test_mixed_precision(tmp_path: Path) -> None:
    out, results = _run(tmp_path, "mixed_precision.py")
    got = _json(results, "mixed_precision.json")["results"]
    full, half, nf4 = got["all float32"], got["half nf4"], got["all nf4"]
    # one coordinator model (float32) and one eval set: the same loss before training
    assert full["loss_before"] == half["loss_before"] == nf4["loss_before"]
    assert full["loss_after"] != nf4["loss_after"]  # the nodes trained on other bases
    # the same client on the same batches holds less on an nf4 base: even nodes in "half"
    peaks, ref, low = half["peak_mem_mib"], full["peak_mem_mib"], nf4["peak_mem_mib"]
    assert peaks["0"] < ref["0"] and peaks["2"] < ref["2"], (peaks, ref)
    assert peaks["1"] == ref["1"] and peaks["3"] == ref["3"], (peaks, ref)
    assert all(low[c] < ref[c] for c in ref), (low, ref)
    assert "half nf4" in out


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    """Without a GPU the CUDA parts say so and the CPU halves run: the directions of every
    tiny-model parameter hash the same in two processes, rounds train on the CPU."""
    out, results = _run(tmp_path, "gpu_check.py", "--dry-run")
    got = _json(results, "gpu_check.json")
    assert got["dry_run"] and got["model"] == "tiny"
    assert got["directions"]["same"]
    assert int(got["directions"]["cpu"]["elements"]) == TINY_PARAMS
    assert set(got["rounds"]) == {"float32 lora", "float32 zo-lora", "nf4 lora", "nf4 zo-lora"}
    for r in got["rounds"].values():
        assert r["peak_mem_mib"] > 0 and r["loss_after"] <= r["loss_before"] + 1e-3, r
    if not got["cuda"]:
        assert got["cuda_tests"].startswith("skipped") and got["auto_dtype"].startswith("skipped")
    assert "identical" in out


def test_compare(tmp_path: Path) -> None:
    out, results = _run(tmp_path, "compare.py")
    rows = _json(results, "compare.json")
    fed, cen = rows["federated"], rows["centralized"]
    assert fed["loss_before"] == cen["loss_before"]  # same initial model, same eval records
    assert fed["loss_after"] < fed["loss_before"] and cen["loss_after"] < cen["loss_before"]
    assert fed["up"] > 4 * TINY_LORA[4]
    assert "federated" in out and "centralized" in out


def test_zo_step(tmp_path: Path) -> None:
    _, results = _run(tmp_path, "zo_step.py")
    rows = {(r["target"], r["mode"]): r for r in _json(results, "zo_step.json")}
    modes = ("reference", "fused", "kept")
    assert set(rows) == {(t, m) for t in ("full", "lora") for m in modes}
    for (target, mode), r in rows.items():
        assert (r["policy"], r["load"], r["batch"]) == ("default", "quiet", "8x64")
        assert r["tuned_params"] == rows[(target, "reference")]["tuned_params"]
        # +eps, -eps and the fused restore+update each regenerate z, unless z is kept
        assert r["regens_per_step"] == (1 if mode == "kept" else 3)
        assert r["seeds"] == 64 and not r["sync_extrapolated"] and r["fused_on"]
        if mode != "kept":  # every coefficient != 0: one regeneration each
            assert r["sync_regens_measured"] == 64
    assert rows[("full", "fused")]["tuned_params"] > 1_000_000  # tiny at hidden 256: fused


def test_secagg(tmp_path: Path) -> None:
    _, results = _run(tmp_path, "secagg.py")
    rows = _json(results, "secagg.json")["rows"]
    assert [(r["vector"], r["n"], r["graph"]) for r in rows] == [
        ("lora-B 184k", 4, "complete"),
        ("zo K=4096", 4, "complete"),
    ]
    for r in rows:
        assert r["k"] == 3 and r["t"] >= 2
        assert r["max_abs_error"] < 1e-9  # the survivors' sum, exactly up to fixed point
        assert r["plain_bytes"] == 4 * r["dim"] and r["up_bytes"] > r["plain_bytes"]


def test_prune_size(tmp_path: Path) -> None:
    _, results = _run(tmp_path, "prune_size.py")
    rows = _json(results, "prune_size.json")["rows"]
    whole = 2 * 384 * 64 + 4 * LAYER + 64  # the 4-layer tiny model
    # ratio 0.5 on the 2 middle layers: 1 of 2 kv groups (q 64->32, k/v 64->16, o 32->64),
    # FFN 128 -> 64 channels
    pruned = 64 * 32 + 2 * 64 * 16 + 32 * 64 + 3 * 64 * 64 + 2 * 64
    assert [r["params"] for r in rows] == [whole, whole - 2 * (LAYER - pruned)]
    for r in rows:
        assert math.isclose(r["weights_mib"], 4 * r["params"] / 2**20)
        assert r["activations_mib"] > 0


def test_zo_compare(tmp_path: Path) -> None:
    out, results = _run(tmp_path, "zo_compare.py", "--out", str(tmp_path / "runs"))
    got = _json(results, "zo_compare.json")["results"]
    assert list(got) == ["fedkseed", "ferret", "fedavg-lora"]
    before = {s["before"]["eval_loss"] for s in got.values()}
    assert len(before) == 1  # the same initial model and eval records for every method
    # seed/scalar pairs against a rank-8 adapter in float32
    assert got["fedkseed"]["bytes_up_per_client_round"] < 4 * TINY_LORA[8] / 4
    assert got["fedavg-lora"]["bytes_up_per_client_round"] > 4 * TINY_LORA[8]
    assert "tiny model (--quick)" in out


def test_hetero(tmp_path: Path) -> None:
    _, results = _run(tmp_path, "hetero.py", "--out", str(tmp_path / "runs"))
    got = _json(results, "hetero.json")["results"]
    assert list(got) == ["fedavg r8 (all)", "flora", "codec int8"]
    plain, int8 = got["fedavg r8 (all)"], got["codec int8"]
    assert plain["payload_up_per_client_round"] == 4 * TINY_LORA[8]
    # one byte per value plus a scale per tensor
    assert TINY_LORA[8] < int8["payload_up_per_client_round"] < TINY_LORA[8] + 16 * 64
    assert all(math.isfinite(s["after"]["eval_loss"]) for s in got.values())


def test_quality(tmp_path: Path) -> None:
    out, results = _run(tmp_path, "quality.py", "--out", str(tmp_path / "runs"), "--jobs", "2")
    got = _json(results, "quality.json")
    lines = {x["row"]: x for x in got["lines"]}
    assert list(lines) == ["centralized", "fedavg", "scaffold", "fedsa"]
    runs = {r["row"]: r for r in got["runs"]}
    before = runs["centralized"]["summary"]["before"]["eval_loss"]
    assert all(r["summary"]["before"]["eval_loss"] == before for r in runs.values())  # one start
    assert lines["centralized"]["gain"] == [1.0]  # the reference recovers all of its own gain
    fedavg = runs["fedavg"]["summary"]["after"]["eval_loss"]
    assert lines["fedavg"]["gain"] == [
        (before - fedavg) / (before - runs["centralized"]["summary"]["after"]["eval_loss"])
    ]
    # FedSA-LoRA: B stays on the clients, so the global model is the base model and the
    # uploads carry A only (q: A 8x64; v: A 8x64 per layer, of the tiny model's 2 layers)
    assert runs["fedsa"]["summary"]["after"]["eval_loss"] == before
    assert runs["fedsa"]["summary"]["payload_up_per_client_round"] == 4 * 2 * (8 * 64 + 8 * 64)
    assert all(x["own_mean"] and x["own_worst"][0] >= x["own_mean"][0] for x in lines.values())
    assert "| fedsa | natural | 1 |" in out


def test_bandit(tmp_path: Path) -> None:
    _, results = _run(tmp_path, "bandit.py", "--out", str(tmp_path / "runs"))
    got = _json(results, "bandit.json")
    fits, pooled = "(i) least pruning that fits", "(iii) FedSpine pooled"
    assert list(got["table"]) == [fits, pooled] and got["reference"] == fits
    rows = got["rows"]
    assert len(rows[pooled]) == 3  # the evaluation before round 1, then 2 rounds
    arms = {(r, float(k)) for r, k in got["grid"]}
    tiers = {"0": "tx2", "1": "xavier-nx", "2": "agx"}
    for row in rows[fits][1:]:  # the TX2 pinned to the least pruned arm, the others whole
        assert {c: row[f"arm_ratio/{c}"] for c in row["client_ids"]} == {
            "0": 0.25,
            "1": 0.0,
            "2": 0.0,
        }
        assert set(row["device_eval_loss_tier"]) == set(tiers.values())
    for row in rows[pooled][1:]:
        for cid in row["client_ids"]:
            assert (row[f"arm_ratio/{cid}"], row[f"arm_rank/{cid}"]) in arms
    last = got["table"][fits]
    assert last["final_device_loss_mean"] == rows[fits][-1]["device_eval_loss_mean"]
    assert 0 <= last["final_device_rougeL_mean"] <= 1 and last["params_kept_last_round"] < 1
    assert got["targets"] == [rows[fits][1]["device_eval_loss_mean"],
                              rows[fits][2]["device_eval_loss_mean"]]  # fmt: skip
    final = got["targets"][1]  # the reference reaches its own final loss in its last round
    first = next(r["sim_wall_s"] for r in rows[fits][1:] if r["device_eval_loss_mean"] <= final)
    assert last["time_to_targets_s"]["all->" + format(final, ".4f")] == first


def test_attacks(tmp_path: Path) -> None:
    _, results = _run(tmp_path, "attacks.py", "--out", str(tmp_path / "runs"))
    got = _json(results, "attacks.json")
    assert set(got["lora"]) == {"sign_flip x4", "nonfinite"}
    assert set(got["lora"]["nonfinite"]) == {"none", "median"}
    # 1 attacker of 5 in 1 round: its non-finite update is rejected by validation
    assert got["lora"]["nonfinite"]["none"]["rejected"] == 1
    assert got["clean"]["rejected"] == 0
    assert got["clip_norm"] == got["clean"]["norm_max"] > 0
    assert set(got["zo"]["scalars x100"]) == {"none", "scalar_clip"}


@pytest.mark.deploy
def test_deploy(tmp_path: Path) -> None:
    _, results = _run(tmp_path, "deploy.py")
    (row,) = _json(results, "deploy.json")
    assert row["case"] == "floor" and row["rounds"] == 1
    assert row["same_final_loss"]  # deployed == in-process
    assert row["model_loads"] == [1, 1, 1, 1]  # each node's model worker loads once
    assert row["payload_up"] == row["payload_down"] == 4 * TINY_LORA[4]
    assert row["wire_up"] > row["flower_up"] > row["payload_up"]


def test_faults(tmp_path: Path) -> None:
    _, results = _run(tmp_path, "faults.py")
    got = _json(results, "faults.json")
    assert set(got) == {"errors", "pull"}
    clean, bloat = got["errors"]["clean"], got["errors"]["bloat"]
    assert clean["rounds"] == bloat["rounds"] == 2
    assert clean["failures"] == 0 and bloat["failures"] == 2  # client 1, each round
    assert bloat["metrics_bytes"] < 100_000  # the 3 MB error texts are not kept whole
    flower, bounded = got["pull"]["flower"], got["pull"]["bounded"]
    assert flower["pulled_bytes"] > 4 * 5_000_000 and not flower["rejected"]
    assert bounded["rejected"] and bounded["pulled_bytes"] < 4 * 5_000_000


def test_planted_bugs(tmp_path: Path) -> None:
    out, _ = _run(tmp_path, "planted_bugs.py")
    (line,) = [x for x in out.splitlines() if x.lstrip().startswith("4 ")]
    assert "pass" in line and "killed" in line and "SURVIVED" not in line


def test_every_planted_bug_still_applies() -> None:
    """Each planted bug's line occurs once in today's code (else the script cannot plant it)."""
    sys.path.insert(0, str(BENCH))
    try:
        from planted_bugs import BUGS
    finally:
        sys.path.remove(str(BENCH))
    assert len(BUGS) == 11
    for bug in BUGS:
        assert (REPO / bug.path).read_text().count(bug.old) == 1, bug.name


def test_mutation_report_names() -> None:
    """mutation.py is not smoke-run (its smallest size is the whole 22-minute run); its
    report's mapping from mutant to module, and its list of equivalent mutants, are checked."""
    import tomllib

    sys.path.insert(0, str(BENCH))
    try:
        from mutation import _equivalent, _module
    finally:
        sys.path.remove(str(BENCH))
    assert _module("fedpeft.secagg.shamir.x_split__mutmut_3") == "fedpeft/secagg/shamir.py"
    assert _module("fedpeft.wire.codecs.xǁInt8Codecǁencode__mutmut_1") == "fedpeft/wire/codecs.py"
    mutated = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mutmut"]
    for name, reason in _equivalent().items():
        assert _module(name) in mutated["only_mutate"], name
        assert reason, f"{name}: no reason given"


def test_oracle_scan_flags_an_expected_value_computed_by_the_code(tmp_path: Path) -> None:
    """The scan lists a test whose expected side calls the code under test (directly, or
    through a name assigned from it), and not one whose expected value is written by hand."""
    sample = tmp_path / "test_sample.py"
    sample.write_text(
        "from fedpeft.lora.rank_ops import product_norm\n\n\n"
        "def test_self(f):\n"
        "    want = product_norm(f)\n"
        "    assert product_norm(f) == want\n\n\n"
        "def test_by_hand(f):\n"
        "    assert product_norm(f) == 5.0\n"
    )
    proc = subprocess.run(
        [sys.executable, str(BENCH / "oracle_scan.py"), str(sample)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [x.split(": ")[1:3] for x in lines[:-1]] == [["reference", "test_self"],
                                                        ["compare", "test_self"]]  # fmt: skip
    assert lines[-1] == "2 candidates in 1 files"


def test_wire_floor(tmp_path: Path) -> None:
    out, results = _run(tmp_path, "wire_floor.py")
    runs = _json(results, "wire_floor.json")["runs"]
    assert set(runs) == {"floor, no byte count", "floor, exact byte count", "fedpeft round"}
    assert all(len(v) == 1 and v[0] > 0 for v in runs.values())
    assert "Framework overhead per client and round" in out


def test_scale(tmp_path: Path) -> None:
    out, results = _run(tmp_path, "scale.py")
    got = _json(results, "scale.json")
    memory = {(r["clients"], r["aggregation"]): r for r in got["memory"]}
    assert set(memory) == {(4, "batch"), (4, "stream"), (8, "batch"), (8, "stream")}
    for (n, _), r in memory.items():
        # n updates of the `small` shape (61,440 float32 values) came in, plus framing
        assert r["bytes_up"] > n * 61_440 * 4 and r["params"] == 61_440
        assert r["peak_rss_mib"] >= r["rss_before_mib"] > 100
    # the same clients give the same global on both paths
    assert memory[(8, "batch")]["global_b_abs_mean"] == pytest.approx(
        memory[(8, "stream")]["global_b_abs_mean"], rel=1e-6
    )
    overhead = got["overhead"]
    assert {(r["trainer"], r["serialize"]) for r in overhead} == {
        ("noop", True),
        ("noop", False),
        ("lora", False),
    }
    assert all(r["trained"] == 4 and r["ms_per_client"] > 0 for r in overhead)
    assert "stream peak RSS at 8 / at 4 clients" in out
    (pop,) = got["population"]  # a million clients, 100 of them a round
    assert (pop["population"], pop["discovery"], pop["trained"]) == (10**6, "sampled", 100)
    assert 0 < pop["start_s"] < pop["wall_s"] and "Population, tiny model" in out
