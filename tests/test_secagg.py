"""Secure aggregation: exact sums under dropouts at every stage, aborts, replays, primitives."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from fedpeft.errors import ConfigError, ProtocolError
from fedpeft.secagg import shamir
from fedpeft.secagg.client import SecAggAbort, SecAggClient
from fedpeft.secagg.crypto import expand_mask
from fedpeft.secagg.params import Encoding, default_degree, default_threshold, harary_graph
from fedpeft.secagg.server import SecAggServer
from fedpeft.secagg.session import run_session

CLIP = 1.0


def _vectors(n: int, dim: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.5, 0.5, dim) for _ in range(n)]


def _direct(clients: Mapping[int, SecAggClient], drop: Mapping[str, set[int]]):
    """A transport that calls the clients; ``drop[stage]`` never answer from that stage on."""
    gone: set[int] = set()

    def send(stage: str, requests: Mapping[int, dict[str, Any]]) -> dict[int, Any]:
        gone.update(drop.get(stage, set()))
        out = {}
        for cid, req in requests.items():
            if cid in gone:
                continue
            try:
                out[cid] = clients[cid].handle(req)
            except SecAggAbort:
                continue
        return out

    return send


def _exact_error(vectors, survivors, got) -> float:
    want = np.sum([vectors[i] for i in survivors], axis=0)
    return float(np.abs(got - want).max())


def _drop_set(graph: list[list[int]], t: int, size: int) -> set[int]:
    """``size`` clients whose loss leaves every client ``t`` live neighbours (the protocol's
    condition: at most ``k - t`` of any client's neighbours may drop)."""
    n = len(graph)
    for start in range(n):
        for step in range(1, n):
            drop = {(start + step * i) % n for i in range(size)}
            if len(drop) == size and all(len(set(graph[c]) - drop) >= t for c in range(n)):
                return drop
    raise AssertionError("no drop set satisfies the threshold")


@pytest.mark.parametrize(("n", "k", "t"), [(10, 0, 0), (10, 4, 2), (30, 0, 0), (30, 10, 5)])
@pytest.mark.parametrize("stage", [None, "keys", "share", "mask", "unmask"])
def test_sum_is_exact_with_30_percent_dropping_at_each_stage(n, k, t, stage):
    """Dropping "at" a stage: the clients never answer that stage's request (nor later)."""
    dim = 64
    vectors = _vectors(n, dim)
    server = SecAggServer(n, dim, CLIP, neighbours=k, threshold=t)
    clients = {i: SecAggClient(v) for i, v in enumerate(vectors)}
    drop = _drop_set(server.graph, server.t, math.ceil(0.3 * n)) if stage else set()
    result = run_session(server, _direct(clients, {stage: drop} if stage else {}))
    lost = drop if stage in ("keys", "share", "mask") else set()
    assert result.survivors == sorted(set(range(n)) - lost)
    step = CLIP / Encoding(CLIP, n).half
    assert _exact_error(vectors, result.survivors, result.total) <= n * step
    if stage:
        assert result.dropped[stage] == sorted(drop)


def test_fixed_point_sum_is_exact_in_integers():
    """The unmasked integer sum equals the sum of the encodings, bit for bit."""
    n, dim = 6, 33
    vectors = _vectors(n, dim, 1)
    enc = Encoding(CLIP, n)
    server = SecAggServer(n, dim, CLIP)
    clients = {i: SecAggClient(v) for i, v in enumerate(vectors)}
    result = run_session(server, _direct(clients, {"mask": {2}}))
    survivors = [0, 1, 3, 4, 5]
    ints = np.sum([enc.encode(vectors[i]) for i in survivors], axis=0, dtype=np.uint64)
    assert np.array_equal(result.total, enc.decode_sum(ints, len(survivors)))


def test_too_many_dropouts_fail_cleanly_and_reveal_nothing():
    n, dim = 10, 16
    server = SecAggServer(n, dim, CLIP)  # complete graph, t = 5
    clients = {i: SecAggClient(v) for i, v in enumerate(_vectors(n, dim))}
    with pytest.raises(ProtocolError, match="cannot recover the"):
        run_session(server, _direct(clients, {"unmask": set(range(6))}))


def _session(n: int = 5, dim: int = 8):
    server = SecAggServer(n, dim, CLIP)
    clients = {i: SecAggClient(v) for i, v in enumerate(_vectors(n, dim))}
    send = _direct(clients, {})
    r1 = send("keys", server.keys_requests())
    r2 = send("share", server.share_requests(r1))
    r3 = send("mask", server.mask_requests(r2))
    return server, clients, server.unmask_requests(r3)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda r: {**r, "dropped": [r["alive"][1]]}, "both alive and dropped"),
        (lambda r: {**r, "alive": [*r["alive"], r["alive"][1]]}, "twice"),
        (lambda r: {**r, "alive": r["alive"][1:], "dropped": [0]}, "this client as dropped"),
        (lambda r: {**r, "dropped": [99]}, "does not hold"),
        (lambda r: {**r, "alive": [0], "dropped": r["alive"][1:]}, "too many died"),
    ],
)
def test_client_aborts_a_malicious_unmask_request(tamper, reason):
    _, clients, requests = _session()
    with pytest.raises(SecAggAbort, match=reason):
        clients[0].handle(tamper(requests[0]))
    with pytest.raises(SecAggAbort, match="aborted"):  # and answers nothing more
        clients[0].handle(requests[0])


