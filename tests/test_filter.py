"""Acceptance tests of the idemgate filter in a real Envoy 1.40 (Docker, --concurrency 4).

Every test uses its own path (a fresh uuid), so the origin's request log can be read per
test: the origin records each request the moment its headers arrive, before its body, so
a request that the filter held back and never released cannot hide from it.

Every scenario runs over HTTP/1.1 and over h2c (the `wire` fixture), each request's body
framed the next way of its protocol's cycle (httpclient.FRAMINGS: one DATA frame with
END_STREAM, several frames, an empty END_STREAM frame, trailers; content-length, chunked,
chunked with a trailer), so a first request and its retries arrive framed differently.
The listeners load idemgate as shipped (single-filter mode); "two" in two-filter mode
(reader + gate), "twobuf" with Envoy's buffer filter between reader and gate, "h2up" with
HTTP/2 to the origin.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from harness import Envoy, Origin, free_port, listener, validate_config, wrk_unique_keys
from httpclient import Resp, Wire

CONCURRENCY = 4


def fresh(prefix: str = "/t") -> str:
    return f"{prefix}/{uuid.uuid4().hex}"


def seen(origin: Origin, path_prefix: str) -> list[dict[str, Any]]:
    return [r for r in origin.requests() if r["path"].startswith(path_prefix)]


def executions(origin: Origin, path_prefix: str) -> int:
    """Requests that reached the origin with a complete body (executed)."""
    return sum(1 for r in seen(origin, path_prefix) if r.get("body_complete"))


def is_problem(r: Resp, status: int) -> dict[str, Any]:
    assert r.status == status, r
    assert r.header("content-type") == "application/problem+json", r
    doc = r.json()
    assert doc["status"] == status
    assert doc["type"].startswith("https://idemgate.dev/problems/")
    assert doc["title"] and len(doc["detail"]) > 30, doc
    return doc


LISTENERS = {
    "main": {"store": {"namespace": "main"}},
    "required": {"store": {"namespace": "required"}, "key": {"required": True, "maxLength": 64}},
    "short": {"store": {"namespace": "short"}, "ttlSeconds": 2, "leaseSeconds": 2},
    "small": {
        "store": {"namespace": "small"},
        "maxBodyBytes": 4 << 20,
        "maxResponseBytes": 1024,
        "leaseSeconds": 2,
    },
    "blake3": {"store": {"namespace": "blake3"}, "fingerprint": {"algorithm": "blake3"}},
    "two": {"store": {"namespace": "two"}},
    "twobuf": {"store": {"namespace": "twobuf"}},
    "h2up": {"store": {"namespace": "h2up"}},
}
# How the listeners other than single-filter ones load idemgate or reach the origin.
LISTENER_OPTIONS: dict[str, dict[str, str]] = {
    "two": {"mode": "two"},
    "twobuf": {"mode": "two-buffer"},
    "h2up": {"upstream": "h2"},
}


@pytest.fixture(scope="module")
def origin():
    with Origin(verbose=False) as o:
        yield o


@pytest.fixture(scope="module")
def envoy(origin):
    specs = [
        listener(name, free_port(), cfg, route_timeout_s=0 if name == "short" else 15,
                 **LISTENER_OPTIONS.get(name, {}))
        for name, cfg in LISTENERS.items()
    ]
    with Envoy(specs, origin_port=origin.port, concurrency=CONCURRENCY) as e:
        yield e


def port(envoy: Envoy, name: str = "main") -> int:
    return envoy.port(name)


@pytest.fixture(params=["h1", "h2c"])
def wire(request: pytest.FixtureRequest) -> Wire:
    """HTTP/1.1 or h2c with prior knowledge, framing bodies in turn every way it can."""
    return Wire(request.param)


# 1 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["main", "two", "h2up"])
def test_first_forwarded_retry_replayed_byte_identical(envoy, origin, wire, name):
    path = fresh()
    body = b'{"amount": 1000, "currency": "eur"}'
    h = {"Idempotency-Key": "order-" + uuid.uuid4().hex, "Content-Type": "application/json"}
    first = wire.send(port(envoy, name), "POST", path, body, h)
    assert first.status == 200, first
    assert first.header("idempotent-replayed") is None
    assert first.header("set-cookie") is not None  # the client gets the origin's cookie once
    for _ in range(3):
        again = wire.send(port(envoy, name), "POST", path, body, h)
        assert again.status == 200
        assert again.body == first.body
        assert again.header("idempotent-replayed") == "true"
        assert again.header("content-type") == first.header("content-type")
        assert again.header("set-cookie") is None  # never stored
        assert again.header("x-origin-execution") is None  # not in the allow-list
    assert executions(origin, path) == 1
    # the internal gate token never reaches the origin
    (rec,) = seen(origin, path)
    assert rec["body_complete"], rec
    assert "x-idemgate-gate" not in rec["headers"]
    assert rec["body_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("name", ["main", "h2up"])
def test_large_response_streamed_and_replayed_byte_identical(envoy, origin, wire, name):
    path = fresh() + "?size=300000"
    h = {"Idempotency-Key": uuid.uuid4().hex}
    first = wire.send(port(envoy, name), "POST", path, b"x", h)
    assert first.status == 200 and len(first.body) == 300000
    again = wire.send(port(envoy, name), "POST", path, b"x", h)
    assert again.header("idempotent-replayed") == "true"
    assert again.body == first.body
    assert executions(origin, path.split("?")[0]) == 1


def test_sf_string_key_is_the_same_key(envoy, origin, wire):
    path = fresh()
    k = uuid.uuid4().hex
    assert wire.send(port(envoy), "POST", path, b"a", {"Idempotency-Key": k}).status == 200
    r = wire.send(port(envoy), "POST", path, b"a", {"Idempotency-Key": f'"{k}"'})
    assert r.header("idempotent-replayed") == "true"
    assert executions(origin, path) == 1


def test_callers_are_scoped_by_credentials(envoy, origin, wire):
    path = fresh()
    k = uuid.uuid4().hex
    a = wire.send(port(envoy), "POST", path, b"a", {"Idempotency-Key": k, "Authorization": "Bearer alice"})
    b = wire.send(port(envoy), "POST", path, b"a", {"Idempotency-Key": k, "Authorization": "Bearer bob"})
    assert a.status == b.status == 200
    assert a.body != b.body  # bob never sees alice's stored response
    assert executions(origin, path) == 2
    a2 = wire.send(port(envoy), "POST", path, b"a", {"Idempotency-Key": k, "Authorization": "Bearer alice"})
    assert a2.body == a.body and a2.header("idempotent-replayed") == "true"


def test_large_request_body_over_one_mib_is_fingerprinted_and_forwarded_intact(envoy, origin, wire):
    path = fresh()
    body = os.urandom(3 << 20)
    h = {"Idempotency-Key": uuid.uuid4().hex}
    assert wire.send(port(envoy, "small"), "POST", path, body, h).status == 200
    (rec,) = seen(origin, path)
    assert rec["body_complete"] and rec["body_sha256"] == hashlib.sha256(body).hexdigest()
    # the same body sent chunked is the same request: replayed (the origin's JSON answer
    # fits in the 1 KiB maxResponseBytes of "small")
    assert wire.send(port(envoy, "small"), "POST", path, body, h, chunked=True).header("idempotent-replayed") == "true"
    assert executions(origin, path) == 1


# 2 ---------------------------------------------------------------------------------------


def test_blake3_fingerprints_replay_identical_and_refuse_changed_bodies(envoy, origin, wire):
    """fingerprint.algorithm blake3 (wasm SIMD inside Envoy): a large body replays, one
    changed byte at the end is a mismatch that never reaches the origin."""
    path = fresh()
    body = b'{"pad":"' + b"x" * 70_000 + b'"}'
    h = {"Idempotency-Key": "b3-" + uuid.uuid4().hex, "Content-Type": "application/json"}
    first = wire.send(port(envoy, "blake3"), "POST", path, body, h)
    assert first.status == 200 and first.header("idempotent-replayed") is None, first
    again = wire.send(port(envoy, "blake3"), "POST", path, body, h)
    assert again.status == 200 and again.header("idempotent-replayed") == "true", again
    assert again.body == first.body
    changed = body[:-3] + b'y"}'
    is_problem(wire.send(port(envoy, "blake3"), "POST", path, changed, h), 422)
    assert executions(origin, path) == 1


def test_same_key_different_body_is_422_and_never_reaches_origin(envoy, origin, wire):
    path = fresh()
    h = {"Idempotency-Key": uuid.uuid4().hex}
    assert wire.send(port(envoy), "POST", path, b'{"a":1}', h).status == 200
    r = wire.send(port(envoy), "POST", path, b'{"a":2}', h)
    doc = is_problem(r, 422)
    assert "different request" in doc["detail"]
    # also with a different query string, and chunked
    is_problem(wire.send(port(envoy), "POST", path + "?x=1", b'{"a":1}', h), 422)
    is_problem(wire.send(port(envoy), "POST", path, b'{"a":3}', h, chunked=True), 422)
    assert len(seen(origin, path)) == 1


# 3 ---------------------------------------------------------------------------------------


def storm(wire: Wire, envoy_port: int, jobs: list[tuple[str, str, bytes]], workers: int = 200) -> list[tuple[str, Resp]]:
    def one(job: tuple[str, str, bytes]) -> tuple[str, Resp]:
        path, key, body = job
        return key, wire.send(envoy_port, "POST", path, body, {"Idempotency-Key": key}, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        return list(ex.map(one, jobs))


def check_storm(results: list[tuple[str, Resp]]) -> Counter:
    by_key: dict[str, list[Resp]] = {}
    for key, r in results:
        by_key.setdefault(key, []).append(r)
    kinds: Counter = Counter()
    for key, rs in by_key.items():
        firsts = [r for r in rs if r.status == 200 and r.header("idempotent-replayed") is None]
        assert len(firsts) <= 1, f"{key}: {len(firsts)} origin answers"
        for r in rs:
            assert r.status < 500, r
            if r.status == 409:
                is_problem(r, 409)
                assert r.header("retry-after") == "1"
                kinds["409"] += 1
            elif r.header("idempotent-replayed") == "true":
                assert firsts, f"{key}: replay without an original"
                assert r.body == firsts[0].body and r.status == firsts[0].status
                kinds["replay"] += 1
            else:
                assert r.status == 200, r
                kinds["first"] += 1
    return kinds


def no_truncated_requests(origin: Origin, path_prefix: str) -> list[dict[str, Any]]:
    """The origin's log for the prefix, once every request in it has its body complete (a
    request let go before the decision, or cut off by one, would stay incomplete)."""
    deadline = time.monotonic() + 5
    while True:
        reqs = seen(origin, path_prefix)
        incomplete = [r for r in reqs if not r.get("body_complete")]
        if not incomplete:
            return reqs
        assert time.monotonic() < deadline, f"requests the origin never got whole: {incomplete}"
        time.sleep(0.1)


# single-filter (as shipped) and two-filter mode
STORM_LISTENERS = ["main", "two"]


@pytest.mark.parametrize("name", STORM_LISTENERS)
def test_storm_one_key_executes_once(envoy, origin, wire, name):
    path = fresh()
    key = uuid.uuid4().hex
    results = storm(wire, port(envoy, name), [(path + "?delay=0.3", key, b'{"n":1}')] * 200)
    kinds = check_storm(results)
    assert kinds["first"] == 1, kinds
    assert executions(origin, path) == 1
    assert len(no_truncated_requests(origin, path)) == 1


@pytest.mark.parametrize("name", STORM_LISTENERS)
def test_storm_fifty_keys_twenty_each(envoy, origin, wire, name):
    base = fresh()
    jobs = []
    for i in range(50):
        jobs += [(f"{base}/{i}?delay=0.1", f"{uuid.uuid4().hex}-{i}", b"b%d" % i)] * 20
    # interleave keys so every key races on every worker
    jobs = [jobs[j * 20 + i] for i in range(20) for j in range(50)]
    kinds = check_storm(storm(wire, port(envoy, name), jobs))
    assert kinds["first"] == 50, kinds
    reqs = no_truncated_requests(origin, base)
    per_path = Counter(r["path"].split("?")[0] for r in reqs)
    assert len(per_path) == 50 and set(per_path.values()) == {1}, per_path


def test_two_filter_mode_with_a_pausing_filter_between_reader_and_gate(envoy, origin, wire):
    """Envoy's buffer filter between reader and gate holds the headers until the body is
    complete, so the reader decides before its gate has seen the request: 200 concurrent
    requests over 20 keys still execute each key once, and the origin gets every forwarded
    request whole (reader and gate find each other in the stream's own filter state)."""
    base = fresh()
    jobs = []
    for i in range(20):
        jobs += [(f"{base}/{i}?delay=0.1", f"{uuid.uuid4().hex}-{i}", b'{"k":%d}' % i)] * 10
    jobs = [jobs[j * 10 + i] for i in range(10) for j in range(20)]
    kinds = check_storm(storm(wire, port(envoy, "twobuf"), jobs))
    assert kinds["first"] == 20, kinds
    reqs = no_truncated_requests(origin, base)
    per_path = Counter(r["path"].split("?")[0] for r in reqs)
    assert len(per_path) == 20 and set(per_path.values()) == {1}, per_path
    # a replay and a mismatch through the same chain never reach the origin
    path, key, body = jobs[0]
    again = wire.send(port(envoy, "twobuf"), "POST", path, body, {"Idempotency-Key": key})
    assert again.header("idempotent-replayed") == "true", again
    is_problem(wire.send(port(envoy, "twobuf"), "POST", path, body + b" ", {"Idempotency-Key": key}), 422)
    assert len(seen(origin, path.split("?")[0])) == 1


# 4 ---------------------------------------------------------------------------------------


def test_slow_origin_duplicate_gets_409_and_never_reaches_origin(envoy, origin, wire):
    path = fresh()
    h = {"Idempotency-Key": uuid.uuid4().hex}
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        first = ex.submit(wire.send, port(envoy), "POST", path + "?delay=2", b"slow", h)
        deadline = time.monotonic() + 5
        while not seen(origin, path) and time.monotonic() < deadline:
            time.sleep(0.05)
        dup = wire.send(port(envoy), "POST", path + "?delay=2", b"slow", h)
        doc = is_problem(dup, 409)
        assert dup.header("retry-after") == "1"
        assert "still being processed" in doc["detail"]
        assert len(seen(origin, path)) == 1  # the duplicate left no trace, not even headers
        assert first.result().status == 200
    replay = wire.send(port(envoy), "POST", path + "?delay=2", b"slow", h)
    assert replay.header("idempotent-replayed") == "true"
    assert replay.body == first.result().body
    assert len(seen(origin, path)) == 1


# 5 ---------------------------------------------------------------------------------------


def test_ttl_expiry_executes_again(envoy, origin, wire):
    path = fresh()
    h = {"Idempotency-Key": uuid.uuid4().hex}
    a = wire.send(port(envoy, "short"), "POST", path, b"x", h)
    assert wire.send(port(envoy, "short"), "POST", path, b"x", h).header("idempotent-replayed") == "true"
    time.sleep(2.3)
    b = wire.send(port(envoy, "short"), "POST", path, b"x", h)
    assert b.status == 200 and b.header("idempotent-replayed") is None
    assert a.body != b.body
    assert executions(origin, path) == 2


def test_origin_that_never_answers_frees_the_key_after_the_lease(envoy, origin, wire):
    path = fresh()
    h = {"Idempotency-Key": uuid.uuid4().hex}
    started = time.monotonic()
    with pytest.raises((socket.timeout, TimeoutError)):
        wire.send(port(envoy, "short"), "POST", path + "?hang=1", b"x", h, timeout=0.7)
    is_problem(wire.send(port(envoy, "short"), "POST", path + "?hang=1", b"x", h), 409)
    assert len(seen(origin, path)) == 1
    time.sleep(max(0.0, 2.2 - (time.monotonic() - started)))
    r = wire.send(port(envoy, "short"), "POST", path, b"x", h)
    assert r.status == 200 and r.header("idempotent-replayed") is None
    assert len(seen(origin, path)) == 2


def test_origin_reset_frees_the_key_after_the_lease(envoy, origin, wire):
    path = fresh()
    h = {"Idempotency-Key": uuid.uuid4().hex}
    started = time.monotonic()
    r = wire.send(port(envoy, "short"), "POST", path + "?reset=1", b"x", h)
    assert r.status == 503  # Envoy's own answer: upstream reset
    # The outcome is unknown (the origin may have acted): the key stays held until the lease.
    is_problem(wire.send(port(envoy, "short"), "POST", path, b"x", h), 409)
    assert len(seen(origin, path)) == 1
    time.sleep(max(0.0, 2.2 - (time.monotonic() - started)))
    r = wire.send(port(envoy, "short"), "POST", path, b"x", h)
    assert r.status == 200 and r.header("idempotent-replayed") is None
    assert len(seen(origin, path)) == 2


def test_unstored_status_frees_the_key_at_once(envoy, origin, wire):
    path = fresh()
    h = {"Idempotency-Key": uuid.uuid4().hex}
    assert wire.send(port(envoy), "POST", path + "?status=500", b"x", h).status == 500
    assert wire.send(port(envoy), "POST", path + "?status=429", b"x", h).status == 429
    r = wire.send(port(envoy), "POST", path + "?status=201", b"x", h)
    assert r.status == 201 and r.header("idempotent-replayed") is None
    assert wire.send(port(envoy), "POST", path + "?status=201", b"x", h).header("idempotent-replayed") == "true"
    assert executions(origin, path) == 3


def test_stored_4xx_is_replayed(envoy, origin, wire):
    path = fresh() + "?status=404"
    h = {"Idempotency-Key": uuid.uuid4().hex}
    a = wire.send(port(envoy), "POST", path, b"x", h)
    b = wire.send(port(envoy), "POST", path, b"x", h)
    assert a.status == b.status == 404 and b.header("idempotent-replayed") == "true" and a.body == b.body


def test_response_over_store_limit_is_delivered_but_not_stored(envoy, origin, wire):
    path = fresh() + "?size=5000"
    h = {"Idempotency-Key": uuid.uuid4().hex}
    a = wire.send(port(envoy, "small"), "POST", path, b"x", h)
    assert a.status == 200 and len(a.body) == 5000
    # not replayable and the origin acted: the key stays held until its lease lapses
    is_problem(wire.send(port(envoy, "small"), "POST", path, b"x", h), 409)


# 6 ---------------------------------------------------------------------------------------

FAST_ORIGIN_BODY = '{"ok":true,"padding":"' + "p" * 200 + '"}'


def fast_origin_config(listen_port: int, admin_port: int) -> dict[str, Any]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "fast",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "fast",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "direct_response": {
                                                                "status": 201,
                                                                "body": {"inline_string": FAST_ORIGIN_BODY},
                                                            },
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ]
        },
    }


