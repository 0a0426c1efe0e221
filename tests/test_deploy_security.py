"""The deployment's locks, one at a time, without Flower processes.

The front lets only clients with a node certificate through, forwards only the Fleet routes
and refuses oversize bodies before reading them; app signatures made by ``fedpeft server``
are accepted by Flower's own node-side verification and only for the operator's key; a reply
is not pulled past its limit (with Flower's own object store encoding); a child started with
``die_with_parent`` dies with its parent; a node explains why its SuperNode stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedpeft._flwr import REPLY_TOO_LARGE, GetFabResponse, pull_bounded, set_task_identity
from fedpeft.deploy.client_role import ActivationWatch
from fedpeft.deploy.credentials import make_operator_key, write_credentials
from fedpeft.deploy.proxy import FLEET_ROUTES, FleetProxy, ProxyServer, ServerTLS, client_tls
from fedpeft.deploy.signing import AppSignatures, attach_signature, trusted_entities
from fedpeft.errors import ProtocolError
from fedpeft.server.exchange import check_error
from fedpeft.testing import RecordedRuntime, http_grid_on


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    root = tmp_path_factory.mktemp("creds")
    return write_credentials(root, ["127.0.0.1", "localhost"], ["node0"])


class Echo:
    """An upstream that answers every POST with its path and body, and counts calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        self.calls.append(scope["path"])
        out = scope["path"].encode() + b"|" + body
        headers = [(b"content-type", b"application/octet-stream"),
                   (b"content-length", str(len(out)).encode())]  # fmt: skip
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})


@pytest.fixture(scope="module")
def front(creds):
    """An echo upstream over TLS on 127.0.0.1, behind a front that demands node certificates."""
    echo = Echo()
    upstream = ProxyServer(echo, "127.0.0.1", 0, ServerTLS(creds.server_cert, creds.server_key))
    upstream.start()
    proxy = FleetProxy(f"https://127.0.0.1:{upstream.port}", client_tls(creds.ca_cert),
                       max_body=1_000_000)  # fmt: skip
    tls = ServerTLS(creds.server_cert, creds.server_key, client_ca=creds.ca_cert)
    server = ProxyServer(proxy, "127.0.0.1", 0, tls)
    server.start()
    yield {"url": f"https://127.0.0.1:{server.port}", "echo": echo, "proxy": proxy,
           "upstream": upstream}  # fmt: skip
    server.stop()
    upstream.stop()


def _node(creds) -> httpx.Client:
    return httpx.Client(verify=client_tls(creds.ca_cert, creds.nodes["node0"].tls), timeout=30)


def test_front_forwards_fleet_routes_to_a_node_with_a_certificate(front, creds):
    with _node(creds) as node:
        for route in sorted(FLEET_ROUTES):
            r = node.post(front["url"] + route, content=b"proto-bytes")
            assert r.status_code == 200 and r.content == route.encode() + b"|proto-bytes"
    assert sorted(front["echo"].calls[-len(FLEET_ROUTES) :]) == sorted(FLEET_ROUTES)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/control/start-run"),  # flwr run
        ("POST", "/v1/control/stop-run"),  # flwr stop
        ("POST", "/v1/control/list-runs"),  # flwr ls
        ("POST", "/v1/control/register-node"),  # flwr supernode register
        ("POST", "/v1/fleet/register-node"),  # self-registration
        ("POST", "/v1/runtime/pull-messages"),  # the ServerApp's API
        ("GET", "/v1/fleet/pull-messages"),
        ("GET", "/docs"),
    ],
)
def test_front_refuses_everything_but_the_fleet_routes(front, creds, method, path):
    before = len(front["echo"].calls)
    with _node(creds) as node:
        r = node.request(method, front["url"] + path, content=b"x")
    assert r.status_code == 404 and r.content.startswith(b"refused: not-fleet")
    assert len(front["echo"].calls) == before  # never reached the SuperLink


def test_front_refuses_a_client_without_a_node_certificate(front, creds, tmp_path):
    # what an outsider holds: the CA certificate (every node has it), no node certificate
    with (
        httpx.Client(verify=client_tls(creds.ca_cert), timeout=30) as outsider,
        pytest.raises(httpx.HTTPError),
    ):
        outsider.post(front["url"] + "/v1/fleet/pull-messages", content=b"x")
    # a certificate from another CA does not do either
    other = write_credentials(tmp_path / "other", ["127.0.0.1"], ["rogue"])
    rogue = client_tls(creds.ca_cert, other.nodes["rogue"].tls)
    with httpx.Client(verify=rogue, timeout=30) as client, pytest.raises(httpx.HTTPError):
        client.post(front["url"] + "/v1/fleet/pull-messages", content=b"x")


def test_front_refuses_oversize_bodies_before_reading_them(front, creds):
    before = len(front["echo"].calls)
    with _node(creds) as node:
        r = node.post(front["url"] + "/v1/fleet/push-object", content=b"x" * 1_000_001)
        assert r.status_code == 413
        ok = node.post(front["url"] + "/v1/fleet/push-object", content=b"x" * 1_000_000)
        assert ok.status_code == 200
    assert len(front["echo"].calls) == before + 1
    assert front["proxy"].refused["too-large"] >= 1


def test_front_answers_503_while_the_superlink_is_down(creds):
    proxy = FleetProxy("https://127.0.0.1:9", client_tls(creds.ca_cert))  # nothing listens
    tls = ServerTLS(creds.server_cert, creds.server_key, client_ca=creds.ca_cert)
    server = ProxyServer(proxy, "127.0.0.1", 0, tls)
    server.start()
    try:
        with _node(creds) as node:
            r = node.post(f"https://127.0.0.1:{server.port}/v1/fleet/pull-messages", content=b"")
        assert r.status_code == 503 and not proxy.reachable  # Flower's SuperNode retries 503
    finally:
        server.stop()