def test_client_never_reveals_both_secrets_of_one_peer():
    _, clients, requests = _session()
    first = clients[0].handle(requests[0])  # honest: client 1 alive -> its self-mask share
    assert 1 in first["ids"]
    flipped = dict(requests[0])
    flipped["alive"] = [a for a in requests[0]["alive"] if a != 1]
    flipped["dropped"] = [1]  # now asks for client 1's masking key too
    with pytest.raises(SecAggAbort, match="both kinds of secret of client 1"):
        clients[0].handle(flipped)


def test_replayed_and_out_of_order_requests_are_rejected():
    server = SecAggServer(4, 8, CLIP)
    clients = {i: SecAggClient(v) for i, v in enumerate(_vectors(4, 8))}
    keys = server.keys_requests()
    replies = {i: clients[i].handle(keys[i]) for i in range(4)}
    share = server.share_requests(replies)
    with pytest.raises(ProtocolError, match="out of order") as err:
        clients[0].handle({**share[0], "stage": "mask"})
    assert err.value.code == "replay"
    with pytest.raises(ProtocolError, match="another session"):
        clients[0].handle({**share[0], "session": b"\0" * 32})
    with pytest.raises(ProtocolError, match="out of order"):
        clients[0].handle(keys[0])  # stage 1 again
    clients[0].handle(share[0])  # the genuine request still works after the refusals
    # a share ciphertext from another session does not authenticate
    other = SecAggServer(4, 8, CLIP)
    oc = {i: SecAggClient(v) for i, v in enumerate(_vectors(4, 8))}
    o1 = {i: oc[i].handle(r) for i, r in other.keys_requests().items()}
    o2 = {i: oc[i].handle(r) for i, r in other.share_requests(o1).items()}
    replies2 = {i: clients[i].handle(share[i]) for i in range(1, 4)}
    replies2[0] = {"dst": o2[0]["dst"], "ct": o2[0]["ct"]}  # replayed from the other session
    mask = server.mask_requests(replies2)
    out = clients[1].handle(mask[1])
    assert out["bad"] == [0]  # client 0's replayed share fails; 0 will count as dropped


def test_a_client_sending_an_invalid_share_is_excluded_and_the_round_completes():
    n, dim = 8, 16
    vectors = _vectors(n, dim)
    server = SecAggServer(n, dim, CLIP)
    clients = {i: SecAggClient(v) for i, v in enumerate(vectors)}
    send = _direct(clients, {})

    def corrupting(stage, requests):
        replies = send(stage, requests)
        if stage == "share":  # client 3 garbles the share it sends to client 5
            r = replies[3]
            j = r["dst"].index(5)
            r["ct"][j] = r["ct"][j][:-1] + bytes([r["ct"][j][-1] ^ 1])
        return replies

    result = run_session(server, corrupting)
    assert 3 not in result.survivors and len(result.survivors) == n - 1
    assert _exact_error(vectors, result.survivors, result.total) < 1e-9


def test_server_ignores_replies_from_strangers_and_duplicates():
    server = SecAggServer(4, 8, CLIP)
    clients = {i: SecAggClient(v) for i, v in enumerate(_vectors(4, 8))}
    replies = {i: clients[i].handle(r) for i, r in server.keys_requests().items()}
    replies[7] = replies[0]  # not a participant
    server.share_requests(replies)
    assert server.ignored == 1


def test_shamir_any_t_shares_recover_fewer_fail():
    secret = bytes(range(32))
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    for combo in itertools.combinations(shares.values(), 3):
        assert shamir.combine(list(combo), 3) == secret
    with pytest.raises(ProtocolError, match="need 3"):
        shamir.combine(list(shares.values())[:2], 3)
    two = list(shares.values())[:2]
    with pytest.raises(ProtocolError, match="^shares repeat a point or lie outside the field$"):
        shamir.combine([two[0], two[0], two[1]], 3)


