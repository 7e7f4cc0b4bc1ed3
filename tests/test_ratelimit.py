"""Rate limiting and metrics in a real Envoy (Docker, --concurrency 4). The scenarios run over
HTTP/1.1 and h2c (the `wire` fixture); the load test and the exact-counter script over HTTP/1.1."""

from __future__ import annotations

import concurrent.futures
import json
import re
import threading
import time
import uuid

import pytest

from harness import Envoy, Origin, free_port, listener
from httpclient import Wire, send

LISTENERS = {
    # 2 requests/s, burst 5, per x-api-key
    "rl": {"store": {"namespace": "rl"}, "rateLimit": {"rate": 2, "periodSeconds": 1, "burst": 5, "callerHeaders": ["x-api-key"]}},
    # 1 request/hour, burst 4: no refill during a test
    "rlslow": {
        "store": {"namespace": "rlslow"},
        "rateLimit": {"rate": 1, "periodSeconds": 3600, "burst": 4, "callerHeaders": ["x-api-key"], "resetFormat": "epoch"},
    },
    # Slab5-style envelope with retry_after_seconds
    "rlenv": {
        "store": {"namespace": "rlenv"},
        "rateLimit": {"rate": 1, "periodSeconds": 3600, "burst": 1, "callerHeaders": ["x-api-key"]},
        "errors": {
            "format": "envelope",
            "envelope": {"error": {"code": "{{code}}", "message": "{{message}}", "retry_after_seconds": "{{retryAfterSeconds}}"}},
            "codes": {"rateLimited": "rate_limited"},
        },
    },
    # 10/s burst 20, for the 4-worker bound
    "rlfast": {"store": {"namespace": "rlfast"}, "rateLimit": {"rate": 10, "periodSeconds": 1, "burst": 20, "callerHeaders": ["x-api-key"]}},
    # the key is in the JSON body, so requests are charged at body time; 1/hour, burst 5
    "rlbody": {
        "store": {"namespace": "rlbody"},
        "maxBodyBytes": 100,
        "key": {"sources": [{"jsonPointer": "/id"}], "required": True},
        "rateLimit": {"rate": 1, "periodSeconds": 3600, "burst": 5, "callerHeaders": ["x-api-key"]},
        "routes": [{"name": "optional", "match": {"prefix": "/opt"}, "key": {"sources": [{"jsonPointer": "/id"}]}}],
    },
    # waiters (wait policy) are charged when their wait ends, as what it ends as
    "rlwait": {
        "store": {"namespace": "rlwait"},
        "rateLimit": {"rate": 1, "periodSeconds": 3600, "burst": 5, "callerHeaders": ["x-api-key"]},
        "onConcurrent": {"action": "wait", "waitMillis": 5000},
        "routes": [{"name": "brief", "match": {"prefix": "/brief"}, "onConcurrent": {"action": "wait", "waitMillis": 200}}],
    },
    # scripted metrics run
    "metrics": {
        "store": {"namespace": "metrics", "capacity": 8, "probes": 8},
        "leaseSeconds": 2,
        "maxBodyBytes": 1000,
        "maxResponseBytes": 1000,
        "routes": [
            {"name": "limited", "match": {"prefix": "/rl"}, "rateLimit": {"rate": 1, "periodSeconds": 3600, "burst": 2, "callerHeaders": []}},
            {"name": "required", "match": {"prefix": "/req"}, "key": {"required": True}},
        ],
    },
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


def caller() -> str:
    return "caller-" + uuid.uuid4().hex[:8]


@pytest.fixture(params=["h1", "h2c"])
def wire(request: pytest.FixtureRequest) -> Wire:
    """HTTP/1.1 or h2c, framing bodies in turn every way it can (see tests/httpclient.py)."""
    return Wire(request.param)


def test_burst_then_429_with_headers_then_refill(envoy, origin, wire):
    port = envoy.port("rl")
    me = caller()
    path = f"/r/{uuid.uuid4().hex}"
    remaining = []
    for _ in range(5):
        r = wire.send(port, "GET", path, headers={"x-api-key": me})
        assert r.status == 200
        assert r.header("x-ratelimit-limit") == "5"
        remaining.append(int(r.header("x-ratelimit-remaining")))
        assert int(r.header("x-ratelimit-reset")) >= 1
    assert remaining == [4, 3, 2, 1, 0] or remaining[-1] <= 1, remaining  # refill may add one
    limited = None
    for _ in range(3):
        r = wire.send(port, "GET", path, headers={"x-api-key": me})
        if r.status == 429:
            limited = r
            break
    assert limited is not None, "no 429 after the burst"
    assert limited.header("content-type") == "application/problem+json"
    doc = limited.json()
    assert doc["type"].endswith("rate-limited") and doc["status"] == 429
    assert int(limited.header("retry-after")) >= 1
    assert limited.header("x-ratelimit-remaining") == "0"
    assert limited.header("x-ratelimit-limit") == "5"
    seen_before = len([x for x in origin.requests() if x["path"] == path])
    assert seen_before <= 6  # the 429s never reached the origin
    time.sleep(1.1)  # 2/s: at least two tokens back
    assert wire.send(port, "GET", path, headers={"x-api-key": me}).status == 200
    assert wire.send(port, "GET", path, headers={"x-api-key": me}).status == 200


def test_two_callers_do_not_share_a_bucket(envoy, wire):
    port = envoy.port("rlslow")
    a, b = caller(), caller()
    for _ in range(4):
        assert wire.send(port, "GET", "/x", headers={"x-api-key": a}).status == 200
    assert wire.send(port, "GET", "/x", headers={"x-api-key": a}).status == 429
    r = wire.send(port, "GET", "/x", headers={"x-api-key": b})
    assert r.status == 200 and r.header("x-ratelimit-remaining") == "3"


def test_reset_as_epoch_seconds(envoy, wire):
    r = wire.send(envoy.port("rlslow"), "GET", "/x", headers={"x-api-key": caller()})
    reset = int(r.header("x-ratelimit-reset"))
    assert abs(reset - (time.time() + 3600)) < 120, reset


def test_replays_do_not_spend_quota(envoy, wire):
    port = envoy.port("rlslow")
    me = caller()
    h = {"x-api-key": me, "Idempotency-Key": uuid.uuid4().hex}
    first = wire.send(port, "POST", "/pay", b'{"a":1}', h)
    assert first.status == 200 and first.header("x-ratelimit-remaining") == "3"
    for _ in range(5):
        r = wire.send(port, "POST", "/pay", b'{"a":1}', h)
        assert r.header("idempotent-replayed") == "true"
        assert r.header("x-ratelimit-remaining") == "3"  # a correct retry is never punished
    r = wire.send(port, "POST", "/pay", b'{"a":2}', {"x-api-key": me, "Idempotency-Key": uuid.uuid4().hex})
    assert r.status == 200 and r.header("x-ratelimit-remaining") == "2"


def test_limited_first_request_never_reaches_origin_and_frees_its_key(envoy, origin, wire):
    port = envoy.port("rlenv")
    me = caller()
    assert wire.send(port, "GET", "/x", headers={"x-api-key": me}).status == 200
    path = f"/p/{uuid.uuid4().hex}"
    key = uuid.uuid4().hex
    r = wire.send(port, "POST", path, b"{}", {"x-api-key": me, "Idempotency-Key": key})
    assert r.status == 429
    doc = r.json()
    assert doc["error"]["code"] == "rate_limited"
    assert doc["error"]["retry_after_seconds"] == int(r.header("retry-after")) >= 1
    assert [x for x in origin.requests() if x["path"] == path] == []
    # the key was not left claimed: another caller with quota can use it at once
    r = wire.send(port, "POST", path, b"{}", {"x-api-key": caller(), "Idempotency-Key": key})
    assert r.status == 200


def test_requests_refused_at_body_time_spend_quota(envoy, origin, wire):
    """A body that is not JSON, a key missing from the body, a body over maxBodyBytes (no
    content-length, so only found while buffering) and a request without a key that passes
    untouched each spend quota once; past the burst every request gets the 429."""
    port = envoy.port("rlbody")
    me = caller()
    h = {"x-api-key": me}
    path = f"/b/{uuid.uuid4().hex}"
    sent = [
        (400, wire.send(port, "POST", path, b"{not json", h)),
        (400, wire.send(port, "POST", path, b"{}", h)),
        (413, wire.send(port, "POST", path, b'{"id": "' + b"x" * 200 + b'"}', h, chunked=True)),
        (200, wire.send(port, "POST", "/opt" + path, b"{}", h)),
        (400, wire.send(port, "POST", path, b'{"id": {"nested": 1}}', h)),
    ]
    assert [r.status for _, r in sent] == [want for want, _ in sent], [str(r) for _, r in sent]
    assert [r.header("x-ratelimit-remaining") for _, r in sent] == ["4", "3", "2", "1", "0"]
    assert {r.header("x-ratelimit-limit") for _, r in sent} == {"5"}
    # the burst is spent: bad and good requests alike are refused, each with the headers
    for body in (b"{not json", b'{"id": "fine"}', b"{}"):
        r = wire.send(port, "POST", path, body, h)
        assert r.status == 429, str(r)
        assert r.header("content-type") == "application/problem+json"
        assert int(r.header("retry-after")) >= 1
        assert r.header("x-ratelimit-remaining") == "0" and r.header("x-ratelimit-limit") == "5"
    # the 429s were not charged again: another caller is untouched, and the refused valid
    # request never reached the origin
    r = wire.send(port, "POST", path, b'{"id": "fine"}', {"x-api-key": caller()})
    assert r.status == 200 and r.header("x-ratelimit-remaining") == "4"
    assert len([x for x in origin.requests() if x["path"] == path]) == 1
    assert len([x for x in origin.requests() if x["path"] == "/opt" + path]) == 1


def test_waiters_are_charged_as_what_their_wait_ends_as(envoy, origin, wire):
    """A waiter answered with the first request's response is a replay (free); one whose
    wait runs out (409) is charged once; both answers carry the rate-limit headers."""
    port = envoy.port("rlwait")
    h = {"x-api-key": caller()}

    def in_flight(path):
        deadline = time.monotonic() + 5
        while not any(x["path"] == path for x in origin.requests()):
            assert time.monotonic() < deadline, f"the origin never saw {path}"
            time.sleep(0.02)

    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        # replayed after waiting: free
        path = f"/p/{uuid.uuid4().hex}?delay=0.8"
        key = {"Idempotency-Key": uuid.uuid4().hex, **h}
        first = ex.submit(wire.send, port, "POST", path, b"{}", key)
        in_flight(path)
        waiter = wire.send(port, "POST", path, b"{}", key)
        assert first.result().status == 200 and first.result().header("x-ratelimit-remaining") == "4"
        assert waiter.status == 200 and waiter.header("idempotent-replayed") == "true"
        assert waiter.header("x-ratelimit-remaining") == "4" and waiter.header("x-ratelimit-limit") == "5"
        # the wait runs out (409): charged
        path = f"/brief/{uuid.uuid4().hex}?delay=1"
        key = {"Idempotency-Key": uuid.uuid4().hex, **h}
        first = ex.submit(wire.send, port, "POST", path, b"{}", key)
        in_flight(path)
        waiter = wire.send(port, "POST", path, b"{}", key)
        assert waiter.status == 409, str(waiter)
        assert waiter.header("x-ratelimit-remaining") == "2" and waiter.header("x-ratelimit-limit") == "5"
        assert first.result().status == 200 and first.result().header("x-ratelimit-remaining") == "3"
    # 4 charged so far (two first requests, the 409, this one): one left
    r = wire.send(port, "POST", f"/p/{uuid.uuid4().hex}", b"{}", {"Idempotency-Key": uuid.uuid4().hex, **h})
    assert r.status == 200 and r.header("x-ratelimit-remaining") == "1"


def test_four_workers_admit_within_the_allowance(envoy):
    port = envoy.port("rlfast")
    me = caller()
    admitted = 0
    lock = threading.Lock()
    start = time.monotonic()

    def blast(_):
        nonlocal admitted
        end = start + 2.0
        n = 0
        while time.monotonic() < end:
            if send(port, "GET", "/fast", headers={"x-api-key": me}).status == 200:
                n += 1
        with lock:
            admitted += n

    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        list(ex.map(blast, range(16)))
    elapsed = time.monotonic() - start
    allowance = 20 + 10 * elapsed
    assert admitted <= allowance + 4, (admitted, allowance)
    assert admitted >= 20, admitted


def prom(envoy: Envoy, namespace: str) -> dict[str, float]:
    envoy.settle_metrics()
    status, text = envoy.admin("/stats/prometheus")
    assert status == 200
    out = {}
    for line in text.splitlines():
        m = re.match(r'^idemgate_(\w+)\{idemgate_namespace="' + re.escape(namespace) + r'"\} (\S+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_scripted_traffic_counts_at_stats_prometheus(envoy, origin):
    """Send known traffic; every counter equals what was sent of its kind."""
    port = envoy.port("metrics")
    run = uuid.uuid4().hex[:8]
    k = lambda i: f"{run}-k{i}"  # noqa: E731
    p = f"/m/{run}"
    ok = lambda r, s=200: r.status == s or pytest.fail(str(r))  # noqa: E731
    # 10 first requests, stored; capacity 8 → the 9th and 10th evict
    for i in range(1, 11):
        ok(send(port, "POST", p, b"{}", {"Idempotency-Key": k(i)}))
    # 3 replays, 1 mismatch
    for _ in range(3):
        assert send(port, "POST", p, b"{}", {"Idempotency-Key": k(10)}).header("idempotent-replayed") == "true"
    ok(send(port, "POST", p, b'{"x":1}', {"Idempotency-Key": k(10)}), 422)
    # 1 forwarded slow request + 2 concurrent conflicts (an eviction)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        slow = ex.submit(send, port, "POST", p + "?delay=0.8", b"{}", {"Idempotency-Key": k(11)})
        deadline = time.monotonic() + 5
        while not any(f"{p}?delay=0.8" == x["path"] for x in origin.requests()) and time.monotonic() < deadline:
            time.sleep(0.02)
        for _ in range(2):
            ok(send(port, "POST", p + "?delay=0.8", b"{}", {"Idempotency-Key": k(11)}), 409)
        ok(slow.result())
    # 2 malformed keys, 1 missing where required, 1 too large, 3 passed (no key)
    ok(send(port, "POST", p, b"{}", {"Idempotency-Key": "\"open"}), 400)
    ok(send(port, "POST", p, b"{}", {"Idempotency-Key": "a" * 300}), 400)
    ok(send(port, "POST", "/req" + p, b"{}"), 400)
    ok(send(port, "POST", p, b"x" * 2000, {"Idempotency-Key": k(99)}), 413)
    for _ in range(3):
        ok(send(port, "POST", p, b"{}"))
    # not stored by status (released: its slot becomes free, after an eviction)
    ok(send(port, "POST", p + "?status=500", b"{}", {"Idempotency-Key": k(12)}), 500)
    # an origin reset: outcome unknown, claim kept; after the lease a retry takes over
    ok(send(port, "POST", p + "?reset=1", b"{}", {"Idempotency-Key": k(13)}), 503)
    time.sleep(2.2)
    ok(send(port, "POST", p + "?reset=1", b"{}", {"Idempotency-Key": k(13)}), 503)
    time.sleep(2.2)
    # too large to store (takes the slot whose lease lapsed)
    ok(send(port, "POST", p + "?size=5000", b"{}", {"Idempotency-Key": k(14)}))
    # 5 GETs on a route limited to a burst of 2
    codes = [send(port, "GET", f"/rl/{run}").status for _ in range(5)]
    assert codes == [200, 200, 429, 429, 429]

    stats = prom(envoy, "metrics")
    expected = {
        "requests": 10 + 3 + 1 + 3 + 2 + 1 + 1 + 3 + 1 + 2 + 1,
        "forwarded": 10 + 1 + 1 + 2 + 1,
        "stored": 10 + 1,
        "replayed": 3,
        "mismatches": 1,
        "conflicts": 2,
        "bad_keys": 2,
        "missing_keys": 1,
        "too_large": 1,
        "passed": 3,
        "not_stored_status": 1,
        "not_stored_incomplete": 2,
        "not_stored_too_large": 1,
        "lease_expiries": 1,
        "evictions": 2 + 1 + 1,  # k9, k10, k11, k12; k13 and k14 reuse the freed slot
        "rate_limited": 3,
        "duplicates": 0,
        "lost_claims": 0,
        "store_unavailable": 0,
        "store_errors": 0,
        "store_index_keys": 1,  # capacity 8 / probes 8: one bucket
        "store_body_keys": 8,
        "rate_keys": 1,
    }
    diff = {name: (stats.get(name), want) for name, want in expected.items() if stats.get(name) != want}
    assert not diff, f"(got, want): {diff}"