# ------------------------------------------------------------------------ app signing
def _fab_response(content: bytes) -> bytes:
    response = GetFabResponse()
    response.fab.hash_str = hashlib.sha256(content).hexdigest()
    response.fab.content = content
    return bytes(response.SerializeToString())


def _verified_by_a_node(body: bytes, trusted_yaml: str) -> bool:
    """What Flower 1.41's SuperNode decides about a fetched app with ``--trusted-entities``."""
    from flwr.supercore.fab import Fab
    from flwr.supernode.start_client_internal import _verify_fab

    response = GetFabResponse()
    response.ParseFromString(body)
    fab = Fab(response.fab.hash_str, response.fab.content, dict(response.fab.verifications))
    if not fab.verifications.get("valid_license", ""):
        return False  # the node refuses: "App verification is not supported"
    return bool(_verify_fab(fab, yaml.safe_load(trusted_yaml)))


def test_a_signed_app_is_verified_by_flowers_own_node_check(creds, tmp_path):
    from fedpeft.deploy.signing import load_operator_key

    key, public = load_operator_key(creds.operator_key)
    store = AppSignatures(tmp_path / "apps")
    fab = b"PK\x03\x04 an app bundle"
    store.add(fab, key)
    signed = attach_signature(_fab_response(fab), store)
    trusted = creds.nodes["node0"].trusted.read_text()
    assert trusted == trusted_entities(public)
    assert _verified_by_a_node(signed, trusted)
    # another operator's key does not verify it; nor does the right key verify another app
    _, other_public = make_operator_key()
    assert not _verified_by_a_node(signed, trusted_entities(other_public))
    unsigned = _fab_response(b"PK\x03\x04 a foreign app")
    assert attach_signature(unsigned, store) == unsigned
    assert not _verified_by_a_node(unsigned, trusted)
    # a changed app under the signed app's hash: the hash is computed from the content
    forged = GetFabResponse()
    forged.ParseFromString(_fab_response(b"PK\x03\x04 changed"))
    forged.fab.hash_str = hashlib.sha256(fab).hexdigest()
    assert not _verified_by_a_node(attach_signature(forged.SerializeToString(), store), trusted)
    with pytest.raises(ProtocolError, match="does not parse"):
        attach_signature(b"\xff\xff not protobuf", store)


# ------------------------------------------------------------------------ bounded pull
def _reply(nbytes: int) -> tuple[Message, Message]:
    set_task_identity(7, 1)
    ins = Message(RecordDict(), 5, "train.lora")
    ins.metadata.__dict__["_message_id"] = ins.object_id
    # distinct values: Flower stores identical chunks once (content-addressed)
    big = ArrayRecord({"x": Array(np.arange(nbytes // 4, dtype=np.float32))})
    return ins, Message(RecordDict({"u": big}), reply_to=ins)


def test_a_reply_is_not_pulled_past_its_limit(tmp_path):
    ins, reply = _reply(40_000_000)  # eight distinct 5 MiB objects
    reply.metadata.__dict__["_message_id"] = reply.object_id
    runtime = RecordedRuntime(reply)
    grid = http_grid_on(runtime)
    [got] = pull_bounded(grid, [reply.object_id], {ins.metadata.message_id: 6_000_000})
    assert got.has_error() and got.error.code == REPLY_TOO_LARGE
    assert got.metadata.reply_to_message_id == ins.metadata.message_id
    with pytest.raises(ProtocolError) as err:
        check_error(got)
    assert err.value.code == "payload_size" and "larger than 6000000 bytes" in err.value.reason
    # pulling stopped early: at most the limit plus the objects already in flight
    assert runtime.pulled < 40_000_000 // 2
    assert runtime.confirmed == [reply.object_id]  # the SuperLink may drop it
    # within its limit the same reply arrives whole and equal
    grid = http_grid_on(RecordedRuntime(reply))
    [whole] = pull_bounded(grid, [reply.object_id], {ins.metadata.message_id: 10**9})
    assert not whole.has_error()
    assert np.array_equal(whole.content["u"]["x"].numpy(), reply.content["u"]["x"].numpy())


# ------------------------------------------------------------------------ processes
def test_a_child_started_with_die_with_parent_dies_with_its_parent(tmp_path):
    script = (
        "import sys, time\n"
        "from fedpeft.deploy.procs import start, flower_env\n"
        "child = start([sys.executable, '-c', 'import time; time.sleep(600)'], flower_env(),"
        " die_with_parent=True)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              start_new_session=True)  # fmt: skip
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # alive
    parent.send_signal(signal.SIGKILL)  # no cleanup of its own: the kernel must do it
    parent.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the child outlived its SIGKILLed parent")


def test_a_node_says_why_its_supernode_stopped():
    watch = ActivationWatch()
    refused = json.dumps({"detail": "Failed to activate SuperNode."}).encode()
    assert watch("/v1/fleet/activate-node", 412, refused) == refused  # passes unchanged
    connected, refusal = watch.reset()
    why = ActivationWatch.explain(0, connected, refusal, Path("node.key"))
    assert "(Failed to activate SuperNode.)" in why
    assert "not registered there" in why and "previous session" in why
    watch("/v1/fleet/activate-node", 200, b"")
    watch("/v1/fleet/pull-messages", 401, b"")
    why = ActivationWatch.explain(0, *watch.reset(), Path("node.key"))
    assert why.startswith("the coordinator dropped this node's session")
    assert watch.reset() == (False, "")
