"""Codecs: each round-trips within its documented bound; top-k with error feedback converges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.codecs import CodecSpec, ErrorFeedback, decode_tensor, encode_tensor
from fedpeft.errors import ProtocolError


def _x(seed=0, shape=(16, 40), scale=1e-2):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _roundtrip(x, codec):
    fields = encode_tensor(x, codec)
    return decode_tensor(fields, codec, tuple(x.shape), "t"), fields


def _nbytes(fields):
    return sum(v.nbytes for v in fields.values())


def test_fp16_bound():
    x = _x()
    y, fields = _roundtrip(x, CodecSpec("fp16"))
    bound = torch.maximum(x.abs() * 2.0**-11, torch.full_like(x, 2.0**-25))
    assert ((y - x).abs() <= bound).all()
    assert _nbytes(fields) == x.numel() * 2


def test_fp16_refuses_out_of_range():
    with pytest.raises(ProtocolError, match="fp16"):
        encode_tensor(torch.full((2, 2), 1e6), CodecSpec("fp16"))


def test_int8_bound_per_row():
    x = _x()
    x[3] *= 100  # rows of different magnitude keep their own scale
    y, fields = _roundtrip(x, CodecSpec("int8"))
    bound = x.abs().amax(dim=1, keepdim=True) / 254 * (1 + 1e-6)
    assert ((y - x).abs() <= bound).all()
    assert _nbytes(fields) == x.numel() + 4 * x.shape[0]


def test_int8_zero_rows():
    x = torch.zeros(3, 4)
    y, _ = _roundtrip(x, CodecSpec("int8"))
    assert torch.equal(y, x)


def test_topk_keeps_the_largest_exactly():
    x = _x()
    codec = CodecSpec("topk", ratio=0.1)
    y, fields = _roundtrip(x, codec)
    k = int(np.ceil(0.1 * x.numel()))
    kept = y != 0
    assert int(kept.sum()) == k
    assert torch.equal(y[kept], x[kept])
    assert x.abs()[~kept].max() <= x.abs()[kept].min()
    assert _nbytes(fields) == 8 * k


def test_compeft_sign_and_scale():
    x = _x()
    codec = CodecSpec("compeft", ratio=0.2, alpha=1.5)
    y, fields = _roundtrip(x, codec)
    kept = y != 0
    assert int(kept.sum()) == int(np.ceil(0.2 * x.numel()))
    assert torch.equal(torch.sign(y[kept]), torch.sign(x[kept]))
    scale = 1.5 * float(x.double().std(unbiased=False))
    assert torch.allclose(y[kept].abs(), torch.full_like(y[kept], scale), rtol=1e-6)
    assert _nbytes(fields) == (x.numel() + 7) // 8 + (int(kept.sum()) + 7) // 8 + 4


@pytest.mark.parametrize("name", ["fp16", "int8", "topk", "compeft"])
def test_malformed_fields_raise(name):
    codec = CodecSpec(name, ratio=0.1)
    fields = encode_tensor(_x(), codec)
    with pytest.raises(ProtocolError):
        decode_tensor(fields, codec, (8, 40), "t")  # wrong shape
    key = sorted(fields)[0]
    bad = dict(fields)
    bad[key] = bad[key].astype(np.float64)
    with pytest.raises(ProtocolError):
        decode_tensor(bad, codec, (16, 40), "t")


@pytest.mark.parametrize("name", ["topk", "compeft"])
def test_error_feedback_sum_of_sent_tracks_sum_of_true(name):
    """With feedback the gap between what was sent and what was meant stays bounded (it is
    the residual), so relative to the growing sum it vanishes; without it, it does not."""
    codec = CodecSpec(name, ratio=0.05)
    true = _x(1)  # a persistent update direction plus noise each round
    fb = ErrorFeedback()
    sent_sum, true_sum, plain_sum = (
        torch.zeros_like(true),
        torch.zeros_like(true),
        torch.zeros_like(true),
    )
    rel = []
    for t in range(60):
        u = true + _x(100 + t, scale=2e-3)
        x = fb.apply("k", u)
        fields = encode_tensor(x, codec)
        dec = decode_tensor(fields, codec, tuple(x.shape), "k")
        fb.record("k", x, dec)
        sent_sum += dec
        true_sum += u
        plain_sum += decode_tensor(encode_tensor(u, codec), codec, tuple(u.shape), "k")
        rel.append(float((sent_sum - true_sum).norm() / true_sum.norm()))
        if t == 29:
            residual_mid = float(fb.residual["k"].norm())
        assert torch.allclose(sent_sum + fb.residual["k"], true_sum, atol=1e-5)
    plain = float((plain_sum - true_sum).norm() / true_sum.norm())
    assert rel[-1] < 0.5 * rel[9]  # the gap shrinks relative to the sum ...
    assert float(fb.residual["k"].norm()) < 1.5 * residual_mid  # ... because it stays bounded
    assert plain > 2 * rel[-1]  # without feedback the dropped part is lost for good
    print(f"\n{name}: sent vs true after 60 rounds {rel[-1]:.3f} (no feedback: {plain:.3f})")
