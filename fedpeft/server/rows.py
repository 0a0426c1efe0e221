"""The metrics row of a round: losses, clients, failures, bytes and per-client choices."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedpeft.families import family_of
from fedpeft.server.exchange import Exchange, Instruction

__all__ = ["ZO_KEYS", "client_choices", "round_row"]

ZO_KEYS = ("sync_regens", "regens_per_step", "step_s", "forward_s")


def round_row(server_round: int, got: Exchange, asked: int, examples: int) -> dict[str, Any]:
    """A round's metrics row from what came back (``asked``: instructions sent;
    ``examples``: behind the new global model)."""
    updates, counts = got.contributors or got.updates, got.counts
    losses = [
        (u.header.num_examples, u.metrics["train_loss"])
        for u in updates
        if "train_loss" in u.metrics
    ]
    total = sum(n for n, _ in losses)
    row = {
        "round": server_round,
        # fsum: the order replies arrive in cannot change the last bits
        "train_loss": math.fsum(n * v for n, v in losses) / total if total else None,
        "clients": len(updates),
        "client_ids": sorted(u.header.client_id for u in updates),
        "failures": dict(sorted(got.failures.items())),
        "rejected": dict(sorted(got.rejected.items())),
        "num_examples": examples,
        "bytes_up": counts["bytes_up"],
        "bytes_down": counts["bytes_down"],
        "bytes_up_per_client": counts["bytes_up"] / max(len(updates), 1),
        "bytes_down_per_client": counts["bytes_down"] / max(asked, 1),
        "payload_up": counts["payload_up"],
        "payload_down": counts["payload_down"],
        "train_s_max": max((u.metrics.get("train_s", 0.0) for u in updates), default=0.0),
        "local_steps_max": max((u.metrics.get("steps", 0.0) for u in updates), default=0.0),
    }
    peaks = {u.header.client_id: u.metrics["peak_mem_mb"] for u in updates
             if "peak_mem_mb" in u.metrics}  # fmt: skip
    if peaks:  # each client's measured peak training memory (fedpeft.client.memory)
        row["peak_mem_mb_max"] = max(peaks.values())
        row["client_peak_mem_mb"] = dict(sorted(peaks.items()))
    for key in ZO_KEYS:  # seed/scalar measurements reported by clients
        values = [u.metrics[key] for u in updates if key in u.metrics]
        if values:
            row[f"{key}_max"] = max(values)
    return row


def client_choices(instructions: Mapping[str, Instruction]) -> dict[str, Any]:
    """Per-client LoRA rank (when ranks differ or pruning is on) and pruning ratio."""
    chosen = {c: family_of(i).choices(i) for c, i in sorted(instructions.items())}
    ranks = {c: int(x["rank"]) for c, x in chosen.items() if "rank" in x}
    prune = {c: x["prune"] for c, x in chosen.items() if "prune" in x}
    out: dict[str, Any] = {}
    if len(set(ranks.values())) > 1 or prune:
        out["client_ranks"] = ranks
    if prune:
        out["client_prune"] = prune
    return out
