"""What idemgate does with input built to confuse it, in a real Envoy 1.40, over HTTP/1.1
and HTTP/2 (h2c):

- paths: one normalized path for route matching, key scope and fingerprint (`/%6Frders`,
  `//orders`, `/x/../orders` are `/orders`), and prefix rules that match whole segments
  (`/orders` does not cover `/orders-admin`);
- JSON bodies that name a member twice get 400 `invalid-body` naming the member, and never
  reach the origin;
- generated ids do not follow from one another (they come from getrandom, not from a
  seeded generator that one id would reveal).
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Callable

import pytest

from harness import Envoy, Origin, free_port, listener
from httpclient import Resp, send

LISTENERS = {
    # /orders needs a key; other paths are covered only when a key is sent
    "paths": {
        "store": {"namespace": "paths"},
        "routes": [{"name": "orders", "match": {"prefix": "/orders"}, "key": {"required": True}}],
    },
    "bodykey": {
        "store": {"namespace": "bodykey"},
        "key": {"sources": [{"jsonPointer": "/idempotency_key"}], "required": True},
    },
    "canonical": {
        "store": {"namespace": "canonical"},
        "fingerprint": {"body": "canonicalJson", "excludePointers": ["/ts"]},
    },
    "ids": {"store": {"namespace": "ids"}, "correlation": {}},
}


@pytest.fixture(scope="module")
def origin():
    with Origin(verbose=False) as o:
        yield o


@pytest.fixture(scope="module")
def envoy(origin):
    specs = [listener(name, free_port(), cfg) for name, cfg in LISTENERS.items()]
    with Envoy(specs, origin_port=origin.port, concurrency=4) as e:
        yield e


@pytest.fixture(params=["h1", "h2c"])
def post(request: Any, envoy: Envoy) -> Callable[..., Resp]:
    """POST over HTTP/1.1 and over HTTP/2 (h2c), the path sent as it is."""

    def do(listener_name: str, path: str, body: bytes, headers: dict[str, str]) -> Resp:
        return send(envoy.port(listener_name), "POST", path, body, headers, proto=request.param)

    return do


def executions(origin: Origin, marker: str) -> int:
    return sum(1 for r in origin.requests() if marker in r["path"] and r.get("body_complete"))


def problem(r: Resp, status: int, slug: str) -> dict[str, Any]:
    assert r.status == status, r
    assert r.header("content-type") == "application/problem+json", r
    doc = r.json()
    assert doc["type"] == f"https://idemgate.dev/problems/{slug}", doc
    return doc


# ------------------------------------------------------------------------------- paths


def test_prefix_rules_match_whole_segments(post, origin):
    run = uuid.uuid4().hex
    # /orders and below: the route's rule (a key is required)
    for path in (f"/orders?run={run}", f"/orders/{run}"):
        problem(post("paths", path, b"{}", {}), 400, "missing-key")
    # /orders-admin is another resource: the top-level rule, which passes keyless requests
    r = post("paths", f"/orders-admin/{run}", b"{}", {})
    assert r.status == 200, r
    assert executions(origin, f"/orders-admin/{run}") == 1


def test_spellings_of_one_path_are_one_route_scope_and_fingerprint(post, origin):
    run = uuid.uuid4().hex
    key = {"Idempotency-Key": f"k-{run}"}
    body = b'{"amount": 5}'
    # route: the keyless encoded spelling is refused like /orders itself
    problem(post("paths", f"/%6Frders?run={run}", body, {}), 400, "missing-key")
    first = post("paths", f"/orders?run={run}", body, key)
    assert first.status == 200 and first.header("idempotent-replayed") is None, first
    # scope and fingerprint: each spelling is a retry of the same request
    for spelling in ("/%6Frders", "/%6frders", "//orders", "/x/../orders", "/./orders", "/%2E/orders"):
        again = post("paths", f"{spelling}?run={run}", body, key)
        assert again.status == 200, (spelling, again)
        assert again.header("idempotent-replayed") == "true", (spelling, again)
        assert again.body == first.body
    assert executions(origin, f"run={run}") == 1
    # a different path is a different scope: the key is free there
    other = post("paths", f"/orders/x?run={run}", body, key)
    assert other.status == 200 and other.header("idempotent-replayed") is None, other
    assert executions(origin, f"run={run}") == 2


# ------------------------------------------------------------------ repeated member names


def test_a_body_key_given_twice_is_refused_naming_it(post, origin):
    run = uuid.uuid4().hex
    body = f'{{"idempotency_key": "A-{run}", "amount": 1, "idempotency_key": "B-{run}"}}'.encode()
    r = post("bodykey", f"/pay?run={run}", body, {"Content-Type": "application/json"})
    doc = problem(r, 400, "invalid-body")
    assert '"idempotency_key" appears twice' in doc["detail"], doc
    assert executions(origin, f"run={run}") == 0
    # each of the two values alone is an ordinary key
    for v in ("A", "B"):
        ok = post("bodykey", f"/pay?run={run}", f'{{"idempotency_key": "{v}-{run}"}}'.encode(), {})
        assert ok.status == 200, ok
    assert executions(origin, f"run={run}") == 2


def test_a_repeated_member_anywhere_in_a_canonical_body_is_refused(post, origin):
    run = uuid.uuid4().hex
    key = {"Idempotency-Key": f"k-{run}"}
    body = b'{"order": {"items": [{"sku": "a", "qty": 1, "qty": 2}]}, "ts": 1}'
    doc = problem(post("canonical", f"/c?run={run}", body, key), 400, "invalid-body")
    assert '"qty" appears twice' in doc["detail"], doc
    assert executions(origin, f"run={run}") == 0
    # the same document without the repeat is fingerprinted canonically: order and the
    # excluded member do not matter
    first = post("canonical", f"/c?run={run}", b'{"order": {"items": [{"qty": 1, "sku": "a"}]}, "ts": 1}', key)
    assert first.status == 200, first
    again = post("canonical", f"/c?run={run}", b'{"ts": 2, "order": {"items": [{"sku": "a", "qty": 1.0}]}}', key)
    assert again.header("idempotent-replayed") == "true", again
    assert executions(origin, f"run={run}") == 1


# ------------------------------------------------------------------------------------ ids

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
M1, M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * M1) & MASK64
    z = ((z ^ (z >> 27)) * M2) & MASK64
    return z ^ (z >> 31)


def _unxorshift(y: int, s: int) -> int:
    x = y
    for _ in range(64 // s + 1):
        x = y ^ (x >> s)
    return x & MASK64


def _unmix(z: int) -> int:
    z = _unxorshift(z, 31)
    z = (z * pow(M2, -1, 1 << 64)) & MASK64
    z = _unxorshift(z, 27)
    z = (z * pow(M1, -1, 1 << 64)) & MASK64
    return _unxorshift(z, 30)


def _words(uuid_text: str) -> tuple[int, int]:
    h = uuid_text.replace("-", "")
    return int(h[:16], 16), int(h[16:], 16)


def _as_uuid_words(a: int, b: int) -> tuple[int, int]:
    """How a former build wrote two splitmix64 outputs as a UUID v4 (version and variant
    bits set)."""
    return (a & 0xFFFFFFFFFFFF0FFF) | 0x4000, (b & 0x3FFFFFFFFFFFFFFF) | 0x8000000000000000


def predicted_by(known: str, later: set[tuple[int, int]], horizon: int = 400) -> bool:
    """Whether `known`, read as two consecutive outputs of a splitmix64 stream (the former
    id generator), predicts any id in `later`: recover the state, then step it forward."""
    hi, lo = _words(known)
    for nibble in range(16):
        state = _unmix((hi & ~0xF000) | (nibble << 12))
        if _as_uuid_words(0, _mix((state + GOLDEN) & MASK64))[1] != lo:
            continue
        for k in range(1, horizon):
            s = (state + k * GOLDEN) & MASK64
            if _as_uuid_words(_mix(s), _mix((s + GOLDEN) & MASK64)) in later:
                return True
    return False


def test_the_predictor_breaks_a_seeded_stream():
    # the former generator: one seed, a counter; ids from two consecutive outputs, and other
    # tokens (owners, gates) drawn from the same stream in between
    seed, n = 0x1234_5678_9ABC_DEF0, 0
    stream = []
    for _ in range(40):
        n += 1
        stream.append(_mix((seed + n * GOLDEN) & MASK64))
    ids = []
    for i in (0, 7, 20):
        a, b = _as_uuid_words(stream[i], stream[i + 1])
        ids.append(f"{a:016x}{b:016x}")
    assert predicted_by(ids[0], {_words(x) for x in ids[1:]})


def test_generated_correlation_ids_are_random_uuid_v4(envoy, origin):
    run = uuid.uuid4().hex
    ids = []
    for i in range(24):
        r = send(envoy.port("ids"), "POST", f"/ids?run={run}", b"x", {"Idempotency-Key": f"{run}-{i}"})
        assert r.status == 200, r
        ids.append(r.header("x-correlation-id"))
    uuid_v4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
    assert all(i and uuid_v4.match(i) for i in ids), ids
    assert len(set(ids)) == len(ids)
    # the origin got the same id the client did
    sent = [r["headers"].get("x-correlation-id") for r in origin.requests() if f"run={run}" in r["path"]]
    assert sorted(sent) == sorted(ids)
    # 24 ids over 4 workers: several share a worker, which with a seeded stream would make
    # one predict another
    words = {_words(i) for i in ids}
    assert not any(predicted_by(i, words - {_words(i)}) for i in ids)
