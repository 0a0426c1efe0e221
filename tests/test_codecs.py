"""Codecs: each round-trips within its documented bound; top-k with error feedback converges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.errors import ProtocolError
from fedpeft.wire.codecs import CodecSpec, ErrorFeedback, decode_tensor, encode_tensor


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


# Hand-encoded payloads and the messages a malformed one gets (``where`` names the tensor).
W = "client 3 m.q_proj::A"


@pytest.mark.parametrize(
    ("name", "fields", "shape", "message"),
    [
        ("fp16", {}, (1, 2), f"{W}: codec field 'v' is missing (got [])"),
        ("fp16", {"v": np.zeros((1, 2), np.float32)}, (1, 2),
         f"{W}: codec field 'v' is float32, expected <class 'numpy.float16'>"),
        ("fp16", {"v": np.zeros((2, 1), np.float16)}, (1, 2),
         f"{W}: fp16 values are (2, 1), expected (1, 2)"),
        ("fp16", {"v": np.zeros((1, 2), np.float16)}, (-1, 2), f"{W}: negative shape (-1, 2)"),
        ("fp16", {"v": np.zeros((1, 2), np.float16)}, (1, -2), f"{W}: negative shape (1, -2)"),
        ("int8", {"q": np.zeros((1, 2), np.int8)}, (1, 2),
         f"{W}: codec field 's' is missing (got ['q'])"),
        ("int8", {"q": np.zeros((1, 2), np.int8), "s": np.zeros(2, np.float32)}, (1, 2),
         f"{W}: int8 fields (1, 2)/(2,) do not fit (1, 2)"),
        ("int8", {"q": np.zeros((2, 2), np.int8), "s": np.zeros(1, np.float32)}, (1, 2),
         f"{W}: int8 fields (2, 2)/(1,) do not fit (1, 2)"),
        ("topk", {"i": np.array([4], np.uint32), "v": np.ones(1, np.float32)}, (2, 2),
         f"{W}: top-k indices/values do not fit 4 entries"),
        ("topk", {"i": np.array([0, 1], np.uint32), "v": np.ones(1, np.float32)}, (2, 2),
         f"{W}: top-k indices/values do not fit 4 entries"),
        ("topk", {"i": np.zeros((1, 1), np.uint32), "v": np.ones((1, 1), np.float32)}, (2, 2),
         f"{W}: top-k indices/values do not fit 4 entries"),
        ("compeft", {"m": np.zeros(2, np.uint8), "g": np.zeros(0, np.uint8),
                     "s": np.ones(1, np.float32)}, (2, 2),
         f"{W}: compeft mask/scale do not fit 4 entries"),
        ("compeft", {"m": np.zeros(1, np.uint8), "g": np.zeros(0, np.uint8),
                     "s": np.ones(2, np.float32)}, (2, 2),
         f"{W}: compeft mask/scale do not fit 4 entries"),
        ("compeft", {"m": np.array([0b11000000], np.uint8), "g": np.zeros(2, np.uint8),
                     "s": np.ones(1, np.float32)}, (2, 2),
         f"{W}: compeft has 2 sign bytes for 2 kept entries"),
        ("compeft", {"m": np.zeros(1, np.uint8), "s": np.ones(1, np.float32)}, (2, 2),
         f"{W}: codec field 'g' is missing (got ['m', 's'])"),
    ],
)  # fmt: skip
def test_malformed_payloads_name_the_tensor_and_the_problem(name, fields, shape, message):
    with pytest.raises(ProtocolError) as err:
        decode_tensor(fields, CodecSpec(name=name), shape, W)
    assert str(err.value) == message


def test_hand_encoded_payloads_decode_to_known_tensors():
    x = torch.tensor([[1.0, -2.0], [0.0, 0.5]])
    assert torch.equal(decode_tensor({"v": x.numpy().astype(np.float16)}, CodecSpec("fp16"),
                                     (2, 2), W), x)  # fmt: skip
    q = {"q": np.array([[127, -64], [0, 1]], np.int8), "s": np.array([0.5, 2.0], np.float32)}
    assert decode_tensor(q, CodecSpec("int8"), (2, 2), W).tolist() == [[63.5, -32.0], [0.0, 2.0]]
    top = {"i": np.array([3, 0], np.uint32), "v": np.array([7.0, -1.0], np.float32)}
    assert decode_tensor(top, CodecSpec("topk"), (2, 2), W).tolist() == [[-1.0, 0.0], [0.0, 7.0]]
    # entries 0 and 2 kept; signs 1 (+) and 0 (-); scale 0.25
    comp = {"m": np.array([0b10100000], np.uint8), "g": np.array([0b10000000], np.uint8),
            "s": np.array([0.25], np.float32)}  # fmt: skip
    got = decode_tensor(comp, CodecSpec("compeft"), (2, 2), W)
    assert got.tolist() == [[0.25, 0.0], [-0.25, 0.0]]
    assert decode_tensor({"v": np.zeros((0, 3), np.float16)}, CodecSpec("fp16"), (0, 3),
                         W).shape == (0, 3)  # fmt: skip


def test_encoder_edges_by_hand():
    # fp16 carries its largest finite value; int8 codes are in [-127, 127] with max|row| / 127
    top = torch.tensor([[65504.0, -65504.0]])
    assert encode_tensor(top, CodecSpec("fp16"))["v"].tolist() == [[65504.0, -65504.0]]
    with pytest.raises(ProtocolError, match=r"^codecs take 2-D tensors, got shape \(3,\)$"):
        encode_tensor(torch.zeros(3), CodecSpec("int8"))
    enc = encode_tensor(torch.tensor([[254.0, -127.0, 0.0], [0.0, 0.0, 0.0]]), CodecSpec("int8"))
    assert enc["q"].tolist() == [[127, -64, 0], [0, 0, 0]]  # -63.5 rounds to even: -64
    assert enc["s"].tolist() == [2.0, 0.0] and enc["s"].dtype == np.float32
    # top-k: ties broken by position (the earlier of the equal magnitudes wins), >= 1 kept
    t = torch.tensor([[3.0, -3.0, 1.0, 3.0]])
    got = encode_tensor(t, CodecSpec("topk", ratio=0.5))
    assert got["i"].tolist() == [0, 1] and got["v"].tolist() == [3.0, -3.0]
    assert encode_tensor(t, CodecSpec("topk", ratio=0.01))["i"].tolist() == [0]
    # compeft: the kept entries' signs, alpha x population std; zeros are never kept (sign 0)
    c = encode_tensor(torch.tensor([[2.0, 0.0, -2.0, 0.0]]), CodecSpec("compeft", 0.75, 3.0))
    assert np.unpackbits(c["m"])[:4].tolist() == [1, 0, 1, 0]  # top 3 of 4, the zero left out
    assert np.unpackbits(c["g"])[:2].tolist() == [1, 0]
    assert c["s"].tolist() == pytest.approx([3.0 * 2**0.5], rel=1e-7)  # std(2, 0, -2, 0) = sqrt 2
    back = decode_tensor(c, CodecSpec("compeft"), (1, 4), W)
    assert back[0].tolist() == pytest.approx([3.0 * 2**0.5, 0.0, -3.0 * 2**0.5, 0.0])
    pair = encode_tensor(torch.tensor([[1.0, -1.0]]), CodecSpec("compeft", 1.0, 2.0))
    assert pair["s"].tolist() == [2.0]  # two entries: std(1, -1) = 1
    one = encode_tensor(torch.tensor([[5.0]]), CodecSpec("compeft", 1.0))
    assert one["s"].tolist() == [0.0]  # a single entry has no spread


def test_spec_refusals_decode_dtypes_and_messages_name_the_tensor():
    with pytest.raises(
        ProtocolError, match=r"^unknown codec 'zip'; known: none, fp16, int8, topk, compeft$"
    ):
        CodecSpec("zip")
    for bad in (0.0, 1.5):
        with pytest.raises(ProtocolError, match=rf"^codec ratio must be in \(0, 1\], got {bad}$"):
            CodecSpec("topk", ratio=bad)
    assert CodecSpec("topk", ratio=1.0).ratio == 1.0
    x = torch.tensor([[1.0, -2.0], [0.0, 0.5]])
    for name in ("fp16", "int8", "topk", "compeft"):
        enc = encode_tensor(x, CodecSpec(name, ratio=0.5))
        assert decode_tensor(enc, CodecSpec(name), (2, 2), W).dtype == torch.float32, name
        for key in enc:  # each field, mistyped: the message names the tensor
            bad = {**enc, key: enc[key].astype(np.float64)}
            with pytest.raises(ProtocolError, match=f"^{W}: codec field '{key}' is float64"):
                decode_tensor(bad, CodecSpec(name), (2, 2), W)
    empty = torch.zeros(2, 0)
    for name in ("fp16", "int8", "topk", "compeft"):  # no columns: an empty tensor, not an error
        enc = encode_tensor(empty, CodecSpec(name))
        assert decode_tensor(enc, CodecSpec(name), (2, 0), W).shape == (2, 0), name
    assert encode_tensor(empty, CodecSpec("compeft"))["s"].tolist() == [0.0]  # no spread


def test_topk_ties_follow_position_at_any_length():
    flat = torch.ones(1, 100_000)
    got = encode_tensor(flat, CodecSpec("topk", ratio=1e-4))["i"]
    assert got.tolist() == list(range(10))
