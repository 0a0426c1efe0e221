"""Evaluation numbers against hand-computed values: loss, accuracy, Rouge-L."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.data.tokenize import Example
from fedpeft.evaluation import eval_loss, task_metric


class _Uniform(torch.nn.Module):
    """Logits that are all zero: every next token has probability 1 / vocab."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


class _Knows(torch.nn.Module):
    """Logit 0 on the true next token, ``-gap`` on every other."""

    def __init__(self, vocab: int, gap: float) -> None:
        super().__init__()
        self.vocab, self.gap = vocab, gap

    def forward(self, input_ids, attention_mask):
        logits = torch.full((*input_ids.shape, self.vocab), -self.gap)
        nxt = torch.roll(input_ids, -1, dims=1)  # position t predicts token t+1
        logits.scatter_(2, nxt.unsqueeze(-1), 0.0)
        return type("Out", (), {"logits": logits})()


EXAMPLES = [Example((5, 6, 7, 8), 2), Example((9, 3, 4), 1), Example((1, 2, 3, 4, 5, 6), 5)]
# target tokens scored: positions after the prompt (incl. the last): 2 + 2 + 1 = 5


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_eval_loss_of_a_uniform_model_is_log_vocab_over_target_tokens(batch_size):
    loss, tokens = eval_loss(_Uniform(50), EXAMPLES, batch_size, 0, torch.device("cpu"))
    assert tokens == 5 and loss == pytest.approx(math.log(50), rel=1e-6)


def test_eval_loss_of_a_confident_model():
    """Right token at logit 0, 49 others at -3: loss = log(1 + 49 e^-3) per target token."""
    loss, _ = eval_loss(_Knows(50, 3.0), EXAMPLES, 2, 0, torch.device("cpu"))
    assert loss == pytest.approx(math.log(1 + 49 * math.exp(-3.0)), rel=1e-6)


def test_accuracy_is_normalized_exact_match():
    preds = ["Paris", " yes   no ", "x", "a b"]
    refs = ["paris", "yes no", "y", "a  b"]
    assert task_metric("accuracy", preds, refs) == 0.75
    assert task_metric("accuracy", [], []) == 0.0


def test_rouge_l_is_the_lcs_f1_averaged_over_pairs():
    # "the cat sat" in "the cat sat on the mat": LCS 3, P = 3/3, R = 3/6 -> F1 = 2/3
    # "a b c d" vs "a c b d": LCS 3 ("a b d"), P = R = 3/4 -> F1 = 3/4
    got = task_metric("rougeL", ["the cat sat", "a b c d"], ["the cat sat on the mat", "a c b d"])
    assert got == pytest.approx((2 / 3 + 3 / 4) / 2, rel=1e-9)
    assert task_metric("rougeL", ["nothing shared"], ["entirely different"]) == 0.0
    assert task_metric("rougeL", ["same words"], ["same words"]) == 1.0