def run_wrk(port_: int, prefix: str, seconds: int, tmp: Path) -> tuple[int, int]:
    total, non2xx, out = wrk_unique_keys(port_, prefix, "/churn", seconds, 16, 1, tmp)
    assert total > 0, out
    return total, non2xx


def test_key_churn_store_stays_bounded_and_memory_flat():
    capacity = 10_000
    target = 200_000
    tmp = Path(tempfile.mkdtemp(prefix="idemgate-churn-"))
    fast_port, fast_admin = free_port(), free_port()
    with Envoy(config=fast_origin_config(fast_port, fast_admin), admin_port=fast_admin, concurrency=1) as fast:
        churn_port = free_port()
        spec = listener("churn", churn_port, {"store": {"namespace": "churn", "capacity": capacity}})
        with Envoy([spec], origin_port=fast_port, concurrency=CONCURRENCY) as envoy:
            def stat(name: str) -> int:
                return int(envoy.stats(f"idemgate\\.churn\\.{name}$").get(f"wasmcustom.idemgate.churn.{name}", 0))

            sent = 0
            bad = 0
            rss_after_fill = None
            phase = 0
            deadline = time.monotonic() + 420
            while sent < target and time.monotonic() < deadline:
                total, non2xx = run_wrk(churn_port, f"p{phase}", 8, tmp)
                phase += 1
                sent += total
                bad += non2xx
                if rss_after_fill is None and stat("store_body_keys") >= capacity * 0.9:
                    rss_after_fill = envoy.rss_bytes()
                print(f"churn: sent {sent}, body keys {stat('store_body_keys')}, rss {envoy.rss_bytes() >> 20} MiB")
            assert sent >= target, f"only {sent} requests in the time allowed"
            assert bad == 0, f"{bad} non-2xx answers"
            envoy.settle_metrics()
            assert stat("forwarded") >= target
            assert stat("stored") >= target
            index_keys, body_keys = stat("store_index_keys"), stat("store_body_keys")
            # capacity 10 000 in buckets of 8 ways (store.probes): 1 250 index keys at most
            assert 0 < index_keys <= capacity // 8, index_keys
            assert 0 < body_keys <= capacity, body_keys
            assert stat("evictions") > 0
            rss_end = envoy.rss_bytes()
            assert rss_after_fill is not None
            growth = rss_end - rss_after_fill
            print(f"rss after fill {rss_after_fill >> 20} MiB, at end {rss_end >> 20} MiB")
            assert growth < 24 << 20, f"Envoy grew by {growth >> 20} MiB after the store filled"
    shutil.rmtree(tmp, ignore_errors=True)


