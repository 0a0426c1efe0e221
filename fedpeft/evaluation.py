"""Evaluation of an adapter: loss on target tokens and the task metric from generation.

- Loss: mean cross-entropy over every target token (and EOS) of the held-out examples,
  weighted by tokens, so batch composition does not change it.
- Task metric: greedy generation from each prompt, cut at the first newline, compared with
  the reference by Rouge-L F1 (``rouge-score``, Lin 2004) for generation tasks or by exact
  match (case- and space-insensitive) for classification-as-generation tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedpeft.algorithms.base import AggregateResult
from fedpeft.cache import PROCESS_CACHE, ProcessCache
from fedpeft.config import RunConfig
from fedpeft.data.tasks import TextPair, format_pairs
from fedpeft.data.tokenize import (
    IGNORE,
    Example,
    collate,
    collate_prompts,
    encode_pairs,
    encode_prompt,
)
from fedpeft.errors import ModelError
from fedpeft.lora.handle import ModelHandle
from fedpeft.seeding import np_rng
from fedpeft.wire.messages import Adapter, LoraSpec
from fedpeft.zo.runtime import DirectionMask, get_runtime

__all__ = ["SAMPLES", "EvalSet", "Evaluator", "eval_loss", "generate", "task_metric"]

#: Held-out examples whose generations an :class:`Evaluator` keeps (the run's
#: ``predictions.jsonl``: before and after training).
SAMPLES = 5


@torch.no_grad()
def eval_loss(
    model: Any, examples: Sequence[Example], batch_size: int, pad_id: int, device: torch.device
) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over the target tokens of ``examples``, and the count."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # position t predicts token t+1: (B, T-1, V) against (B, T-1)
        shift_logits = logits[:, :-1].float()
        shift_labels = batch["labels"][:, 1:]
        total += float(
            F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]),
                shift_labels.reshape(-1),
                ignore_index=IGNORE,
                reduction="sum",
            )
        )
        count += int((shift_labels != IGNORE).sum())
    return total / max(count, 1), count


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
) -> list[str]:
    """Greedy continuations of token-id prompts, decoded and cut at the first newline."""
    outs: list[str] = []
    pad = tokenizer.pad_token_id
    for i in range(0, len(prompts), batch_size):
        batch = collate_prompts(prompts[i : i + batch_size], pad, device)
        gen = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = gen[:, batch["input_ids"].shape[1] :]  # (B, new_tokens)
        for row in tokenizer.batch_decode(new, skip_special_tokens=True):
            outs.append(row.strip().split("\n", 1)[0].strip())
    return outs


def task_metric(metric: str, predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean Rouge-L F1 (``rougeL``) or exact-match accuracy (``accuracy``), in [0, 1]."""
    if not predictions:
        return 0.0
    if metric == "accuracy":
        norm = [
            (" ".join(p.lower().split()), " ".join(r.lower().split()))
            for p, r in zip(predictions, references, strict=True)
        ]
        return sum(p == r for p, r in norm) / len(norm)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [
        scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)
    ]
    return float(sum(scores) / len(scores))


@dataclass(frozen=True)
class EvalSet:
    """Held-out examples, tokenized once: loss examples and generation prompts."""

    pairs: list[TextPair]
    examples: list[Example]
    prompts: list[list[int]]

    @classmethod
    def build(
        cls,
        cfg: RunConfig,
        records: Sequence[dict[str, Any]],
        tokenizer: Any,
        part: str = "eval",
    ) -> EvalSet:
        """A fixed seeded sample of ``eval.examples`` records (all if 0); with
        ``part="validation"`` the next ``eval.validation_examples`` of the same permutation
        (disjoint from the evaluated records; may be empty)."""
        order = np_rng(cfg.federation.seed, "eval-sample").permutation(len(records))
        n = cfg.eval.examples or len(records)
        pick = order[:n] if part == "eval" else order[n : n + cfg.eval.validation_examples]
        chosen = [records[int(i)] for i in sorted(pick)]
        pairs = format_pairs(chosen, cfg.data)
        examples = encode_pairs(tokenizer, pairs, cfg.train.max_seq_len, cfg.data.chat_template)
        prompts = [encode_prompt(tokenizer, p.prompt, cfg.data.chat_template) for p in pairs]
        return cls(pairs=pairs, examples=examples, prompts=prompts)


class Evaluator:
    """Evaluates global models on one held-out set with the process's shared model.

    Parameters
    ----------
    cfg : RunConfig
        For batch size, metric and generation budget.
    handle : ModelHandle
        The shared base model.
    evalset : EvalSet
        The held-out examples.
    cache : ProcessCache
        Where the process's zeroth-order runtimes live.
    mask : DirectionMask | None
        A seed/scalar variant's direction mask (what its global coefficients are over).
    """

    def __init__(
        self,
        cfg: RunConfig,
        handle: ModelHandle,
        evalset: EvalSet,
        cache: ProcessCache = PROCESS_CACHE,
        mask: DirectionMask | None = None,
    ) -> None:
        self.cfg = cfg
        self.handle = handle
        self.evalset = evalset
        self.cache = cache
        self.mask = mask
        #: the first :data:`SAMPLES` generations of every evaluation with the metric, in order
        self.samples: list[list[str]] = []

    def __call__(self, spec: LoraSpec, adapter: Adapter, with_metric: bool) -> dict[str, float]:
        """``eval_loss``, ``eval_tokens`` and ``eval_<metric>`` of a LoRA adapter."""
        name = self.handle.ensure_adapter(spec)
        self.handle.set_factors(name, adapter)
        model = self.handle.peft_model(name)
        model.eval()
        return self.evaluate_model(model, with_metric)

    def global_model(self, current: AggregateResult, with_metric: bool) -> dict[str, float]:
        """Evaluate a strategy's global model: a LoRA adapter or seed/scalar coefficients."""
        if current.zo is not None:
            rt = get_runtime(self.handle, current.zo.spec, self.cache, self.mask)
            rt.set_global(current.zo.coeffs, current.zo.version)
            with rt.model() as model:
                return self.evaluate_model(model, with_metric)
        if current.spec is None or current.adapter is None:
            raise ModelError("a global model has neither LoRA factors nor zo coefficients")
        return self(current.spec, current.adapter, with_metric)

    def evaluate_model(self, model: Any, with_metric: bool) -> dict[str, float]:
        """Loss (and the task metric) of ``model`` as it is now."""
        tok, dev, bs = self.handle.tokenizer, self.handle.device, self.cfg.eval.batch_size
        loss, tokens = eval_loss(model, self.evalset.examples, bs, tok.pad_token_id, dev)
        out = {"eval_loss": loss, "eval_tokens": float(tokens)}
        metric = self.cfg.data.metric
        if with_metric and metric != "none":
            preds = generate(
                model, tok, self.evalset.prompts, self.cfg.eval.max_new_tokens, bs, dev
            )
            out[f"eval_{metric}"] = task_metric(
                metric, preds, [p.target for p in self.evalset.pairs]
            )
            self.samples.append(preds[:SAMPLES])
        return out

    def predictions(self, before: bool) -> list[dict[str, str]]:
        """The first :data:`SAMPLES` held-out examples: prompt, reference, the last generation
        (``after``) and, if ``before``, the first one (the model before training)."""
        if not self.samples:
            return []
        rows = []
        for i, pair in enumerate(self.evalset.pairs[: len(self.samples[-1])]):
            row = {"prompt": pair.prompt, "reference": pair.target}
            if before:
                row["before"] = self.samples[0][i]
            rows.append({**row, "after": self.samples[-1][i]})
        return rows
