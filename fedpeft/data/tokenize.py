"""Tokenization and batching for causal-LM fine-tuning on (prompt, target) pairs.

The loss covers only the target tokens (and the end-of-sequence token that teaches the
model to stop); prompt and padding positions get label ``-100``. Training batches are padded
on the right, generation batches on the left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft.data.tasks import TextPair

__all__ = ["Example", "collate", "collate_prompts", "encode_pairs", "encode_prompt"]

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """Token ids of prompt + target (+ EOS); the first ``prompt_len`` are the prompt."""

    input_ids: tuple[int, ...]
    prompt_len: int


def encode_prompt(tokenizer: Any, prompt: str, chat_template: bool = False) -> list[int]:
    """Token ids of a prompt, optionally wrapped in the tokenizer's chat template."""
    if chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def encode_pairs(
    tokenizer: Any, pairs: Sequence[TextPair], max_len: int, chat_template: bool = False
) -> list[Example]:
    """Tokenize pairs, fitting each into ``max_len`` tokens.

    A target that fits is followed by EOS; a target that does not is cut and gets no EOS
    (so the model is never taught to stop mid-sentence). A prompt longer than the budget
    keeps its last tokens.
    """
    eos = tokenizer.eos_token_id
    out: list[Example] = []
    targets = tokenizer([p.target for p in pairs], add_special_tokens=False)["input_ids"]
    for pair, t in zip(pairs, targets, strict=True):
        p = encode_prompt(tokenizer, pair.prompt, chat_template)
        if max_len - len(p) < 2:
            p = p[-(max_len - 2) :]
        room = max_len - len(p)
        seq = p + list(t) + [eos] if len(t) + 1 <= room else p + list(t)[:room]
        out.append(Example(input_ids=tuple(seq), prompt_len=len(p)))
    return out


def collate(batch: Sequence[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels``, each ``(B, T)``."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, e.prompt_len : n] = ids[i, e.prompt_len : n]
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


def collate_prompts(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Left-padded prompt ``input_ids`` and ``attention_mask`` ``(B, T)`` for generation."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(list(p))
            mask[i, width - len(p) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