# 7 ---------------------------------------------------------------------------------------


def test_missing_key_where_required_is_400(envoy, origin, wire):
    path = fresh()
    doc = is_problem(wire.send(port(envoy, "required"), "POST", path, b"x"), 400)
    assert "idempotency-key" in doc["detail"]
    assert doc["type"].endswith("missing-key")
    assert seen(origin, path) == []


@pytest.mark.parametrize(
    "value,needle",
    [
        ("", "empty"),
        ('""', "empty"),
        ("k" * 65, "at most 64"),
        ("caf\u00e9", "printable ASCII"),
        ('"unterminated', "structured-field string"),
        ('"a"b', "structured-field string"),
    ],
)
def test_malformed_key_is_400(envoy, origin, wire, value, needle):
    path = fresh()
    r = wire.send(port(envoy, "required"), "POST", path, b"x", [("Idempotency-Key", value.encode("latin-1"))],
                  timeout=10)
    doc = is_problem(r, 400)
    assert needle in doc["detail"], doc
    assert doc["type"].endswith("malformed-key")
    assert seen(origin, path) == []


def test_repeated_key_header_is_400(envoy, origin, wire):
    path = fresh()
    r = wire.send(port(envoy), "POST", path, b"x", [("Idempotency-Key", "a"), ("Idempotency-Key", "b")])
    assert "more than once" in is_problem(r, 400)["detail"]
    assert seen(origin, path) == []