def _lagrange_at(points, x, prime):
    """The polynomial through ``points`` evaluated at ``x`` (written here, not shamir's)."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        term = yi
        for j, (xj, _) in enumerate(points):
            if i != j:
                term = term * (x - xj) * pow(xi - xj, -1, prime) % prime
        total = (total + term) % prime
    return total


@pytest.mark.parametrize("t", [2, 3, 5])
def test_shamir_polynomial_has_degree_t_minus_1_so_t_minus_1_shares_reveal_nothing(t):
    """t shares fix the polynomial; with t - 1 shares the secret is not determined: the
    degree-(t - 2) curve through them misses it, and so does every other share's value."""
    secret = bytes(range(1, 33))
    xs = list(range(1, t + 3))
    shares = shamir.split(secret, xs, t)
    points = [(x, int.from_bytes(shares[x][4:], "big")) for x in xs]
    p = shamir.PRIME
    assert _lagrange_at(points[:t], 0, p) == int.from_bytes(secret, "big")
    for x, y in points[t:]:  # every further share lies on the curve through the first t
        assert _lagrange_at(points[:t], x, p) == y
    # through t - 1 shares: a lower-degree curve that does not pass through the others
    assert _lagrange_at(points[: t - 1], 0, p) != int.from_bytes(secret, "big")
    assert _lagrange_at(points[: t - 1], points[t - 1][0], p) != points[t - 1][1]


def _share(x: int, y: int) -> bytes:
    """A share in the wire layout, written here: x as 4 big-endian bytes, y as 66."""
    return x.to_bytes(4, "big") + y.to_bytes(66, "big")


def test_shamir_share_layout_and_threshold_one():
    secret = bytes(range(100, 132))
    shares = shamir.split(secret, [3, 9], 1)  # threshold 1: every share is the secret itself
    assert shares == {3: _share(3, int.from_bytes(secret, "big")),
                      9: _share(9, int.from_bytes(secret, "big"))}  # fmt: skip
    assert shamir.combine([shares[9]], 1) == secret


def test_shamir_refuses_bad_input_with_a_reason():
    with pytest.raises(ValueError, match="secrets are 32 bytes, got 31"):
        shamir.split(bytes(31), [1, 2], 2)
    for xs, t in (([1, 2], 3), ([1, 2], 0), ([1, 1], 2), ([0, 1], 2)):
        with pytest.raises(ValueError, match="need distinct points >= 1 and 1 <= threshold"):
            shamir.split(bytes(32), xs, t)
    good = shamir.split(bytes(32), [1, 2], 2)
    with pytest.raises(ProtocolError, match="a share is 69 bytes, expected 70"):
        shamir.combine([good[1][:-1], good[2]], 2)
    with pytest.raises(ProtocolError, match="outside the field"):
        shamir.combine([_share(1, shamir.PRIME), good[2]], 2)
    with pytest.raises(ProtocolError, match="outside the field"):
        shamir.combine([_share(0, 5), good[2]], 2)


@pytest.mark.parametrize("value", [2**256, 2**256 + 12345, 2**287])
def test_shamir_shares_of_a_value_too_large_for_a_secret_are_refused(value):
    """Shares that interpolate to a value of more than 32 bytes (built here on a line through
    it) belong to no secret."""
    slope = 7
    shares = [_share(x, (value + slope * x) % shamir.PRIME) for x in (1, 2)]
    with pytest.raises(ProtocolError, match="^the shares do not belong to one secret$"):
        shamir.combine(shares, 2)
    top = [_share(x, (2**256 - 1 + slope * x) % shamir.PRIME) for x in (1, 2)]
    assert shamir.combine(top, 2) == b"\xff" * 32  # the largest secret is accepted


