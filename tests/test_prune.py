"""Structured pruning: zeroing the pruned groups first gives the pruned model's outputs exactly
(a structural-correctness check), GQA and GPT-2 shapes stay consistent, bad input is refused."""

from __future__ import annotations

import pytest
import torch

from fedpeft.errors import ModelError
from fedpeft.prune.structure import Keep, layer_shapes, prune_layers

KEEP = {
    "llama": {0: Keep(attn=(0, 2), ffn=tuple(range(0, 96, 2))), 2: Keep(attn=(1,), ffn=(5, 7))},
    "gpt2": {1: Keep(attn=(0, 3), ffn=tuple(range(100))), 2: Keep(attn=(2,), ffn=(1, 9, 50))},
}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pruned_model_equals_zeroed_reference(arch, small_model, zeroed):
    def build():
        return small_model(arch)

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    reference = zeroed(build(), KEEP[arch])
    pruned = prune_layers(build(), KEEP[arch])
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits, pruned(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    n_full = sum(p.numel() for p in build().parameters())
    assert sum(p.numel() for p in pruned.parameters()) < n_full


def test_gqa_shapes_after_pruning(small_model):
    model = prune_layers(small_model("llama"), KEEP["llama"])
    a = model.model.layers[0].self_attn
    hd = a.head_dim  # 8; 2 of 3 KV groups kept, 2 query heads per group
    assert a.k_proj.weight.shape == (2 * hd, 48) and a.v_proj.weight.shape == (2 * hd, 48)
    assert a.q_proj.weight.shape == (4 * hd, 48) and a.o_proj.weight.shape == (48, 4 * hd)
    assert a.q_proj.out_features == 4 * hd and a.o_proj.in_features == 4 * hd
    assert [s.attn_groups for s in layer_shapes(model)] == [2, 3, 1]
    assert [s.ffn_channels for s in layer_shapes(model)] == [48, 96, 2]
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    # min_new_tokens: an early end-of-sequence token must not shorten the output
    out = model.generate(input_ids=ids, min_new_tokens=3, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


@pytest.mark.parametrize(
    ("keep", "match"),
    [
        ({0: Keep(attn=(), ffn=(1,))}, "at least one"),
        ({0: Keep(attn=(3,), ffn=(1,))}, r"0\.\.2"),
        ({0: Keep(attn=(1, 0), ffn=(1,))}, "sorted"),
        ({9: Keep(attn=(0,), ffn=(1,))}, "does not exist"),
    ],
)
def test_bad_keep_is_refused(keep, match, small_model):
    with pytest.raises(ModelError, match=match):
        prune_layers(small_model("llama"), keep)


def test_importance_uses_the_lora_gradient_estimate():
    """G = s (dB A + B dA): LoRA's view of dL/dW', positively aligned with the true gradient."""
    from fedpeft.prune.importance import element_importance

    g = torch.Generator().manual_seed(0)
    w, a, b = (
        torch.randn(6, 5, generator=g),
        torch.randn(2, 5, generator=g),
        torch.randn(6, 2, generator=g),
    )
    a.requires_grad_(True)
    b.requires_grad_(True)
    x = torch.randn(4, 5, generator=g)
    loss = ((x @ (w + 0.5 * b @ a).T) ** 2).sum()
    loss.backward()
    imp = element_importance(w, a.detach(), b.detach(), a.grad, b.grad, 0.5)
    grad_w = (2 * (x @ (w + 0.5 * b.detach() @ a.detach()).T)).T @ x  # dL/dW', (6, 5)
    est = 0.5 * (b.grad @ a.detach() + b.detach() @ a.grad)
    # the estimate is the projection of dL/dW' onto LoRA's tangent space: it agrees in sign
    # on average and its importance is a product with the merged weight
    assert torch.allclose(imp, (est * (w + 0.5 * b.detach() @ a.detach())).abs())
    assert float((est * grad_w).sum()) > 0


def test_choose_keep_ranks_groups_and_protects_ends():
    from fedpeft.prune.importance import GroupScores, choose_keep, reduce_groups
    from fedpeft.prune.structure import LayerShape

    shapes = [LayerShape(3, 8)] * 4
    scores = GroupScores(beta=0.5)
    for layer in range(4):
        attn = reduce_groups(torch.tensor([[1.0] * 8, [5.0] * 8, [3.0] * 8]).T, 1, 3)
        scores.add(layer, attn, torch.arange(8.0))
    keep = choose_keep(scores, shapes, ratio=0.5)
    assert set(keep) == {1, 2}  # first and last layers whole
    assert keep[1].attn == (1, 2) and keep[1].ffn == (4, 5, 6, 7)
    assert choose_keep(scores, shapes, ratio=0.0) == {}
    with pytest.raises(ValueError, match="ratio"):
        choose_keep(scores, shapes, ratio=1.0)


def test_masked_average_uses_exactly_the_clients_that_kept_each_coordinate():
    from fedpeft.prune.masked import Slice, masked_average, slice_for

    g = torch.Generator().manual_seed(0)
    full = [torch.randn(6, 4, generator=g) for _ in range(3)]  # what each client would hold
    kept = [((0, 1, 2, 3, 4, 5), None), ((0, 2, 4), (1, 3)), ((1, 2), None)]
    weights = [0.2, 0.3, 0.5]
    pieces = [
        Slice(slice_for(f, r, c), r if len(r) < 6 else None, c, w)
        for f, (r, c), w in zip(full, kept, weights, strict=True)
    ]
    previous = torch.full((6, 4), 7.0)
    out, count = masked_average(pieces, previous)
    for i in range(6):
        for j in range(4):
            who = [k for k, (r, c) in enumerate(kept) if i in r and (c is None or j in c)]
            want = sum(weights[k] * full[k][i, j] for k in who) / sum(weights[k] for k in who)
            assert torch.isclose(out[i, j], torch.as_tensor(want, dtype=torch.float32), atol=1e-6)
            assert count[i, j] == len(who)
    alone = masked_average([Slice(torch.ones(1, 4), (3,), None, 1.0)], previous)[0]
    assert torch.equal(alone[3], torch.ones(4)) and torch.equal(alone[0], previous[0])
    with pytest.raises(ValueError, match="does not match"):
        masked_average([Slice(torch.ones(2, 4), (3,), None, 1.0)], previous)