def test_body_over_limit_is_413_declared_or_chunked(envoy, origin, wire):
    path = fresh()
    big = b"x" * ((1 << 20) + 1)
    h = {"Idempotency-Key": uuid.uuid4().hex}
    doc = is_problem(wire.send(port(envoy), "POST", path, big, h), 413)
    assert "1048576 bytes" in doc["detail"]
    is_problem(wire.send(port(envoy), "POST", path, big, h, chunked=True), 413)
    assert seen(origin, path) == []
    # exactly at the limit is fine
    assert wire.send(port(envoy), "POST", path, big[:-1], h).status == 200


@pytest.mark.parametrize(
    "config,field",
    [
        ({"bogus": 1}, "bogus: unknown field"),
        ({"key": {"maxLength": 0}}, "key.maxLength: must be 1..=1024, got 0"),
        ({"ttlSeconds": 5, "leaseSeconds": 10}, "leaseSeconds: must not exceed ttlSeconds (5), got 10"),
        ({"response": {"storeStatuses": ["599-200"]}}, "response.storeStatuses[0]: range is inverted"),
        ({"response": {"storeHeaders": ["set-cookie"]}}, "response.storeHeaders[0]"),
        ({"methods": "POST"}, "methods: invalid type"),
        ({"key": {"sources": [{"jsonPointer": "orderId"}]}}, 'key.sources[0].jsonPointer: must be empty or start with "/", got "orderId"'),
        ({"onMismatch": {"action": "ignore"}}, 'onMismatch.action: must be one of reject, replay, newRequest; got "ignore"'),
        ({"expiry": {"minSeconds": 60, "maxSeconds": 10}}, "expiry: bounds are inverted: minSeconds 60 > maxSeconds 10"),
        ({"routes": [{"match": {"prefix": "/a"}, "onDuplicate": {"action": "skip"}}]}, "routes[0].onDuplicate.action: must be one of replay, reject, acknowledge"),
        ("{not json", "$: key must be a string"),
    ],
)
def test_bad_config_is_refused_by_envoy_validate(config, field):
    rc, out = validate_config([listener("bad", 10999, config)])
    assert rc != 0, out
    assert "idemgate: invalid configuration: " + field in out, out[-3000:]