def test_pair_key_is_hkdf_sha256_of_the_x25519_secret_and_binds_its_info():
    """The reference is built here from the primitives: HKDF-SHA256 (no salt, 32 bytes) over
    X25519(a, B); both ends agree; another info gives another key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    from fedpeft.secagg.crypto import KeyPair, pair_key

    a, b = KeyPair(), KeyPair()
    shared = a.key.exchange(X25519PublicKey.from_public_bytes(b.public))
    want = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"ctx").derive(shared)
    assert pair_key(a, b.public, b"ctx") == want == pair_key(b, a.public, b"ctx")
    assert pair_key(a, b.public, b"other") != want
    with pytest.raises(ProtocolError) as err:
        pair_key(a, b"\x01" * 31, b"ctx")
    assert err.value.code == "structure" and str(err.value).startswith("bad X25519 public key: ")


def test_decrypt_refuses_a_tampered_or_misbound_share():
    from fedpeft.secagg.crypto import decrypt, encrypt

    key = bytes(range(32))
    blob = encrypt(key, b"share", b"aad")
    assert len(blob) == 12 + 5 + 16 and decrypt(key, blob, b"aad") == b"share"
    for bad in (blob[:-1] + bytes([blob[-1] ^ 1]), blob[:10]):
        with pytest.raises(ProtocolError) as err:
            decrypt(key, bad, b"aad")
        assert (err.value.code, str(err.value)) == ("decode", "a share failed authentication")
    with pytest.raises(ProtocolError, match="failed authentication"):
        decrypt(key, blob, b"other aad")


def test_encoding_is_computed_in_float64_whatever_the_input_dtype():
    enc = Encoding(1.0, 3)
    x32 = np.array([0.1, -0.7], np.float32)
    assert enc.encode(x32).tolist() == enc.encode(x32.astype(np.float64)).tolist()
    assert enc.encode(np.array([-5.0])).tolist() == [0]  # clipped at -clip: code 0
    total = np.sum([enc.encode(np.array([0.25, -1.0])) for _ in range(3)], axis=0)
    step = 1 / enc.scale  # one code: each of the 3 values is off by at most half of it
    assert enc.decode_sum(total, 3) == pytest.approx([0.75, -3.0], abs=1.5 * step, rel=0)


def test_harary_graph_of_even_degree_n_minus_2_is_not_complete():
    g = harary_graph(6, 4, b"x" * 32)  # a ring with 2 on each side: each misses one node
    assert all(len(nb) == 4 for nb in g)
    assert all(i not in nb for i, nb in enumerate(g))


def test_masks_are_full_entropy_keystreams():
    a, b = expand_mask(b"\1" * 32, 100_000), expand_mask(b"\2" * 32, 100_000)
    assert not np.array_equal(a[:8], b[:8])
    # seeds equal in their 32-bit XOR fold give different masks (Flower #7522 folds to 32 bits)
    s1 = b"\0" * 28 + b"\0\0\0\1"
    s2 = b"\0\0\0\1" + b"\0" * 28
    assert not np.array_equal(expand_mask(s1, 4), expand_mask(s2, 4))
    top = (a >> np.uint64(56)).astype(np.int64)  # top byte: uniform over 0..255
    counts = np.bincount(top, minlength=256)
    chi2 = float(((counts - len(a) / 256) ** 2 / (len(a) / 256)).sum())
    assert chi2 < 340  # 255 degrees of freedom: p > 0.0003
    assert int(a.max()) > 2**64 - 2**50  # the top of Z_2^64 is reached


def test_graph_is_regular_symmetric_and_degree_grows_slowly():
    g = harary_graph(100, 14, b"s" * 32)
    assert all(len(nb) == 14 for nb in g)
    assert all(i in g[j] for i, nb in enumerate(g) for j in nb)
    assert default_degree(10) == 9 and default_degree(100) == 16 and default_degree(1000) == 22


@pytest.mark.parametrize(
    ("n", "want"),
    [(2, 1), (17, 16), (18, 12), (32, 12), (33, 14), (1000, 22), (2**16, 34)],
)
def test_default_degree_is_everyone_up_to_17_then_2_ceil_log2_plus_2(n, want):
    assert default_degree(n) == want  # 18: 2 * 5 + 2; 33: 2 * 6 + 2; 2^16: 2 * 16 + 2


@pytest.mark.parametrize(("k", "want"), [(1, 1), (2, 2), (3, 2), (14, 8), (15, 8)])
def test_default_threshold_is_a_strict_majority(k, want):
    assert default_threshold(k) == want


def test_harary_graph_edges_and_bad_degrees():
    full = harary_graph(4, 3, b"x" * 32)  # k = n - 1: everyone, in order, no shuffle
    assert full == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    ring = harary_graph(7, 2, b"x" * 32)  # a 2-regular ring: one cycle through all 7
    assert all(len(nb) == 2 for nb in ring)
    seen, prev, node = [0], None, 0
    while True:
        nxt = next(j for j in ring[node] if j != prev)
        if nxt == 0:
            break
        seen.append(nxt)
        prev, node = node, nxt
    assert sorted(seen) == list(range(7))
    odd = harary_graph(8, 3, b"x" * 32)  # odd k: one more on each side, degree k + 1
    assert all(len(nb) == 4 for nb in odd)
    assert harary_graph(9, 4, b"a" * 32) == harary_graph(9, 4, b"a" * 32)
    assert harary_graph(9, 4, b"a" * 32) != harary_graph(9, 4, b"b" * 32)  # seeded shuffle
    for n, k in ((5, 0), (5, 5)):
        with pytest.raises(ConfigError, match=f"needs 1 <= neighbours <= n - 1 = 4, got {k}"):
            harary_graph(n, k, b"x" * 32)
    assert harary_graph(2, 1, b"x" * 32) == [[1], [0]]


def test_encoding_bits_and_bounds():
    assert Encoding(1.0, 1).bits == 52 and Encoding(1.0, 2**10).bits == 52
    assert Encoding(1.0, 2**11).bits == 51 and Encoding(1.0, 2**20 - 1).bits == 42
    enc = Encoding(2.0, 4)
    assert enc.half == 2**51 - 1 and enc.scale == (2**51 - 1) / 2.0
    assert enc.encode(np.array([0.0, 2.0, -2.0, 7.0])).tolist() == [
        2**51 - 1, 2 * (2**51 - 1), 0, 2 * (2**51 - 1)]  # fmt: skip
    for clip, n, what in ((0.0, 4, "clip range must be > 0"), (math.inf, 4, "clip range"),
                          (1.0, 0, "1..2^20 clients, got 0"),
                          (1.0, 2**20, "1..2^20 clients, got 1048576")):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(what)):
            Encoding(clip, n)
    Encoding(1.0, 2**20 - 1)


def test_encoding_never_wraps_and_is_precise():
    enc = Encoding(0.01, 1000)
    assert 1000 * (2**enc.bits - 1) < 2**63
    x = np.random.default_rng(0).uniform(-0.01, 0.01, 1000)
    back = enc.decode_sum(enc.encode(x), 1)
    assert np.abs(back - x).max() <= 0.01 / (2 * enc.half) + 1e-15
    zeros = np.sum([enc.encode(np.zeros(5)) for _ in range(7)], axis=0, dtype=np.uint64)
    assert enc.decode_sum(zeros, 7).tolist() == [0.0] * 5  # exactly: nothing moves
    assert math.isclose(enc.decode_sum(enc.encode(np.array([5.0])), 1)[0], 0.01)  # clipped


def _flower_app(vectors, fail_at: dict[int, str] | None = None):
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from fedpeft.secagg.flower import from_record, secagg_handler

    handler = secagg_handler(lambda ctx, w: vectors[int(ctx.node_config["partition-id"])] * w)
    app = ClientApp()

    @app.query("secagg")
    def secagg(msg: Message, ctx: Context) -> Message:
        pid = int(ctx.node_config["partition-id"])
        if (fail_at or {}).get(pid) == from_record(msg.content)["stage"]:
            raise RuntimeError("node went away")
        return handler(msg, ctx)

    return app


def test_over_flower_messages_with_a_node_failing_mid_session():
    from fedpeft.secagg.flower import grid_transport
    from fedpeft.simulation.inprocess import InProcessGrid

    n, dim = 6, 40
    vectors = _vectors(n, dim, 5)
    grid = InProcessGrid(
        _flower_app(vectors, fail_at={4: "mask"}),
        [{"partition-id": i} for i in range(n)],
        serialize=True,  # every message encoded and decoded as on the wire
    )
    nodes = {
        int(grid.context(node).node_config["partition-id"]): node for node in grid.get_node_ids()
    }
    counts: dict[str, int] = {}
    server = SecAggServer(n, dim, CLIP)
    result = run_session(server, grid_transport(grid, nodes, timeout=60, counts=counts))
    assert result.survivors == [0, 1, 2, 3, 5] and result.dropped["mask"] == [4]
    assert _exact_error(vectors, result.survivors, result.total) < 1e-9
    assert counts["bytes_up"] > 8 * dim * 5  # at least the masked vectors came back


def test_decoding_a_large_sum_is_exact_in_integers():
    """4,096 summands: the uint64 total is near 2^61, beyond float64's 2^53; the decoded sum is
    the exact integer sum of round(x * scale), converted once, over scale."""
    n = 4096
    enc = Encoding(1.0, n)
    x = np.linspace(-0.9, 0.93, n)
    total = np.sum([enc.encode(np.array([v])) for v in x], axis=0, dtype=np.uint64)
    scale = float(2**49 - 1)  # 62 - log2(4096) = 50 bits: H = 2^49 - 1 codes per unit of clip 1
    exact = sum(round(float(v) * scale) for v in x)  # Python ints: no rounding
    assert enc.decode_sum(total, n)[0] == float(exact) / scale