def test_good_config_passes_envoy_validate():
    rc, out = validate_config([listener("good", 10999, {"key": {"required": True}, "ttlSeconds": 60})])
    assert rc == 0, out[-3000:]


def test_gate_refuses_a_configuration():
    rc, out = validate_config([listener("bad", 10999, {}, mode="two", gate_config={"ttlSeconds": 1})])
    assert rc != 0
    assert "the gate (idemgate_gate) takes no configuration" in out


# 8 ---------------------------------------------------------------------------------------


def test_get_and_unlisted_methods_pass_untouched(envoy, origin, wire):
    path = fresh()
    h = {"Idempotency-Key": "same", "X-Idemgate-Gate": "12345", "X-Custom": "kept"}
    for method in ["GET", "PUT", "DELETE", "GET"]:
        r = wire.send(port(envoy), method, path, b"body" if method == "PUT" else None, h)
        assert r.status == 200 and r.header("idempotent-replayed") is None
    reqs = seen(origin, path)
    assert [r["method"] for r in reqs] == ["GET", "PUT", "DELETE", "GET"]
    for rec in reqs:
        assert rec["headers"]["idempotency-key"] == "same"
        assert rec["headers"]["x-custom"] == "kept"
        assert "x-idemgate-gate" not in rec["headers"]  # a client cannot forge the gate token


def test_post_without_key_passes_when_not_required(envoy, origin, wire):
    path = fresh()
    for _ in range(2):
        assert wire.send(port(envoy), "POST", path, b"x").status == 200
    assert executions(origin, path) == 2


def test_metrics_count_outcomes(envoy):
    envoy.settle_metrics()
    stats = envoy.stats(r"idemgate\.main\.")
    names = {k.rsplit(".", 1)[1]: v for k, v in stats.items()}
    for m in ["forwarded", "replayed", "conflicts", "mismatches", "bad_keys", "too_large", "stored", "passed"]:
        assert m in names, names
    assert names["forwarded"] > 0 and names["replayed"] > 0
    assert 0 < names["store_index_keys"] <= 10_000
